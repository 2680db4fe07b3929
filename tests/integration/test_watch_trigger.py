"""The commit watcher's trigger against a real PostgreSQL: its ``run()`` driven directly with asyncio.

Each test runs the trigger as the triggerer does (it reads the Airflow connection ``cdr_db``, the
cdr_db fixture's database), and "restarts" it as the triggerer does after an event: a new instance
with the same kwargs, which must resume from the database, not from memory.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from typing import TYPE_CHECKING, Any

import pytest

from cdr_webhook import ledger
from cdr_webhook.ledger import schema
from cdr_webhook.selection.step import RunInfo
from cdr_webhook.selection.step import select_cdrs as claim_cdrs
from cdr_webhook.settings import Settings
from cdr_webhook.watch import notify
from cdr_webhook.watch.trigger import CdrCommitTrigger
from demo.dialer import Dialer
from tests.endpoint_configs import configs

if TYPE_CHECKING:
    import psycopg
    from airflow.triggers.base import TriggerEvent

RELATION = "cdr_webhook_source"
QUIET = 1.5  # seconds a watcher that should not fire is given to fire anyway


def watcher(interval: float = 0.2) -> CdrCommitTrigger:
    return CdrCommitTrigger(source_relation=RELATION, interval_seconds=interval)


async def _next(trigger: CdrCommitTrigger, timeout: float) -> TriggerEvent | None:
    events = trigger.run()
    try:
        return await asyncio.wait_for(anext(events), timeout)
    except TimeoutError:
        return None
    finally:
        await events.aclose()


def next_event(trigger: CdrCommitTrigger, timeout: float = 10) -> TriggerEvent | None:
    """The trigger's first event within ``timeout`` seconds, or None; the trigger is stopped after."""
    return asyncio.run(_next(trigger, timeout))


def with_watermark(conn: psycopg.Connection[Any], at: dt.datetime) -> None:
    """The ledger as a scheduled scan up to ``at`` leaves it."""
    schema.migrate(conn)
    with conn.transaction():
        ledger.lock_watermark(conn, RELATION)
        ledger.advance_watermark(conn, RELATION, at)


def db_now(conn: psycopg.Connection[Any]) -> dt.datetime:
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]


def created_at(conn: psycopg.Connection[Any], cdr_id: str) -> dt.datetime:
    row = conn.execute("SELECT created_at FROM dialer.cdr WHERE id = %s", (cdr_id,)).fetchone()
    assert row is not None
    return row[0]


