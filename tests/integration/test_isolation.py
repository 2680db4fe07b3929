"""Isolation against a real PostgreSQL: no source row, duplicate or new endpoint stops or repeats others."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import uuid
from decimal import Decimal

import pytest

from cdr_webhook import ledger
from cdr_webhook.selection.source import fetch_rows
from cdr_webhook.selection.step import RunInfo, claim_cdrs
from cdr_webhook.settings import Settings
from demo.dialer import Dialer
from tests.support.endpoint_configs import configs
from tests.support.ledger_records import outcome
from tests.support.source_feed import FEED, add_feed_row, create_feed

T0 = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)
SECOND = dt.timedelta(seconds=1)
SETTINGS = Settings(lag_seconds=60, max_cdrs_per_run=500)
CONNECTIONS: dict[str, dict] = {"cdr_webhook": {}}


def select_cdrs(conn, run, settings=SETTINGS, *, now=None, connections=None):
    now = now or (run.interval_end if run.interval_end else T0 + dt.timedelta(hours=1))
    mapped = claim_cdrs(conn, run, settings, now=now, connections=configs(connections or CONNECTIONS))
    return [cdr_id for item in mapped for cdr_id in item["cdr_ids"]]


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


FEED_SETTINGS = dataclasses.replace(SETTINGS, source_relation=FEED)


@pytest.fixture
def feed(cdr_db):
    """A source table without a key of its own, as a view over a dialer's tables may behave."""
    create_feed(cdr_db)

    def add(cdr_id: str | None, created_at: dt.datetime, **overrides) -> str | None:
        return add_feed_row(cdr_db, cdr_id, created_at, **overrides)

    yield add
    cdr_db.execute("DROP TABLE public.cdr_feed")


def test_cdr_ids_too_long_to_send_are_recorded_under_a_short_key(cdr_db, feed):
    # Random hex does not compress: 6000 characters would overflow a btree entry (~2.7 kB).
    huge = "".join(uuid.uuid4().hex for _ in range(190))[:6000]
    long = "L" * (ledger.MAX_CDR_ID_LENGTH + 1)
    fits = "F" * ledger.MAX_CDR_ID_LENGTH
    feed("before", T0 + SECOND)
    feed(huge, T0 + 2 * SECOND)
    feed(long, T0 + 3 * SECOND)
    feed(fits, T0 + 4 * SECOND)
    feed("after", T0 + 5 * SECOND)

    runs = [select_cdrs(cdr_db, scheduled(n), FEED_SETTINGS) for n in (1, 2, 3)]

    assert runs == [["before", fits, "after"], [], []]  # fits sorts by created_at, between the two
    assert watermark(cdr_db) == T0 + 3 * MINUTE
    rows = ledger_rows(cdr_db)
    for cdr_id in (huge, long):
        key = ledger.LONG_CDR_ID_PREFIX + hashlib.md5(cdr_id.encode()).hexdigest()
        status, error, _ = rows[key]
        assert status == "skipped"
        assert f"column cdr_id = '{cdr_id[:60]}...' is {len(cdr_id)} characters long in {FEED}" in error
        assert f"at most {ledger.MAX_CDR_ID_LENGTH} fit" in error
    assert len(rows) == 5  # the lag re-read of runs 2 and 3 recorded nothing twice
    # A deliberate redelivery leaves them alone too: there is nothing it could send.
    cdr_db.execute("UPDATE cdr_webhook.delivery SET status = 'delivered' WHERE status = 'queued'")
    window = {"window_start": T0.isoformat(), "window_end": (T0 + MINUTE).isoformat(), "policy": "all"}
    assert sorted(select_cdrs(cdr_db, manual("all", **window), FEED_SETTINGS)) == sorted(
        ["before", fits, "after"]
    )


def test_a_duplicate_cdr_id_is_sent_once_from_its_earliest_row(cdr_db, feed):
    # The later duplicate is written first, so a plain scan meets it first.
    feed("dup", T0 + 20 * SECOND, cost=Decimal("9.99"), phone_number=None)
    feed("dup", T0 + 10 * SECOND, cost=Decimal("0.25"))
    feed("next", T0 + 30 * SECOND)

    assert select_cdrs(cdr_db, scheduled(1), FEED_SETTINGS) == ["dup", "next"]
    assert select_cdrs(cdr_db, scheduled(2), FEED_SETTINGS) == []  # the lag re-read sends nothing again
    queued_at = cdr_db.execute(
        "SELECT cdr_created_at FROM cdr_webhook.delivery WHERE cdr_id = 'dup'"
    ).fetchall()
    assert queued_at == [(T0 + 10 * SECOND,)]
    # What the POST task reads: the earliest row, even when the other one falls in the same range.
    rows = fetch_rows(cdr_db, FEED, [("dup", T0 + 10 * SECOND), ("next", T0 + 30 * SECOND)])
    assert rows["dup"]["cost"] == Decimal("0.25")
    assert rows["dup"]["phone_number"] == "+3465"


