"""Schema migrations against a real PostgreSQL: an install from before versioning, re-runs, concurrency."""

from __future__ import annotations

import threading

import psycopg

from cdr_webhook.ledger import rates, schema
from tests.support.ledger_schema import columns, indexes, install_up_to, versions


def test_an_install_from_before_versioning_is_migrated_and_keeps_its_rows(cdr_db):
    # What ledger.ensure_schema and endpoints.ensure_endpoint_schema made, with a few rows in it.
    cdr_db.execute(schema.STEPS[0].ddl)
    cdr_db.execute(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, cdr_created_at, status) "
        "VALUES ('a', 'cdr_webhook', '2026-11-28T09:00:00Z', 'delivered'), "
        "('b', 'cdr_webhook', '2026-11-28T09:00:01Z', 'queued')"
    )
    cdr_db.execute(
        "INSERT INTO cdr_webhook.watermark (source_relation, created_at) "
        "VALUES ('cdr_webhook_source', '2026-11-28T09:01:00Z')"
    )
    cdr_db.execute(
        "INSERT INTO cdr_webhook.endpoint_state (endpoint, paused, reason) VALUES ('ep', true, 'by hand')"
    )
    assert schema.current_version(cdr_db) == 0

    assert schema.migrate(cdr_db) == schema.LATEST

    assert versions(cdr_db) == [step.version for step in schema.STEPS]
    assert "delivery_queued_endpoint_idx" in indexes(cdr_db)
    assert {"scanned_from", "reconciled_at"} <= columns(cdr_db, "watermark")
    assert "failed_attempts" in columns(cdr_db, "endpoint_state")
    assert cdr_db.execute("SELECT cdr_id, status FROM cdr_webhook.delivery ORDER BY 1").fetchall() == [
        ("a", "delivered"),
        ("b", "queued"),
    ]
    # The scans of the old install reached its watermark: reconciliation starts from there.
    assert cdr_db.execute("SELECT scanned_from = created_at FROM cdr_webhook.watermark").fetchone() == (True,)
    assert cdr_db.execute(
        "SELECT paused, reason, failed_attempts FROM cdr_webhook.endpoint_state"
    ).fetchone() == (True, "by hand", 0)


def test_migrate_twice_changes_nothing(cdr_db):
    assert schema.migrate(cdr_db) == schema.LATEST
    applied = cdr_db.execute("SELECT version, applied_at FROM cdr_webhook.schema_version").fetchall()
    assert schema.migrate(cdr_db) == schema.LATEST
    assert cdr_db.execute("SELECT version, applied_at FROM cdr_webhook.schema_version").fetchall() == applied


def test_concurrent_first_migrations_apply_each_step_once(cdr_db, cdr_dsn):
    barrier = threading.Barrier(2)
    results: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(cdr_dsn, autocommit=True) as conn:
                barrier.wait()
                results.append(schema.migrate(conn))
        except BaseException as err:  # reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert results == [schema.LATEST, schema.LATEST]
    assert versions(cdr_db) == [step.version for step in schema.STEPS]


def test_the_endpoint_status_index_applies_on_a_database_at_version_4(cdr_db):
    install_up_to(cdr_db, 4)
    cdr_db.execute(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, cdr_created_at, status) "
        "VALUES ('a', 'cdr_webhook', '2026-11-28T09:00:00Z', 'failed')"
    )
    assert schema.current_version(cdr_db) == 4
    assert "delivery_endpoint_status_idx" not in indexes(cdr_db)

    assert schema.migrate(cdr_db) == schema.LATEST

    assert versions(cdr_db) == [step.version for step in schema.STEPS]
    assert "delivery_endpoint_status_idx" in indexes(cdr_db)
    assert cdr_db.execute("SELECT cdr_id, status FROM cdr_webhook.delivery").fetchall() == [("a", "failed")]


def test_step_9_records_retention_as_unknown_on_a_ledger_with_rows_and_as_never_pruned_on_an_empty_one(
    cdr_db,
):
    install_up_to(cdr_db, 8)
    cdr_db.execute(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, cdr_created_at, status) "
        "VALUES ('a', 'cdr_webhook', '2026-11-28T09:00:00Z', 'delivered')"
    )
    assert schema.migrate(cdr_db) == schema.LATEST
    assert cdr_db.execute("SELECT pruned_before, known FROM cdr_webhook.retention").fetchall() == [
        (None, False)
    ]
    assert cdr_db.execute("SELECT count(*) FROM cdr_webhook.delivery").fetchone()[0] == 1

    cdr_db.execute("DROP SCHEMA cdr_webhook CASCADE")
    install_up_to(cdr_db, 8)
    schema.migrate(cdr_db)
    assert cdr_db.execute("SELECT pruned_before, known FROM cdr_webhook.retention").fetchall() == [
        (None, True)
    ]


