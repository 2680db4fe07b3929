"""A run's capacity shared across endpoints, against a real PostgreSQL: round robin and throttles."""

from __future__ import annotations

import datetime as dt

from cdr_webhook import ledger
from cdr_webhook.window import Window

T0 = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)


def queue(conn, endpoint: str, count: int, *, offset_ms: int = 0) -> list[str]:
    cdr_ids = [f"{endpoint}-{n:03d}" for n in range(count)]
    conn.execute(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, cdr_created_at) "
        "SELECT id, %s, %s + make_interval(secs => (%s + n * 10)::float8 / 1000) "
        "FROM unnest(%s::text[]) WITH ORDINALITY AS t(id, n)",
        (endpoint, T0, offset_ms, cdr_ids),
    )
    return cdr_ids


def assign(conn, run_id: str = "scheduled__1", **kwargs):
    claims = ledger.assign(
        conn, dag_id="cdr_webhook", run_id=run_id, claim_timeout_seconds=3600, **{"limit": 10, **kwargs}
    )
    return [claim.cdr_id for claim in claims]


def test_a_run_is_shared_round_robin_across_endpoints(db):
    big = queue(db, "big", 100)  # the older backlog
    small = queue(db, "small", 3, offset_ms=5000)

    claimed = assign(db)

    # Each endpoint's oldest, then each one's second, ...: small is not starved by big's backlog.
    assert claimed == [big[0], small[0], big[1], small[1], big[2], small[2], *big[3:7]]
    # The next run continues where this one stopped.
    assert assign(db, "scheduled__2") == big[7:17]


def test_a_throttled_endpoint_gets_no_more_than_its_cap_in_flight(db):
    slow = queue(db, "slow", 20)
    other = queue(db, "other", 20, offset_ms=1)
    # One slow CDR is in flight in another live run; one more belongs to a run that died long ago.
    db.execute(
        "UPDATE cdr_webhook.delivery SET dag_id = 'cdr_webhook', run_id = 'scheduled__0', "
        "updated_at = now() WHERE cdr_id = %s",
        (slow[0],),
    )
    db.execute(
        "UPDATE cdr_webhook.delivery SET dag_id = 'cdr_webhook', run_id = 'scheduled__dead', "
        "updated_at = now() - interval '2 hours' WHERE cdr_id = %s",
        (slow[1],),
    )

    claimed = assign(db, throttled={"slow": 3})

    # 3 - the live one = 2 new claims for slow (the stale one is among them: it is eligible again).
    assert [cdr for cdr in claimed if cdr.startswith("slow")] == slow[1:3]
    assert [cdr for cdr in claimed if cdr.startswith("other")] == other[:8]
    # At its cap, a throttled endpoint gets nothing more until a claim finishes.
    assert [cdr for cdr in assign(db, "scheduled__2", throttled={"slow": 3})] == other[8:18]


def test_no_run_claims_a_failing_endpoints_cdrs_while_another_waits_to_retry_one(db):
    slow = queue(db, "slow", 20)
    # One slow CDR was tried and waits for its retry in a live run (Airflow keeps that run going).
    db.execute(
        "UPDATE cdr_webhook.delivery SET dag_id = 'cdr_webhook', run_id = 'scheduled__0', attempts = 1, "
        "updated_at = now() WHERE cdr_id = %s",
        (slow[0],),
    )

    # Room for 2 more in flight, but no second run is to be held by its retries: none.
    assert assign(db, throttled={"slow": 3}) == []
    # Not failing (its last attempt succeeded since), it is claimed as usual.
    assert assign(db, "scheduled__2") == slow[1:11]
    # Once the retry has ended, a run takes up to the cap again.
    db.execute("UPDATE cdr_webhook.delivery SET status = 'failed' WHERE cdr_id = %s", (slow[0],))
    db.execute(
        "UPDATE cdr_webhook.delivery SET status = 'queued', run_id = NULL WHERE run_id = 'scheduled__2'"
    )
    assert assign(db, "scheduled__3", throttled={"slow": 3}) == slow[1:4]


def test_paused_endpoints_and_windows_still_apply(db):
    queue(db, "paused", 5)
    live = queue(db, "live", 5, offset_ms=1)
    window = Window(start=T0, end=T0 + dt.timedelta(milliseconds=25))

    assert assign(db, paused_endpoints=["paused"], window=window) == live[:2]


def test_a_window_claim_ends_each_endpoint_at_the_window_end(db):
    # Rows are 10 ms apart. a and b have one row in the window and many after it, c has 15 in it: the
    # turns after the first are c's alone, so the run gets its whole limit.
    c = queue(db, "c", 15, offset_ms=-5)
    a, b = queue(db, "a", 11, offset_ms=185), queue(db, "b", 11, offset_ms=186)
    window = Window(start=T0, end=T0 + dt.timedelta(milliseconds=200))

    claimed = assign(db, window=window, limit=12)

    assert claimed == [c[0], a[0], b[0], *c[1:10]]
