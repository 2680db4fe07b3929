"""Isolation against a real PostgreSQL: no source row, duplicate or new endpoint stops or repeats others."""

from __future__ import annotations

import datetime as dt

import pytest

from cdr_webhook.selection import RunInfo
from cdr_webhook.selection import select_cdrs as claim_cdrs
from cdr_webhook.settings import Settings
from demo.dialer import Dialer

T0 = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)
SECOND = dt.timedelta(seconds=1)
SETTINGS = Settings(lag_seconds=60, max_cdrs_per_run=500)
CONNECTIONS: dict[str, dict] = {"cdr_webhook": {}}


def select_cdrs(conn, run, settings=SETTINGS, *, now=None, connections=None):
    now = now or (run.interval_end if run.interval_end else T0 + dt.timedelta(hours=1))
    mapped = claim_cdrs(conn, run, settings, now=now, connections=(connections or CONNECTIONS).get)
    return [item["cdr_id"] for item in mapped]


def scheduled(n: int) -> RunInfo:
    return RunInfo("cdr_webhook", f"scheduled__{n}", "scheduled", T0 + (n - 1) * MINUTE, T0 + n * MINUTE, {})


def manual(run: str, **params) -> RunInfo:
    return RunInfo("cdr_webhook", f"manual__{run}", "manual", None, None, params)


def ledger_rows(conn) -> dict[str, tuple]:
    rows = conn.execute("SELECT cdr_id, status, error, endpoint FROM cdr_webhook.delivery").fetchall()
    return {row[0]: row[1:] for row in rows}


def watermark(conn) -> dt.datetime | None:
    row = conn.execute("SELECT created_at FROM cdr_webhook.watermark").fetchone()
    return row[0] if row else None


def set_call_date(conn, cdr_id: str, raw: str) -> None:
    # Written into the dialer's table under the view: the driver cannot load these values.
    conn.execute("UPDATE dialer.cdr SET call_date = %s::timestamptz WHERE id = %s::uuid", (raw, cdr_id))


@pytest.mark.parametrize(
    ("time_zone", "extreme"),
    [
        ("America/New_York", "0001-01-01 00:30:00+00"),  # 1 BC once the session's offset applies
        ("Asia/Tokyo", "9999-12-31 23:30:00+00"),  # year 10000 once the session's offset applies
    ],
)
def test_dates_the_driver_cannot_load_skip_only_their_cdr(cdr_db, time_zone, extreme):
    cdr_db.execute(f"SET TIME ZONE '{time_zone}'")
    dialer = Dialer(cdr_db)
    bad_values = ["infinity", "-infinity", "0001-01-01 00:00:00+00 BC", extreme]
    good, bad = [], {}
    for n in range(1, 3):  # two runs' worth of CDRs, each with good neighbours around bad rows
        good.append(dialer.cdr(created_at=T0 + (n - 1) * MINUTE + SECOND))
        for value in bad_values[(n - 1) * 2 : n * 2]:
            cdr = dialer.cdr(created_at=T0 + (n - 1) * MINUTE + 2 * SECOND + len(bad) * SECOND)
            set_call_date(cdr_db, cdr, value)
            bad[cdr] = value
        good.append(dialer.cdr(created_at=T0 + (n - 1) * MINUTE + 30 * SECOND))

    runs = [select_cdrs(cdr_db, scheduled(n)) for n in (1, 2, 3)]

    assert runs == [good[0:2], good[2:4], []]
    assert watermark(cdr_db) == T0 + 3 * MINUTE
    rows = ledger_rows(cdr_db)
    for cdr, value in bad.items():
        status, error, _ = rows[cdr]
        assert status == "skipped"
        # The value as PostgreSQL writes it in the session's time zone: infinity stays infinity.
        shown = repr(value) if "infinity" in value else "'"
        assert f"CDR {cdr!r}: column call_date = {shown}" in error
        assert "outside the range of dates a payload can carry" in error
