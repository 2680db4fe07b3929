"""Retention: finished ledger rows and endpoint events older than retention_days are deleted, in batches."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from cdr_webhook import ledger
from cdr_webhook.ledger import endpoints, schema
from cdr_webhook.selection.step import RunInfo, claim_cdrs
from cdr_webhook.settings import Settings
from cdr_webhook.window import InvalidRunRequest
from demo.dialer import Dialer
from tests.support.endpoint_configs import configs

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


def manual_run(start: dt.datetime, end: dt.datetime, policy: str | None = None) -> RunInfo:
    params = {"window_start": start.isoformat(), "window_end": end.isoformat()}
    return RunInfo(
        "cdr_webhook", "manual__1", "manual", None, None, params | ({"policy": policy} if policy else {})
    )


def test_a_never_pruned_ledger_accepts_a_missing_backfill_of_last_year(cdr_db):
    """A new install backfilling last year's CDRs: nothing was ever pruned, nothing would be resent."""
    last_year = Dialer(cdr_db).cdr(created_at=NOW - 365 * DAY, client_id=1)
    claimed = run(cdr_db, manual_run(NOW - 366 * DAY, NOW - 364 * DAY))
    assert [cdr_id for claim in claimed for cdr_id in claim["cdr_ids"]] == [last_year]
    assert ledger.pruned(cdr_db) == ledger.Pruned(before=None, known=True)


def test_after_pruning_a_missing_window_before_the_pruned_bound_is_refused(cdr_db):
    schema.migrate(cdr_db)
    add(cdr_db, "old", "delivered", NOW - 31 * DAY)
    run(cdr_db, scheduled())  # prunes "old": the ledger no longer records before NOW - 30 days
    assert ledger.pruned(cdr_db) == ledger.Pruned(before=NOW - 30 * DAY, known=True)

    with pytest.raises(
        InvalidRunRequest, match=r"before what the ledger still records .*pruned by retention.*policy: all"
    ):
        run(cdr_db, manual_run(NOW - 31 * DAY, NOW - 29 * DAY))
    assert run(cdr_db, manual_run(NOW - 31 * DAY, NOW - 29 * DAY, "all")) == []  # a redelivery on purpose
    assert run(cdr_db, manual_run(NOW - 30 * DAY, NOW - 29 * DAY)) == []  # after the bound: allowed
    # Even with retention turned off since, what was pruned stays pruned.
    with pytest.raises(InvalidRunRequest, match="pruned by retention"):
        run(
            cdr_db,
            manual_run(NOW - 31 * DAY, NOW - 29 * DAY),
            dataclasses.replace(SETTINGS, retention_days=0),
        )


def test_a_prune_that_deletes_nothing_records_nothing(cdr_db):
    schema.migrate(cdr_db)
    add(cdr_db, "young", "delivered", NOW - 29 * DAY)
    assert ledger.prune(cdr_db, before=NOW - 30 * DAY) == 0
    assert ledger.pruned(cdr_db).before is None
    assert ledger.prune(cdr_db, before=NOW - 20 * DAY) == 1
    assert ledger.prune(cdr_db, before=NOW - 25 * DAY) == 0  # an earlier bound never lowers it
    assert ledger.pruned(cdr_db).before == NOW - 20 * DAY


def test_an_install_of_unknown_pruning_is_checked_by_retention_days_until_its_next_prune(cdr_db):
    from tests.support.ledger_schema import install_up_to

    install_up_to(cdr_db, 8)
    add(cdr_db, "from-an-older-release", "delivered", NOW - 10 * DAY)
    schema.migrate(cdr_db)
    assert ledger.pruned(cdr_db) == ledger.Pruned(before=None, known=False)
    window = manual_run(NOW - 31 * DAY, NOW - 29 * DAY)
    with pytest.raises(InvalidRunRequest, match="retention_days = 30"):
        claim_cdrs(cdr_db, window, SETTINGS, now=NOW, connections=configs({"cdr_webhook": {}}))
    ledger.prune(cdr_db, before=NOW - 30 * DAY)  # deletes nothing, but now the bound is known
    assert ledger.pruned(cdr_db) == ledger.Pruned(before=NOW - 30 * DAY, known=True)
