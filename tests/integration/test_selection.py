"""Selection and claiming against a real PostgreSQL: watermark, lag, overflow, windows, concurrency."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from decimal import Decimal

import psycopg
import pytest

from cdr_webhook import ledger
from cdr_webhook.ledger import backlog, schema
from cdr_webhook.selection import checks
from cdr_webhook.selection.step import RunInfo, claim_cdrs
from cdr_webhook.settings import Settings
from cdr_webhook.window import InvalidRunRequest
from demo.dialer import Dialer
from tests.support.endpoint_configs import configs
from tests.support.source_feed import add_feed_row, create_feed

T0 = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)
SETTINGS = Settings(lag_seconds=60, max_cdrs_per_run=500)
CONNECTIONS = {"cdr_webhook": {}}  # the Airflow connections that exist, with their extras


def select_cdrs(conn, run, settings, *, now, connections=None):
    return claim_cdrs(conn, run, settings, now=now, connections=configs(connections or CONNECTIONS))


def scheduled(run: int, start: dt.datetime, end: dt.datetime) -> RunInfo:
    return RunInfo("cdr_webhook", f"scheduled__{run}", "scheduled", start, end, {})


def manual(run: str, **params) -> RunInfo:
    return RunInfo("cdr_webhook", f"manual__{run}", "manual", None, None, params)


def ids(mapped: list[dict[str, str]]) -> list[str]:
    return [cdr_id for item in mapped for cdr_id in item["cdr_ids"]]


def ledger_rows(conn) -> dict[str, tuple]:
    rows = conn.execute("SELECT cdr_id, status, run_id, error FROM cdr_webhook.delivery").fetchall()
    return {row[0]: row[1:] for row in rows}


def watermark(conn) -> dt.datetime | None:
    row = conn.execute("SELECT created_at FROM cdr_webhook.watermark").fetchone()
    return row[0] if row else None


def finish(conn, cdr_ids, status: str) -> None:
    conn.execute(
        "UPDATE cdr_webhook.delivery SET status = %s WHERE cdr_id = ANY(%s)", (status, list(cdr_ids))
    )


def test_first_run_starts_at_its_interval_and_history_is_left_to_backfill(cdr_db):
    dialer = Dialer(cdr_db)
    old = dialer.cdr(created_at=T0 - dt.timedelta(hours=2))
    new = [dialer.cdr(created_at=T0 + dt.timedelta(seconds=s)) for s in (5, 30)]
    later = dialer.cdr(created_at=T0 + 2 * MINUTE)

    mapped = select_cdrs(cdr_db, scheduled(1, T0, T0 + MINUTE), SETTINGS, now=T0 + 2 * MINUTE)

    assert ids(mapped) == new
    assert all(item["http_conn_id"] == "cdr_webhook" for item in mapped)
    assert old not in ledger_rows(cdr_db)
    assert later not in ledger_rows(cdr_db)
    assert watermark(cdr_db) == T0 + MINUTE


def test_start_from_sends_history_on_the_first_run(cdr_db):
    dialer = Dialer(cdr_db)
    old = dialer.cdr(created_at=T0 - dt.timedelta(hours=2))
    settings = dataclasses.replace(SETTINGS, start_from=T0 - dt.timedelta(days=1))
    assert ids(select_cdrs(cdr_db, scheduled(1, T0, T0 + MINUTE), settings, now=T0 + MINUTE)) == [old]


def test_late_commit_within_the_lag_is_still_delivered(cdr_db):
    dialer = Dialer(cdr_db)
    first = dialer.cdr(created_at=T0 + dt.timedelta(seconds=10))
    assert ids(select_cdrs(cdr_db, scheduled(1, T0, T0 + MINUTE), SETTINGS, now=T0 + MINUTE)) == [first]
    # A transaction that began before the first run ends commits afterwards: its created_at is
    # earlier than the watermark, but within lag_seconds of it.
    late = dialer.cdr(created_at=T0 + dt.timedelta(seconds=50))
    fresh = dialer.cdr(created_at=T0 + MINUTE + dt.timedelta(seconds=5))
    second = select_cdrs(cdr_db, scheduled(2, T0 + MINUTE, T0 + 2 * MINUTE), SETTINGS, now=T0 + 2 * MINUTE)
    assert ids(second) == [late, fresh]
    assert watermark(cdr_db) == T0 + 2 * MINUTE


def test_overflow_waits_in_the_ledger_and_is_sent_by_the_next_runs(cdr_db):
    dialer = Dialer(cdr_db)
    cdrs = [dialer.cdr(created_at=T0 + dt.timedelta(seconds=s)) for s in range(1, 8)]
    settings = dataclasses.replace(SETTINGS, max_cdrs_per_run=3)

    runs = [
        select_cdrs(
            cdr_db, scheduled(n, T0 + (n - 1) * MINUTE, T0 + n * MINUTE), settings, now=T0 + n * MINUTE
        )
        for n in (1, 2, 3, 4)
    ]

    assert [ids(run) for run in runs] == [cdrs[0:3], cdrs[3:6], cdrs[6:7], []]
    assert {row[0] for row in ledger_rows(cdr_db).values()} == {"queued"}
    assert len(ledger_rows(cdr_db)) == 7


def test_the_backlog_in_the_log_is_counted_up_to_a_bound(cdr_db, monkeypatch, caplog):
    # Every run logs it: an exact count of a big backlog would read every queued row, every run.
    dialer = Dialer(cdr_db)
    for s in range(1, 8):
        dialer.cdr(created_at=T0 + dt.timedelta(seconds=s))
    settings = dataclasses.replace(SETTINGS, max_cdrs_per_run=1)
    monkeypatch.setattr(ledger.assignment, "BACKLOG_COUNT_LIMIT", 5)
    caplog.set_level("INFO", logger="cdr_webhook.selection")

    select_cdrs(cdr_db, scheduled(1, T0, T0 + MINUTE), settings, now=T0 + MINUTE)
    assert "; at least 5 queued CDR(s) wait for later runs" in caplog.text
    monkeypatch.setattr(ledger.assignment, "BACKLOG_COUNT_LIMIT", 100)
    assert ledger.queued_backlog(cdr_db) == 6
    two = dataclasses.replace(settings, max_cdrs_per_run=2)
    select_cdrs(cdr_db, scheduled(2, T0 + MINUTE, T0 + 2 * MINUTE), two, now=T0 + 2 * MINUTE)
    assert "; 4 queued CDR(s) wait for later runs" in caplog.text


def test_two_runs_at_once_never_claim_the_same_cdr(cdr_db, cdr_dsn):
    dialer = Dialer(cdr_db)
    cdrs = {dialer.cdr(created_at=T0 + dt.timedelta(milliseconds=10 * n)) for n in range(200)}
    settings = dataclasses.replace(SETTINGS, max_cdrs_per_run=150)
    barrier = threading.Barrier(2)
    results: dict[str, list[str]] = {}

    def run(name: str, info: RunInfo) -> None:
        with psycopg.connect(cdr_dsn, autocommit=True) as conn:
            barrier.wait()
            results[name] = ids(select_cdrs(conn, info, settings, now=T0 + MINUTE))

    threads = [
        threading.Thread(target=run, args=("a", scheduled(1, T0, T0 + MINUTE))),
        threading.Thread(
            target=run,
            args=("b", manual("b", window_start=T0.isoformat(), window_end=(T0 + MINUTE).isoformat())),
        ),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not set(results["a"]) & set(results["b"])
    assert set(results["a"]) | set(results["b"]) == cdrs


def test_cleared_select_maps_exactly_what_its_run_claimed(cdr_db):
    dialer = Dialer(cdr_db)
    first = [dialer.cdr(created_at=T0 + dt.timedelta(seconds=s)) for s in (1, 2)]
    run = scheduled(1, T0, T0 + MINUTE)
    assert ids(select_cdrs(cdr_db, run, SETTINGS, now=T0 + MINUTE)) == first
    dialer.cdr(created_at=T0 + dt.timedelta(seconds=3))  # arrives after the run claimed
    finish(cdr_db, first[:1], "delivered")

    again = select_cdrs(cdr_db, run, SETTINGS, now=T0 + MINUTE)

    assert ids(again) == first


@pytest.mark.parametrize("batch", [1000, 2], ids=["one-read", "read-in-batches-of-2"])
def test_rows_that_cannot_be_mapped_are_skipped_with_the_reason(cdr_db, monkeypatch, batch):
    monkeypatch.setattr(checks, "_CHECK_BATCH", batch)
    create_feed(cdr_db)

    def add(cdr_id, second, **overrides):
        add_feed_row(cdr_db, cdr_id, T0 + dt.timedelta(seconds=second), **{"call_date": T0, **overrides})

    add("good-1", 1)
    add(None, 2)
    add("nan-cost", 3, cost=Decimal("NaN"))
    add("no-phone", 4, phone_number=None)
    add("uneven", 5, list_phonebook_name=["a", "b"])
    add("good-2", 6)
    settings = dataclasses.replace(SETTINGS, source_relation="public.cdr_feed")

    mapped = select_cdrs(cdr_db, scheduled(1, T0, T0 + MINUTE), settings, now=T0 + MINUTE)

    assert ids(mapped) == ["good-1", "good-2"]
    rows = ledger_rows(cdr_db)
    assert rows["nan-cost"][0] == "skipped"
    assert "column cost = Decimal('NaN'): must be a finite number" in rows["nan-cost"][2]
    assert "column phone_number = None: must not be NULL" in rows["no-phone"][2]
    assert "list_phonebook_name" in rows["uneven"][2]
    null_rows = [row for key, row in rows.items() if key.startswith(ledger.NULL_CDR_ID_PREFIX)]
    assert len(null_rows) == 1
    assert null_rows[0][0] == "skipped"
    assert "column cdr_id is NULL in public.cdr_feed" in null_rows[0][2]
    # Read again (the next run's lag re-read): nothing is recorded twice, nothing new is sent.
    assert (
        select_cdrs(cdr_db, scheduled(2, T0 + MINUTE, T0 + 2 * MINUTE), settings, now=T0 + 2 * MINUTE) == []
    )
    assert len(ledger_rows(cdr_db)) == 6


def test_stale_claims_become_eligible_again(cdr_db):
    dialer = Dialer(cdr_db)
    cdr = dialer.cdr(created_at=T0 + dt.timedelta(seconds=1))
    assert ids(select_cdrs(cdr_db, scheduled(1, T0, T0 + MINUTE), SETTINGS, now=T0 + MINUTE)) == [cdr]
    # Run 1 dies: its claim stays queued. While it is fresh, nobody else takes it.
    assert (
        select_cdrs(cdr_db, scheduled(2, T0 + MINUTE, T0 + 2 * MINUTE), SETTINGS, now=T0 + 2 * MINUTE) == []
    )
    cdr_db.execute(
        "UPDATE cdr_webhook.delivery SET updated_at = now() - make_interval(secs => %s)",
        (SETTINGS.claim_timeout_seconds + 1,),
    )

    taken = select_cdrs(cdr_db, scheduled(3, T0 + 2 * MINUTE, T0 + 3 * MINUTE), SETTINGS, now=T0 + 3 * MINUTE)

    assert ids(taken) == [cdr]
    assert ledger_rows(cdr_db)[cdr][1] == "scheduled__3"


def test_window_policies(cdr_db):
    dialer = Dialer(cdr_db)
    delivered, failed, never, other_client = (
        dialer.cdr(created_at=T0 + dt.timedelta(seconds=1)),
        dialer.cdr(created_at=T0 + dt.timedelta(seconds=2)),
        dialer.cdr(created_at=T0 + dt.timedelta(seconds=3)),
        dialer.cdr(client_id=8, created_at=T0 + dt.timedelta(seconds=4)),
    )
    outside = dialer.cdr(created_at=T0 + 10 * MINUTE)
    window = {"window_start": T0.isoformat(), "window_end": (T0 + 5 * MINUTE).isoformat()}
    now = T0 + dt.timedelta(hours=1)
    schema.migrate(cdr_db)
    cdr_db.execute("INSERT INTO cdr_webhook.watermark VALUES ('cdr_webhook_source', %s)", (T0,))
    for cdr, status in ((delivered, "delivered"), (failed, "failed")):
        cdr_db.execute(
            "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status) "
            "SELECT cdr_id, 'cdr_webhook', client_id, created_at, %s FROM cdr_webhook_source "
            "WHERE cdr_id = %s",
            (status, cdr),
        )

    assert ids(select_cdrs(cdr_db, manual("m1", **window), SETTINGS, now=now)) == [never, other_client]
    assert select_cdrs(cdr_db, manual("m2", **window), SETTINGS, now=now) == []
    assert ids(select_cdrs(cdr_db, manual("f1", policy="failed", **window), SETTINGS, now=now)) == [failed]
    finish(cdr_db, [never, other_client, failed], "delivered")
    assert ids(select_cdrs(cdr_db, manual("a1", policy="all", client_id=1, **window), SETTINGS, now=now)) == [
        delivered,
        failed,
        never,
    ]
    assert outside not in ledger_rows(cdr_db)
    assert watermark(cdr_db) == T0  # window runs never move it


def test_window_run_with_a_bad_request_claims_nothing(cdr_db):
    Dialer(cdr_db).cdr(created_at=T0)
    with pytest.raises(InvalidRunRequest, match="give both Params window_start and window_end"):
        select_cdrs(cdr_db, manual("x"), SETTINGS, now=T0 + MINUTE)
    assert ledger_rows(cdr_db) == {}


def test_a_task_cannot_send_a_cdr_another_live_run_owns(cdr_db):
    dialer = Dialer(cdr_db)
    cdr = dialer.cdr(created_at=T0 + dt.timedelta(seconds=1))
    select_cdrs(cdr_db, scheduled(1, T0, T0 + MINUTE), SETTINGS, now=T0 + MINUTE)
    common = {
        "cdr_ids": [cdr],
        "endpoint": "cdr_webhook",
        "dag_id": "cdr_webhook",
        "map_index": 0,
        "claim_timeout_seconds": 3600,
    }

    claims, lost = ledger.start_attempts(cdr_db, run_id="scheduled__9", **common)
    assert claims == []
    assert "is being delivered by run 'scheduled__1'" in lost[cdr].reason
    [claim], lost = ledger.start_attempts(cdr_db, run_id="scheduled__1", **common)
    assert (claim.cdr_id, lost) == (cdr, {})
    finish(cdr_db, [cdr], "failed")
    # Finished, it still belongs to its run: only a clear of that run's task sends it again.
    claims, lost = ledger.start_attempts(cdr_db, run_id="scheduled__9", **common)
    assert claims == []
    assert "belongs to run 'scheduled__1', map index 0 (status failed)" in lost[cdr].reason
    [claim], _ = ledger.start_attempts(cdr_db, run_id="scheduled__1", **common)
    assert claim.status == "queued"


def test_a_run_cleared_with_new_params_selects_anew(cdr_db):
    """A reprocessing backfill clears existing runs and may give them new Params (and run type)."""
    dialer = Dialer(cdr_db)
    sent = dialer.cdr(created_at=T0 + dt.timedelta(seconds=1))
    run = scheduled(1, T0, T0 + MINUTE)
    assert ids(select_cdrs(cdr_db, run, SETTINGS, now=T0 + MINUTE)) == [sent]
    finish(cdr_db, [sent], "delivered")
    missed = dialer.cdr(created_at=T0 + dt.timedelta(seconds=2))  # committed too late for run 1's scan
    cdr_db.execute("UPDATE cdr_webhook.watermark SET created_at = %s", (T0 + 10 * MINUTE,))
    later = T0 + dt.timedelta(hours=1)

    # `airflow backfill create --reprocess-behavior completed` turns it into a backfill run:
    as_backfill = dataclasses.replace(run, run_type="backfill")
    assert ids(select_cdrs(cdr_db, as_backfill, SETTINGS, now=later)) == [missed]
    # cleared again with the same request: the same claims, nothing new
    assert ids(select_cdrs(cdr_db, as_backfill, SETTINGS, now=later)) == [missed]
    # and with policy=failed, only failures of its interval
    finish(cdr_db, [missed], "failed")
    as_failed = dataclasses.replace(as_backfill, params={"policy": "failed"})
    assert ids(select_cdrs(cdr_db, as_failed, SETTINGS, now=later)) == [missed]


def test_chunk_mode_maps_chunks_and_gives_back_those_beyond_the_map_length(cdr_db):
    """Three endpoints, one chunk each; with room for two tasks, the third's CDRs wait for the next run."""
    dialer = Dialer(cdr_db)
    made = {
        client: [
            dialer.cdr(client_id=client, created_at=T0 + dt.timedelta(seconds=n + client)) for n in range(3)
        ]
        for client in (1, 7, 8)
    }
    connections = {"cdr_webhook": {}, "cdr_webhook_client_7": {}, "cdr_webhook_client_8": {}}
    settings = dataclasses.replace(SETTINGS, start_from=T0, cdrs_per_task=2)

    def run(n: int) -> list[dict]:
        return claim_cdrs(
            cdr_db,
            scheduled(n, T0 + (n - 1) * MINUTE, T0 + n * MINUTE),
            settings,
            now=T0 + n * MINUTE + MINUTE,
            connections=configs(connections),
            cdrs_per_task=2,
            max_tasks=2,
        )

    first = run(1)
    # Round robin, oldest first: each endpoint's first chunk; a chunk holds one endpoint's CDRs.
    assert first == [
        {"cdr_ids": made[1][:2], "http_conn_id": "cdr_webhook"},
        {"cdr_ids": made[7][:2], "http_conn_id": "cdr_webhook_client_7"},
    ]
    rows = ledger_rows(cdr_db)
    assert {rows[cdr][:2] for cdr in made[8]} == {("queued", None)}  # given back, unowned
    second = run(2)
    assert {"cdr_ids": made[8][:2], "http_conn_id": "cdr_webhook_client_8"} in second
    third = run(3)
    sent = [cdr for chunk in first + second + third for cdr in chunk["cdr_ids"]]
    assert sorted(sent) == sorted(cdr for cdrs in made.values() for cdr in cdrs)  # each once, none lost
    assert run(4) == []