def test_step_15_adds_the_owner_alert_outbox_owed_by_every_pause_and_resume_but_not_a_test(cdr_db):
    install_up_to(cdr_db, 14)
    cdr_db.execute(
        "INSERT INTO cdr_webhook.endpoint_event (endpoint, action, reason, actor) "
        "VALUES ('cdr_webhook', 'paused', 'before the upgrade', 'bob')"
    )
    assert schema.migrate(cdr_db) == schema.LATEST
    assert 15 in versions(cdr_db)
    assert "owner_alert_pending_idx" in indexes(cdr_db)
    # An event from before the outbox owes nothing: its owner was never promised an alert.
    assert cdr_db.execute("SELECT count(*) FROM cdr_webhook.owner_alert").fetchone()[0] == 0

    cdr_db.execute(
        "INSERT INTO cdr_webhook.endpoint_event (endpoint, action, reason, actor) VALUES "
        "('cdr_webhook', 'resumed', NULL, 'bob'), ('cdr_webhook', 'tested', 'delivered', 'bob')"
    )
    with cdr_db.transaction():  # a pause rolled back owes nothing
        cdr_db.execute(
            "INSERT INTO cdr_webhook.endpoint_event (endpoint, action, reason, actor) "
            "VALUES ('cdr_webhook', 'paused', 'rolled back', 'bob')"
        )
        raise psycopg.Rollback  # the pause's transaction fails
    rows = cdr_db.execute(
        "SELECT kind, reason, actor, status FROM cdr_webhook.owner_alert ORDER BY id"
    ).fetchall()
    assert rows == [("resumed", None, "bob", "pending")]


def test_step_16_adds_the_shared_oauth2_token_table_to_a_database_at_version_14_keeping_its_rows(cdr_db):
    install_up_to(cdr_db, 14)
    cdr_db.execute(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, cdr_created_at, status) "
        "VALUES ('a', 'cdr_webhook', '2026-11-28T09:00:00Z', 'queued')"
    )
    cdr_db.execute("INSERT INTO cdr_webhook.endpoint_state (endpoint, paused) VALUES ('cdr_webhook', true)")

    assert schema.migrate(cdr_db) == schema.LATEST

    assert 16 in versions(cdr_db)
    assert columns(cdr_db, "oauth2_token") == {
        "endpoint", "token", "fetched_at", "expires_at", "fetches", "updated_at"
    }  # fmt: skip
    assert cdr_db.execute("SELECT cdr_id, status FROM cdr_webhook.delivery").fetchall() == [("a", "queued")]
    assert cdr_db.execute("SELECT paused FROM cdr_webhook.endpoint_state").fetchall() == [(True,)]
    cdr_db.execute("INSERT INTO cdr_webhook.oauth2_token (endpoint) VALUES ('cdr_webhook')")
    assert cdr_db.execute("SELECT token, fetches FROM cdr_webhook.oauth2_token").fetchall() == [(None, 0)]


def test_step_17_adds_the_pace_table_to_a_database_at_version_16_and_keeps_its_rows(cdr_db):
    install_up_to(cdr_db, 16)
    cdr_db.execute(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, cdr_created_at, status) "
        "VALUES ('a', 'cdr_webhook', '2026-11-28T09:00:00Z', 'queued')"
    )
    assert cdr_db.execute("SELECT to_regclass('cdr_webhook.endpoint_pace')").fetchone()[0] is None

    assert schema.migrate(cdr_db) == schema.LATEST

    assert 17 in versions(cdr_db)
    assert columns(cdr_db, "endpoint_pace") == {"endpoint", "next_at", "updated_at"}
    assert cdr_db.execute("SELECT cdr_id, status FROM cdr_webhook.delivery").fetchall() == [("a", "queued")]
    # The endpoint's first reservation makes its row; the next one starts a spacing after it.
    assert rates.reserve(cdr_db, "cdr_webhook", wanted=2, spacing=0.5, within=10).offsets == [0.0, 0.5]
    [third] = rates.reserve(cdr_db, "cdr_webhook", wanted=1, spacing=0.5, within=10).offsets
    assert 0.9 < third <= 1.0