def test_duplicate_rows_of_one_cdr_and_created_at(cdr_db, feed):
    for _ in range(2):
        feed("twin", T0 + 10 * SECOND)  # identical: one CDR
    feed("clash", T0 + 20 * SECOND, cost=Decimal("0.1"), gateway="g1")
    feed("clash", T0 + 20 * SECOND, cost=Decimal("0.2"), gateway="g2")
    feed("next", T0 + 30 * SECOND)

    assert select_cdrs(cdr_db, scheduled(1), FEED_SETTINGS) == ["twin", "next"]

    status, error, _ = ledger_rows(cdr_db)["clash"]
    assert status == "skipped"
    assert (
        f"cdr_id 'clash' appears in 2 rows of {FEED} with created_at {T0 + 20 * SECOND} that differ in "
        "column(s) gateway, cost: make the view return one row per CDR" in error
    )


def test_a_new_client_connection_does_not_resend_what_the_default_endpoint_had(cdr_db):
    dialer = Dialer(cdr_db)
    cdr = dialer.cdr(client_id=1, created_at=T0 + 30 * SECOND)
    assert select_cdrs(cdr_db, scheduled(1)) == [cdr]
    cdr_db.execute("UPDATE cdr_webhook.delivery SET status = 'delivered'")
    own = {"cdr_webhook": {}, "cdr_webhook_client_1": {}}  # the client gets its own endpoint
    fresh = dialer.cdr(client_id=1, created_at=T0 + MINUTE + SECOND)

    # Run 2's lag re-read sees the delivered CDR again: routing applies to new CDRs only.
    mapped = claim_cdrs(cdr_db, scheduled(2), SETTINGS, now=T0 + 2 * MINUTE, connections=configs(own))

    assert mapped == [{"cdr_ids": [fresh], "http_conn_id": "cdr_webhook_client_1"}]
    assert cdr_db.execute(
        "SELECT count(*) FROM cdr_webhook.delivery WHERE cdr_id = %s", (cdr,)
    ).fetchone() == (1,)
    # A deliberate redelivery re-queues the existing row.
    window = {"window_start": T0.isoformat(), "window_end": (T0 + MINUTE).isoformat(), "policy": "all"}
    assert select_cdrs(cdr_db, manual("all", **window), connections=own) == [cdr]


def test_a_redelivery_leaves_cdrs_whose_endpoint_does_not_exist_skipped(cdr_db):
    dialer = Dialer(cdr_db)
    routed = dialer.cdr(client_id=1, created_at=T0 + 10 * SECOND)
    unrouted = dialer.cdr(client_id=8, created_at=T0 + 20 * SECOND)
    skip = dataclasses.replace(SETTINGS, unrouted_clients="skip")
    own = {"cdr_webhook_client_1": {}}
    assert select_cdrs(cdr_db, scheduled(1), skip, connections=own) == [routed]
    cdr_db.execute("UPDATE cdr_webhook.delivery SET status = 'delivered' WHERE cdr_id = %s", (routed,))
    reason = ledger_rows(cdr_db)[unrouted][1]
    assert reason.startswith("no endpoint")

    window = {"window_start": T0.isoformat(), "window_end": (T0 + MINUTE).isoformat(), "policy": "all"}
    assert select_cdrs(cdr_db, manual("all", **window), skip, connections=own) == [routed]

    assert ledger_rows(cdr_db)[unrouted] == ("skipped", reason, "cdr_webhook_client_8")