def backlog_rows(conn) -> list[tuple]:
    return conn.execute(
        "SELECT endpoint, bucket, queued, in_flight, retrying FROM cdr_webhook.endpoint_backlog "
        "ORDER BY bucket, endpoint"
    ).fetchall()


def backlog_in_ledger(conn, endpoint: str) -> tuple[int, int, int]:
    """The backlog counted here from the rows themselves: unclaimed, claimed and untried, retrying."""
    rows = conn.execute(
        "SELECT run_id, attempts FROM cdr_webhook.delivery WHERE endpoint = %s AND status = 'queued'",
        (endpoint,),
    ).fetchall()
    return (
        sum(1 for run_id, attempts in rows if attempts == 0 and run_id is None),
        sum(1 for run_id, attempts in rows if attempts == 0 and run_id is not None),
        sum(1 for _, attempts in rows if attempts > 0),
    )


def test_the_first_run_of_a_bucket_writes_the_backlog_and_the_others_do_not(cdr_db):
    dialer = Dialer(cdr_db)
    cdrs = [dialer.cdr(created_at=T0 + dt.timedelta(seconds=s)) for s in range(1, 8)]
    settings = dataclasses.replace(SETTINGS, max_cdrs_per_run=3)

    select_cdrs(cdr_db, scheduled(1, T0, T0 + MINUTE), settings, now=T0 + MINUTE)
    after_first = backlog_in_ledger(cdr_db, "cdr_webhook")
    assert after_first == (4, 3, 0)
    bucket = T0  # 09:01 is in 09:00's 5 minutes
    assert backlog_rows(cdr_db) == [("cdr_webhook", bucket, *after_first)]

    # Later runs of the same bucket find it taken: the rows stay what the first run saw.
    cdr_db.execute("UPDATE cdr_webhook.delivery SET attempts = 1 WHERE cdr_id = %s", (cdrs[0],))
    select_cdrs(cdr_db, scheduled(2, T0 + MINUTE, T0 + 2 * MINUTE), settings, now=T0 + 2 * MINUTE)
    select_cdrs(cdr_db, scheduled(3, T0 + 2 * MINUTE, T0 + 4 * MINUTE), settings, now=T0 + 4 * MINUTE)
    assert backlog_rows(cdr_db) == [("cdr_webhook", bucket, *after_first)]
    # Not counted again either: a new endpoint's queued row would have a row of its own.
    cdr_db.execute(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, cdr_created_at, status) "
        "VALUES ('other', 'elsewhere', now(), 'queued')"
    )
    assert backlog.snapshot_backlog(cdr_db, now=T0 + 4 * MINUTE) is False
    assert backlog_rows(cdr_db) == [("cdr_webhook", bucket, *after_first)]
    cdr_db.execute("DELETE FROM cdr_webhook.delivery WHERE cdr_id = 'other'")

    # The next bucket's first run writes again.
    select_cdrs(cdr_db, scheduled(4, T0 + 4 * MINUTE, T0 + 5 * MINUTE), settings, now=T0 + 5 * MINUTE)
    now_in_ledger = backlog_in_ledger(cdr_db, "cdr_webhook")
    assert now_in_ledger == (0, 6, 1)
    assert backlog_rows(cdr_db)[1:] == [("cdr_webhook", T0 + 5 * MINUTE, *now_in_ledger)]


