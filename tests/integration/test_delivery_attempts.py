"""Schema step 6: one history row per attempt, whatever statement counted it; the upgrade from step 5."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from bench.records import attempt
from cdr_webhook import ledger
from cdr_webhook.ledger import schema
from cdr_webhook.outcome import Attempt, PostResult, decide_attempt
from tests.support.ledger_schema import indexes, install_up_to, versions

if TYPE_CHECKING:
    import psycopg

CREATED = dt.datetime(2026, 11, 28, 9, tzinfo=dt.UTC)


def history(conn: psycopg.Connection[Any], cdr_id: str) -> list[tuple]:
    return conn.execute(
        "SELECT attempt, status, http_status, error, run_id, map_index FROM cdr_webhook.delivery_attempt "
        "WHERE cdr_id = %s ORDER BY attempt",
        (cdr_id,),
    ).fetchall()


def queue(conn: psycopg.Connection[Any], *cdr_ids: str) -> list[ledger.Claim]:
    for cdr_id in cdr_ids:
        conn.execute(
            "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, cdr_created_at, dag_id, run_id, map_index) "
            "VALUES (%s, 'cdr_webhook', %s, 'cdr_webhook', 'manual__1', 0)",
            (cdr_id, CREATED),
        )
    return [ledger.Claim(c, "cdr_webhook", None, CREATED, "queued", 0) for c in cdr_ids]


def test_step_6_upgrades_a_database_at_step_5_and_keeps_its_rows(cdr_db):
    install_up_to(cdr_db, 5)
    cdr_db.execute(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, cdr_created_at, status, attempts, http_status) "
        "VALUES ('old', 'cdr_webhook', %s, 'failed', 3, 400)",
        (CREATED,),
    )

    assert schema.migrate(cdr_db) == schema.LATEST

    assert versions(cdr_db)[:6] == [1, 2, 3, 4, 5, 6]
    assert {"delivery_client_list_idx", "delivery_endpoint_list_idx", "delivery_status_list_idx"} <= indexes(
        cdr_db
    )
    assert cdr_db.execute("SELECT status, attempts FROM cdr_webhook.delivery").fetchall() == [("failed", 3)]
    assert history(cdr_db, "old") == []  # attempts before step 6 are only summed up on the row
    old = ledger.Claim("old", "cdr_webhook", None, CREATED, "failed", 3)
    ledger.record_attempts(cdr_db, [attempt(old, "delivered", 200, None, "ok", 5)])
    assert history(cdr_db, "old") == [(4, "delivered", 200, None, None, None)]


def test_every_attempt_of_the_operators_write_path_is_kept(cdr_db):
    schema.migrate(cdr_db)
    [claim] = queue(cdr_db, "a")
    for status, http, error in [("queued", 503, "HTTP 503"), ("failed", 400, "HTTP 400")]:
        ledger.record_attempts(cdr_db, [attempt(claim, status, http, error, None, 1)])
    assert history(cdr_db, "a") == [
        (1, "queued", 503, "HTTP 503", "manual__1", 0),
        (2, "failed", 400, "HTTP 400", "manual__1", 0),
    ]
    # Changes that are not attempts (a requeue, a release, a skip) add none.
    ledger.release_many(cdr_db, [claim], reason="paused")
    ledger.mark_skipped(cdr_db, claim, "bad row")
    assert len(history(cdr_db, "a")) == 2


def test_a_statement_that_records_many_cdrs_at_once_keeps_one_row_each(cdr_db):
    """A batched recorder (chunk mode) writes one UPDATE for many CDRs: the trigger sees each row."""
    schema.migrate(cdr_db)
    claims = queue(cdr_db, "b1", "b2", "b3")
    # What three POSTs produced, decided as a task decides them: 200, 400 (refused) and 204.
    results = [PostResult(http, None, None, latency_ms=1, sent_at=0.0) for http in (200, 400, 204)]
    ledger.record_attempts(
        cdr_db,
        [
            Attempt(claim, result, decide_attempt(result, try_number=1, max_tries=1), webhook_id=claim.cdr_id)
            for claim, result in zip(claims, results, strict=True)
        ],
    )
    assert [history(cdr_db, c) for c in ("b1", "b2", "b3")] == [
        [(1, "delivered", 200, None, "manual__1", 0)],
        [(1, "failed", 400, "HTTP 400", "manual__1", 0)],
        [(1, "delivered", 204, None, "manual__1", 0)],
    ]


def test_retention_deletes_the_history_with_its_ledger_row(cdr_db):
    schema.migrate(cdr_db)
    [claim] = queue(cdr_db, "c")
    ledger.record_attempts(cdr_db, [attempt(claim, "delivered", 200, None, None, 1)])
    assert ledger.prune(cdr_db, before=CREATED + dt.timedelta(days=1)) == 1
    assert history(cdr_db, "c") == []