# -- one endpoint's bad configuration holds only that endpoint -----------------------------------


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"leg_types": "1"}, "extra 'leg_types': must be a list of integers, not '1'"),
        ({"signing_secret": "whsec_short"}, "extra 'signing_secret': the secret is invalid"),
        ({"max_in_flight": -1}, "extra 'max_in_flight': must be a positive integer"),
    ],
)
def test_a_misconfigured_endpoint_is_held_and_the_others_deliver(cdr_db, caplog, extra, reason):
    dialer = Dialer(cdr_db)
    ours = [dialer.cdr(created_at=T0 + n * SECOND, client_id=1) for n in (1, 3)]
    theirs = [dialer.cdr(created_at=T0 + n * SECOND, client_id=7) for n in (2, 4)]
    connections = {"cdr_webhook": {}, "cdr_webhook_client_7": extra}

    assert select_cdrs(cdr_db, scheduled(1), connections=connections) == ours

    rows = ledger_rows(cdr_db)
    for cdr in theirs:
        status, error, endpoint = rows[cdr]
        assert (status, endpoint) == ("queued", "cdr_webhook_client_7")
        assert error.startswith("configuration: connection 'cdr_webhook_client_7' ")
        assert reason in error
    held = cdr_db.execute(
        "SELECT paused, reason, changed_by FROM cdr_webhook.endpoint_state WHERE endpoint = %s",
        ("cdr_webhook_client_7",),
    ).fetchone()
    assert held[0] is True
    assert reason in held[1]
    assert held[2] == "cdr_webhook"
    assert "Endpoint cdr_webhook_client_7 paused by cdr_webhook" in caplog.text  # the alert's log line
    unowned = cdr_db.execute(
        "SELECT count(*) FROM cdr_webhook.delivery WHERE endpoint = 'cdr_webhook_client_7' AND run_id IS NULL"
    ).fetchone()[0]
    assert unowned == 2

    # Later runs still deliver the others and leave the held CDRs queued, in order, for the resume.
    later = dialer.cdr(created_at=T0 + MINUTE + SECOND, client_id=1)
    assert select_cdrs(cdr_db, scheduled(2), connections=connections) == [later]
    assert {ledger_rows(cdr_db)[cdr][0] for cdr in theirs} == {"queued"}


def test_an_endpoint_whose_connection_was_deleted_is_held(cdr_db):
    dialer = Dialer(cdr_db)
    cdr = dialer.cdr(created_at=T0 + SECOND, client_id=7)
    with_own = {"cdr_webhook": {}, "cdr_webhook_client_7": {}}
    # Queued for the client's own endpoint, but its run cannot take it (the cap is 0 for now) ...
    tiny = dataclasses.replace(SETTINGS, max_cdrs_per_run=1)
    first = dialer.cdr(created_at=T0, client_id=1)
    assert select_cdrs(cdr_db, scheduled(1), tiny, connections=with_own) == [first]
    # ... and the connection is deleted before the next run.
    assert select_cdrs(cdr_db, scheduled(2), connections=CONNECTIONS) == []
    status, error, endpoint = ledger_rows(cdr_db)[cdr]
    assert (status, endpoint) == ("queued", "cdr_webhook_client_7")
    assert "connection 'cdr_webhook_client_7': does not exist" in error


# -- a failing endpoint gets a probe's worth of claims, not a run's share -------------------------


def test_a_failing_endpoint_is_throttled_to_its_in_flight_limit_across_runs(cdr_db):
    from cdr_webhook.ledger import pause_rules, schema

    schema.migrate(cdr_db)
    dialer = Dialer(cdr_db)
    failing = [dialer.cdr(created_at=T0 + n * SECOND, client_id=7) for n in range(1, 21)]
    healthy = [dialer.cdr(created_at=T0 + n * SECOND + SECOND / 2, client_id=1) for n in range(1, 6)]
    connections = {"cdr_webhook": {}, "cdr_webhook_client_7": {"max_in_flight": 3}}
    rules = {"pause_after_failures": 5, "pause_after_hours": 1}
    retried = outcome(delivered=False, final=False)
    pause_rules.record_outcomes(cdr_db, "cdr_webhook_client_7", [retried], **rules)

    first = select_cdrs(cdr_db, scheduled(1), connections=connections)
    assert sorted(first) == sorted(healthy + failing[:3])  # oldest first within the endpoint
    more = dialer.cdr(created_at=T0 + MINUTE + SECOND, client_id=1)
    # Run 1 still owns the failing endpoint's three: the next run takes none of it.
    assert select_cdrs(cdr_db, scheduled(2), connections=connections) == [more]
    # Once it delivers again, it gets its share.
    delivered = outcome(delivered=True)
    pause_rules.record_outcomes(cdr_db, "cdr_webhook_client_7", [delivered], **rules)
    assert len(select_cdrs(cdr_db, scheduled(3), connections=connections)) == 17