def test_an_empty_backlog_writes_no_row(cdr_db):
    dialer = Dialer(cdr_db)
    cdrs = [dialer.cdr(created_at=T0 + dt.timedelta(seconds=s)) for s in range(1, 3)]
    select_cdrs(cdr_db, scheduled(1, T0, T0 + MINUTE), SETTINGS, now=T0 + MINUTE)
    finish(cdr_db, cdrs, "delivered")
    select_cdrs(cdr_db, scheduled(2, T0 + 5 * MINUTE, T0 + 6 * MINUTE), SETTINGS, now=T0 + 6 * MINUTE)
    # The bucket is taken (no later run counts again), and no endpoint has a row in it.
    assert cdr_db.execute("SELECT bucket FROM cdr_webhook.backlog_snapshot").fetchone() == (T0 + 5 * MINUTE,)
    assert [row[1] for row in backlog_rows(cdr_db)] == [T0]


def test_a_failed_snapshot_is_logged_and_the_run_goes_on(cdr_db, caplog):
    dialer = Dialer(cdr_db)
    cdrs = [dialer.cdr(created_at=T0 + dt.timedelta(seconds=s)) for s in range(1, 3)]
    schema.migrate(cdr_db)
    cdr_db.execute("ALTER TABLE cdr_webhook.endpoint_backlog RENAME TO endpoint_backlog_away")
    caplog.set_level("WARNING", logger="cdr_webhook.selection")

    mapped = select_cdrs(cdr_db, scheduled(1, T0, T0 + MINUTE), SETTINGS, now=T0 + MINUTE)

    assert ids(mapped) == cdrs
    assert "The backlog snapshot of 2026-11-28T09:00:00+00:00 is not written" in caplog.text
    assert "UndefinedTable" in caplog.text
    # Nothing of it stays: the next run of the bucket takes it.
    assert cdr_db.execute("SELECT bucket FROM cdr_webhook.backlog_snapshot").fetchall() == []
    cdr_db.execute("ALTER TABLE cdr_webhook.endpoint_backlog_away RENAME TO endpoint_backlog")
    select_cdrs(cdr_db, scheduled(2, T0 + MINUTE, T0 + 2 * MINUTE), SETTINGS, now=T0 + 2 * MINUTE)
    assert backlog_rows(cdr_db) == [("cdr_webhook", T0, 0, 2, 0)]