def fires(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT fires FROM cdr_webhook.watch_state WHERE source_relation = %s", (RELATION,))
    found = row.fetchone()
    return found[0] if found else 0


def test_fires_once_per_new_commit_and_not_again_for_the_same_rows(cdr_db):
    dialer = Dialer(cdr_db)
    dialer.cdr()  # covered by the watermark below: a scan already read it
    with_watermark(cdr_db, db_now(cdr_db))

    assert next_event(watcher(), QUIET) is None  # idle: nothing newer than the watermark

    first = dialer.cdr()
    event = next_event(watcher())
    assert event is not None
    assert event.payload["source_relation"] == RELATION
    assert dt.datetime.fromisoformat(event.payload["newest_created_at"]) == created_at(cdr_db, first)

    # The triggerer starts the watcher again after each event: the same rows do not fire again.
    assert next_event(watcher(), QUIET) is None
    second = dialer.cdr()
    event = next_event(watcher())
    assert event is not None
    assert dt.datetime.fromisoformat(event.payload["newest_created_at"]) == created_at(cdr_db, second)
    assert fires(cdr_db) == 2


def test_a_restart_while_rows_are_pending_fires_once_and_resumes_from_the_ledger(cdr_db):
    dialer = Dialer(cdr_db)
    with_watermark(cdr_db, db_now(cdr_db))
    for _ in range(3):
        dialer.cdr()

    # A watcher crashed (or the triggerer restarted) before anything was fired: the restart fires,
    # from what the database says is new, not from memory.
    assert next_event(watcher()) is not None
    assert next_event(watcher(), QUIET) is None
    assert fires(cdr_db) == 1

    # A scan moved the watermark past new rows the watcher never saw (the schedule caught them):
    # a fresh watcher state (or none at all) does not fire for them either.
    dialer.cdr()
    cdr_db.execute("DELETE FROM cdr_webhook.watch_state")
    with_watermark(cdr_db, db_now(cdr_db))
    assert next_event(watcher(), QUIET) is None


def test_first_start_without_any_scan_leaves_history_to_backfills_and_the_event_run_scans_after_it(cdr_db):
    dialer = Dialer(cdr_db)
    history = dialer.cdr()

    assert next_event(watcher(), QUIET) is None  # no watermark yet: what is there is history
    new = dialer.cdr()
    assert next_event(watcher()) is not None

    # The run the event starts: no data interval (Airflow gives an asset-triggered run none), no
    # watermark: it scans from where the watcher started, to its own clock.
    now = dt.datetime.now(dt.UTC)
    run = RunInfo("cdr_webhook", "asset_triggered__1", "asset_triggered", None, None, {})
    mapped = claim_cdrs(cdr_db, run, Settings(), now=now, connections=configs({"cdr_webhook": {}}))

    assert [cdr_id for item in mapped for cdr_id in item["cdr_ids"]] == [new]
    assert history not in {row[0] for row in cdr_db.execute("SELECT cdr_id FROM cdr_webhook.delivery")}
    row = cdr_db.execute("SELECT created_at FROM cdr_webhook.watermark").fetchone()
    assert row is not None
    assert row[0] == now  # the watermark moves to exactly the end of what was scanned


def test_fires_are_at_least_an_interval_apart_so_a_burst_coalesces(cdr_db):
    dialer = Dialer(cdr_db)
    with_watermark(cdr_db, db_now(cdr_db))
    dialer.cdr()
    assert next_event(watcher(interval=2.0)) is not None
    began = time.monotonic()
    for _ in range(20):  # a burst right after the fire
        dialer.cdr()
    assert next_event(watcher(interval=2.0)) is not None
    assert time.monotonic() - began >= 1.5  # the rest of the 2 s gap, then one event for all 20
    assert fires(cdr_db) == 2


def test_a_full_run_asks_for_another_run_without_new_commits(cdr_db):
    dialer = Dialer(cdr_db)
    with_watermark(cdr_db, db_now(cdr_db))
    for _ in range(5):
        dialer.cdr()
    assert next_event(watcher()) is not None
    assert next_event(watcher(), QUIET) is None

    settings = Settings(max_cdrs_per_run=2)
    run = RunInfo("cdr_webhook", "asset_triggered__1", "asset_triggered", None, None, {})
    mapped = claim_cdrs(
        cdr_db, run, settings, now=dt.datetime.now(dt.UTC), connections=configs({"cdr_webhook": {}})
    )
    assert len(mapped) == 2  # three stay queued behind a full run

    event = next_event(watcher())
    assert event is not None
    assert (
        event.payload["reason"] == "queued CDRs wait for a run (a run was full, or an endpoint was resumed)"
    )


def test_resuming_an_endpoint_asks_for_a_run_for_its_queued_cdrs(cdr_db):
    from cdr_webhook.ledger import endpoints

    dialer = Dialer(cdr_db)
    with_watermark(cdr_db, db_now(cdr_db))
    dialer.cdr()
    assert next_event(watcher()) is not None
    endpoints.pause(cdr_db, "cdr_webhook", reason="receiver down", actor="noc")
    assert next_event(watcher(), QUIET) is None  # pausing asks for nothing

    endpoints.resume(cdr_db, "cdr_webhook", actor="noc")

    event = next_event(watcher())
    assert event is not None
    assert (
        event.payload["reason"] == "queued CDRs wait for a run (a run was full, or an endpoint was resumed)"
    )


def test_notify_wakes_the_watcher_at_once_and_polling_is_its_fallback(cdr_db):
    dialer = Dialer(cdr_db)
    with_watermark(cdr_db, db_now(cdr_db))
    slow = 20.0  # without NOTIFY, a watcher polling every 20 s does not see a commit within 3 s

    async def commit_after(delay: float) -> TriggerEvent | None:
        task = asyncio.create_task(_next(watcher(slow), 3))
        await asyncio.sleep(delay)
        dialer.cdr()
        began = time.monotonic()
        event = await task
        woke.append(time.monotonic() - began)
        return event

    woke: list[float] = []
    assert asyncio.run(commit_after(1.0)) is None  # first poll at start, then 20 s of sleep

    notify.install(cdr_db, "dialer.cdr")
    try:
        event = asyncio.run(commit_after(1.0))
        assert event is not None
        assert woke[-1] < 1.0  # woken by the notification, not by a poll
    finally:
        assert notify.remove(cdr_db, "dialer.cdr")
    assert not notify.remove(cdr_db, "dialer.cdr")


def test_notify_trigger_refuses_a_view_and_names_the_table_to_use(cdr_db):
    with pytest.raises(notify.NotifyError, match="is a view: install the trigger on the table"):
        notify.install(cdr_db, "cdr_webhook_source")
    with pytest.raises(notify.NotifyError, match="does not exist"):
        notify.install(cdr_db, "dialer.no_such_table")


def test_a_database_error_is_retried_and_the_password_never_logged(cdr_db, cdr_dsn, monkeypatch, capfd):
    from psycopg.conninfo import conninfo_to_dict

    secret = "s3cr3t-watcher-pw"  # noqa: S105 (a test value)
    params = conninfo_to_dict(cdr_dsn)
    # The server's refusal names the database, which here is the password too: the log line must not.
    monkeypatch.setenv(
        "AIRFLOW_CONN_CDR_DB",
        json.dumps(
            {"conn_type": "postgres", "host": params.get("host"), "port": int(params.get("port") or 5432)}
            | {"login": params.get("user"), "password": secret, "schema": secret}
        ),
    )
    assert next_event(watcher(), 3) is None  # it keeps retrying; it never raises
    logged = capfd.readouterr()
    text = logged.out + logged.err
    assert "CDR commit watcher on cdr_webhook_source: OperationalError" in text
    assert "retrying in 2 s (the schedule still delivers)" in text
    assert secret not in text
    assert 'database "***" does not exist' in text


def event_run(number: int) -> RunInfo:
    return RunInfo("cdr_webhook", f"asset_triggered__{number}", "asset_triggered", None, None, {})


def test_an_event_run_selects_like_a_scheduled_scan_in_chunk_mode_and_a_clear_maps_the_same(cdr_db):
    dialer = Dialer(cdr_db)
    with_watermark(cdr_db, db_now(cdr_db))
    cdrs = [dialer.cdr() for _ in range(5)]
    settings = Settings(cdrs_per_task=2)
    now = dt.datetime.now(dt.UTC)
    select = lambda run, at: claim_cdrs(  # noqa: E731
        cdr_db, run, settings, now=at, connections=configs({"cdr_webhook": {}}), cdrs_per_task=2
    )

    chunks = select(event_run(1), now)
    assert [len(chunk["cdr_ids"]) for chunk in chunks] == [2, 2, 1]
    assert [cdr for chunk in chunks for cdr in chunk["cdr_ids"]] == cdrs  # oldest first
    # A clear of its select step maps exactly what it had claimed, later or not.
    assert select(event_run(1), now + dt.timedelta(minutes=5)) == chunks
    # Another event run finds nothing new: it sends nothing.
    assert select(event_run(2), now + dt.timedelta(seconds=1)) == []


def test_the_cli_installs_and_removes_the_notify_trigger_by_table(cdr_db, cdr_dsn, capsys):
    from cdr_webhook.__main__ import main

    assert main(["source", "install-notify", "dialer.cdr", "--dsn", cdr_dsn]) == 0
    assert "installed trigger cdr_webhook_notify on dialer.cdr" in capsys.readouterr().out
    assert main(["source", "install-notify", "cdr_webhook_source", "--dsn", cdr_dsn]) == 1
    assert "is a view: install the trigger on the table" in capsys.readouterr().err
    assert main(["source", "remove-notify", "dialer.cdr", "--dsn", cdr_dsn]) == 0
    assert "removed trigger cdr_webhook_notify from dialer.cdr" in capsys.readouterr().out
