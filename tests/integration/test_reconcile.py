"""The reconciliation scan against a real PostgreSQL: CDRs committed after the lag are still sent."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

import psycopg
import pytest

from cdr_webhook import ledger, schema
from cdr_webhook.routing import Route
from cdr_webhook.selection import RunInfo, select_cdrs
from cdr_webhook.settings import Settings
from demo.dialer import Dialer
from tests.endpoint_configs import configs
from tests.source_feed import FEED, add_feed_row, create_feed

T0 = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)
SECOND = dt.timedelta(seconds=1)
SETTINGS = Settings(lag_seconds=60, max_cdrs_per_run=500, reconcile_hours=24, reconcile_interval_seconds=120)
CONNECTIONS = {"cdr_webhook": {}}


def run(conn, n: int, settings: Settings = SETTINGS) -> list[str]:
    """Scheduled run n, over [T0 + (n-1) min, T0 + n min), at the end of its interval."""
    info = RunInfo("cdr_webhook", f"scheduled__{n}", "scheduled", T0 + (n - 1) * MINUTE, T0 + n * MINUTE, {})
    mapped = select_cdrs(conn, info, settings, now=T0 + n * MINUTE, connections=configs(CONNECTIONS))
    return [item["cdr_id"] for item in mapped]


def test_a_cdr_committed_long_after_the_lag_is_queued_by_the_next_reconciliation(cdr_db, cdr_dsn, caplog):
    dialer = Dialer(cdr_db)
    first = dialer.cdr(created_at=T0 + 10 * SECOND)
    with psycopg.connect(cdr_dsn) as late_conn:  # a transaction left open: its CDR is not visible yet
        late = Dialer(late_conn).cdr(client_id=2, created_at=T0 + 20 * SECOND)

        assert run(cdr_db, 1) == [first]
        # Run 2 reconciles (nothing missing yet); run 3 may not (60 s < 120 s); run 4 reconciles
        # again, still without the late CDR; the watermark is far past its created_at + lag.
        assert [run(cdr_db, n) for n in (2, 3, 4)] == [[], [], []]
        late_conn.commit()

    caplog.set_level(logging.INFO, logger="cdr_webhook.selection")
    caplog.clear()  # what runs 1 to 4 logged, if this logger was already at INFO
    assert run(cdr_db, 5) == []  # the last reconciliation was 60 s ago: not yet
    assert "Reconciliation" not in caplog.text
    assert run(cdr_db, 6) == [late]
    assert "Reconciliation of created_at in [2026-11-28T09:00:00+00:00, 2026-11-28T09:04:00+00:00)" in (
        caplog.text
    )
    assert "1 late CDR(s) queued" in caplog.text
    assert run(cdr_db, 7) == []
    assert run(cdr_db, 8) == []  # reconciled again: the CDR is in the ledger, nothing twice


def test_reconciliation_runs_at_most_once_per_interval(cdr_db):
    dialer = Dialer(cdr_db)
    settings = dataclasses.replace(SETTINGS, reconcile_interval_seconds=300)
    assert [run(cdr_db, n, settings) for n in (1, 2)] == [[], []]  # run 2 reconciled, at T0 + 2 min
    for n in (3, 4, 5, 6):
        # A CDR committed after its scan passed, just before each run.
        missed = dialer.cdr(created_at=T0 + (n - 3) * MINUTE + 30 * SECOND)
        assert run(cdr_db, n, settings) == [], f"run {n} reconciled before 300 s had passed"
    assert run(cdr_db, 7, settings) != []  # T0 + 7 min: 300 s after run 2
    assert missed in [row[0] for row in cdr_db.execute("SELECT cdr_id FROM cdr_webhook.delivery")]


def test_reconciliation_never_reaches_before_the_first_scan_and_can_be_disabled(cdr_db):
    dialer = Dialer(cdr_db)
    history = dialer.cdr(created_at=T0 - dt.timedelta(hours=2))  # before the first run: a backfill's job
    assert [run(cdr_db, n) for n in (1, 2, 3, 4)] == [[], [], [], []]
    missed = dialer.cdr(created_at=T0 + 10 * SECOND)  # committed after the scans passed it
    off = dataclasses.replace(SETTINGS, reconcile_hours=0)
    assert [run(cdr_db, n, off) for n in (5, 6, 7)] == [[], [], []]
    assert run(cdr_db, 8) == [missed]
    assert history not in [row[0] for row in cdr_db.execute("SELECT cdr_id FROM cdr_webhook.delivery")]


def test_late_clients_finds_rows_without_a_ledger_row_under_each_kind_of_key(cdr_db):
    # A NULL cdr_id and a too-long one are recorded under keys derived from the row: once recorded,
    # they are not late any more, like a plain cdr_id.
    schema.migrate(cdr_db)
    create_feed(cdr_db)
    for client, cdr_id in ((1, "plain"), (2, None), (3, "x" * (ledger.MAX_CDR_ID_LENGTH + 1))):
        add_feed_row(cdr_db, cdr_id, T0 + client * SECOND, client_id=client)
    span = {"relation": FEED, "start": T0, "end": T0 + MINUTE}

    assert sorted(ledger.late_clients(cdr_db, **span)) == [1, 2, 3]
    ledger.enqueue_new(cdr_db, routes={c: Route("cdr_webhook") for c in (1, 2, 3)}, **span)
    assert ledger.late_clients(cdr_db, **span) == []
    add_feed_row(cdr_db, None, T0 + 4 * SECOND, client_id=4, call_id="another row")
    assert ledger.late_clients(cdr_db, **span) == [4]


def test_a_cdr_recorded_under_another_created_at_is_not_late(cdr_db):
    # The first stage of the anti-join looks for a ledger row of the row's own created_at; a cdr_id
    # the source has twice is recorded under its earliest row, outside this span: still recorded.
    schema.migrate(cdr_db)
    create_feed(cdr_db)
    add_feed_row(cdr_db, "twice", T0 - MINUTE)
    ledger.enqueue_new(cdr_db, routes={7: Route("cdr_webhook")}, relation=FEED, start=T0 - MINUTE, end=T0)
    add_feed_row(cdr_db, "twice", T0 + SECOND)
    span = {"relation": FEED, "start": T0, "end": T0 + MINUTE}

    assert ledger.late_clients(cdr_db, **span) == []
    assert ledger.enqueue_new(cdr_db, routes={7: Route("other")}, **span) == 0
    assert cdr_db.execute("SELECT endpoint, cdr_created_at FROM cdr_webhook.delivery").fetchall() == [
        ("cdr_webhook", T0 - MINUTE)
    ]


class SettingRecorder(psycopg.Cursor):
    """Notes the ``jit`` setting each statement on the source relation runs under."""

    seen: list[str]

    def execute(self, query, params=None, **kwargs):
        text = query if isinstance(query, str) else query.as_string(self.connection)
        if "cdr_feed" in text:
            with psycopg.Cursor(self.connection) as cur:
                SettingRecorder.seen.append(cur.execute("SHOW jit").fetchone()[0])
        return super().execute(query, params, **kwargs)


def test_the_day_long_reads_run_without_jit_and_leave_the_setting_as_it_was(cdr_db, cdr_dsn):
    # A day of CDRs read by index is costed above jit_above_cost yet takes milliseconds: compiling
    # the plan cost more than running it (measured in docs/benchmarks.md).
    schema.migrate(cdr_db)
    create_feed(cdr_db)
    add_feed_row(cdr_db, "a", T0 + SECOND)
    span = {"relation": FEED, "start": T0, "end": T0 + MINUTE}
    SettingRecorder.seen = []
    with psycopg.connect(cdr_dsn, autocommit=True, cursor_factory=SettingRecorder) as conn:
        conn.execute("SET jit = on")
        assert ledger.late_clients(conn, **span) == [7]
        with conn.transaction():
            assert ledger.enqueue_new(conn, routes={7: Route("cdr_webhook")}, **span) == 1
            assert conn.execute("SHOW jit").fetchone() == ("on",)
        assert conn.execute("SHOW jit").fetchone() == ("on",)
        with pytest.raises(psycopg.errors.UndefinedTable), conn.transaction():
            ledger.late_clients(conn, relation="public.no_such_feed", start=T0, end=T0 + MINUTE)
        assert conn.execute("SHOW jit").fetchone() == ("on",)
    assert SettingRecorder.seen == ["off"] * 4  # late_clients; enqueue_new's three statements
