"""Retention: finished ledger rows and endpoint events older than retention_days are deleted, in batches."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from cdr_webhook import ledger
from cdr_webhook.ledger import endpoints, schema
from cdr_webhook.selection.step import RunInfo
from cdr_webhook.selection.step import select_cdrs as claim_cdrs
from cdr_webhook.settings import Settings
from cdr_webhook.window import InvalidRunRequest
from tests.endpoint_configs import configs

NOW = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
SETTINGS = Settings(retention_days=30)


def add(conn, cdr_id: str, status: str, created: dt.datetime) -> None:
    conn.execute(
        # Queued rows belong to a live run (another run's work in progress).
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, cdr_created_at, status, dag_id, run_id) "
        "VALUES (%s, 'cdr_webhook', %s, %s, 'cdr_webhook', 'scheduled__0')",
        (cdr_id, created, status),
    )


def kept(conn) -> set[str]:
    return {row[0] for row in conn.execute("SELECT cdr_id FROM cdr_webhook.delivery").fetchall()}


def run(conn, info: RunInfo, settings: Settings = SETTINGS) -> list[dict[str, str]]:
    return claim_cdrs(conn, info, settings, now=NOW, connections=configs({"cdr_webhook": {}}))


def scheduled() -> RunInfo:
    return RunInfo("cdr_webhook", "scheduled__1", "scheduled", NOW - dt.timedelta(minutes=1), NOW, {})


def test_a_run_deletes_finished_rows_older_than_retention_and_keeps_the_queue(cdr_db):
    schema.migrate(cdr_db)
    for status in ("delivered", "failed", "skipped", "queued"):
        add(cdr_db, f"old-{status}", status, NOW - 31 * DAY)
        add(cdr_db, f"young-{status}", status, NOW - 29 * DAY)
    endpoints.pause(cdr_db, "cdr_webhook", reason="then", actor="alice")
    cdr_db.execute("UPDATE cdr_webhook.endpoint_event SET at = %s", (NOW - 40 * DAY,))
    endpoints.resume(cdr_db, "cdr_webhook", actor="bob")  # recorded now: kept

    run(cdr_db, scheduled())

    assert kept(cdr_db) == {"old-queued"} | {
        f"young-{s}" for s in ("delivered", "failed", "skipped", "queued")
    }
    assert [row[0] for row in cdr_db.execute("SELECT actor FROM cdr_webhook.endpoint_event")] == ["bob"]


def test_pruning_is_bounded_per_call_and_goes_on_where_it_stopped(cdr_db):
    schema.migrate(cdr_db)
    for n in range(25):
        add(cdr_db, f"old-{n}", "delivered", NOW - 40 * DAY)
    assert ledger.prune(cdr_db, before=NOW - 30 * DAY, limit=10) == 10
    assert ledger.prune(cdr_db, before=NOW - 30 * DAY, limit=10) == 10
    assert ledger.prune(cdr_db, before=NOW - 30 * DAY, limit=10) == 5
    assert kept(cdr_db) == set()


def test_retention_zero_keeps_everything(cdr_db):
    schema.migrate(cdr_db)
    add(cdr_db, "ancient", "delivered", NOW - 4000 * DAY)
    run(cdr_db, scheduled(), dataclasses.replace(SETTINGS, retention_days=0))
    assert kept(cdr_db) == {"ancient"}


def test_a_missing_policy_window_before_the_retention_is_refused(cdr_db):
    params = {"window_start": (NOW - 31 * DAY).isoformat(), "window_end": (NOW - 29 * DAY).isoformat()}
    manual = RunInfo("cdr_webhook", "manual__1", "manual", None, None, params)
    with pytest.raises(
        InvalidRunRequest, match=r"before what the ledger still records .* retention_days = 30"
    ):
        run(cdr_db, manual)
    deliberate = dataclasses.replace(manual, params={**params, "policy": "all"})
    assert run(cdr_db, deliberate) == []  # allowed: a redelivery on purpose
