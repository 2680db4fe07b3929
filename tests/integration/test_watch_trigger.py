"""The commit watcher's trigger against a real PostgreSQL: its ``run()`` driven directly with asyncio.

Each test runs the trigger as the triggerer does (it reads the Airflow connection ``cdr_db``, the
cdr_db fixture's database), and "restarts" it as the triggerer does after an event: a new instance
with the same kwargs, which must resume from the database, not from memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest

from cdr_webhook import ledger
from cdr_webhook.ledger import schema
from cdr_webhook.ledger import watch_health as health
from cdr_webhook.selection.step import RunInfo, claim_cdrs
from cdr_webhook.settings import Settings
from cdr_webhook.watch import notify
from cdr_webhook.watch.trigger import CdrCommitTrigger
from demo.dialer import Dialer
from tests.support.endpoint_configs import configs

if TYPE_CHECKING:
    from collections.abc import Iterator

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


def test_notify_wakes_a_waiting_watcher_commit_after_commit(cdr_db):
    # Each commit comes while the watcher waits on its connection (its heartbeat is written before
    # each wait): the notification ends the wait, and the watcher goes on using that connection.
    dialer = Dialer(cdr_db)
    with_watermark(cdr_db, db_now(cdr_db))
    notify.install(cdr_db, "dialer.cdr")

    async def commit_while_waiting() -> tuple[TriggerEvent | None, float]:
        def beat() -> Any:
            return cdr_db.execute("SELECT max(seen_at) FROM cdr_webhook.watch_state").fetchone()[0]

        before = beat()
        # Fires 1 s apart at least; with NOTIFY it polls every 15 s only as a fallback.
        task = asyncio.create_task(_next(watcher(1.0), 10))
        while beat() == before:  # a new watcher writes its heartbeat before its first wait
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.2)  # in its wait now, past the least gap after the last fire
        dialer.cdr()
        began = time.monotonic()
        event = await task
        return event, time.monotonic() - began

    for _ in range(2):
        event, took = asyncio.run(commit_while_waiting())
        assert event is not None
        assert took < 2.0  # the notification, not the 15 s poll


def test_notify_trigger_refuses_a_view_and_names_the_table_to_use(cdr_db):
    with pytest.raises(notify.NotifyError, match="is a view: install the trigger on the table"):
        notify.install(cdr_db, "cdr_webhook_source")
    with pytest.raises(notify.NotifyError, match="does not exist"):
        notify.install(cdr_db, "dialer.no_such_table")


@pytest.mark.parametrize("field", ["password", "sslpassword"])
def test_a_database_error_is_retried_and_no_secret_of_the_connection_logged(
    cdr_db, cdr_dsn, monkeypatch, capfd, field
):
    from psycopg.conninfo import conninfo_to_dict

    secret = "s3cr3t-watcher-pw"  # noqa: S105 (a test value)
    params = conninfo_to_dict(cdr_dsn)
    # The server's refusal names the database, which here is the secret too: the log line must not.
    # sslpassword (the client key's passphrase) is as secret as the password, and libpq says so.
    secrets = {"password": secret} if field == "password" else {"extra": json.dumps({"sslpassword": secret})}
    monkeypatch.setenv(
        "AIRFLOW_CONN_CDR_DB",
        json.dumps(
            {"conn_type": "postgres", "host": params.get("host"), "port": int(params.get("port") or 5432)}
            | {"login": params.get("user"), "schema": secret}
            | secrets
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


def set_created_at(conn: psycopg.Connection[Any], cdr_id: str, value: str) -> None:
    """Give a CDR a created_at Python cannot hold ('infinity', a year past 9999) or one in the future."""
    conn.execute("UPDATE dialer.cdr SET created_at = %s::timestamptz WHERE id = %s", (value, cdr_id))


@pytest.mark.parametrize("value", ["infinity", "10000-01-01 00:00:00+00"])
def test_an_unloadable_created_at_does_not_stop_the_watcher(cdr_db, value):
    dialer = Dialer(cdr_db)
    with_watermark(cdr_db, db_now(cdr_db))
    set_created_at(cdr_db, dialer.cdr(), value)

    assert next_event(watcher(), QUIET) is None  # no commit a scan can read yet: nothing to fire for
    new = dialer.cdr()
    event = next_event(watcher())
    assert event is not None  # it still fires for the next commit
    assert dt.datetime.fromisoformat(event.payload["newest_created_at"]) == created_at(cdr_db, new)


def test_a_future_created_at_neither_fires_nor_makes_the_watcher_refire_on_an_idle_system(cdr_db):
    dialer = Dialer(cdr_db)
    with_watermark(cdr_db, db_now(cdr_db))
    future = dialer.cdr()
    set_created_at(cdr_db, future, str(db_now(cdr_db) + dt.timedelta(hours=1)))
    new = dialer.cdr()

    event = next_event(watcher())
    assert event is not None
    # The fire is for what a scan starting now reads, not for the row an hour ahead.
    assert dt.datetime.fromisoformat(event.payload["newest_created_at"]) == created_at(cdr_db, new)
    mapped = claim_cdrs(cdr_db, event_run(1), Settings(), connections=configs({"cdr_webhook": {}}))
    assert [cdr for item in mapped for cdr in item["cdr_ids"]] == [new]

    # Idle from here: the scan covered the fire, so the unscanned-fire rule (after 15 s) finds nothing.
    cdr_db.execute("UPDATE cdr_webhook.watch_state SET fired_at = fired_at - interval '1 minute'")
    assert next_event(watcher(), QUIET) is None
    assert fires(cdr_db) == 1


@contextlib.contextmanager
def failing_source(conn: psycopg.Connection[Any]) -> Iterator[Dialer]:
    """A committed row the source view's cast fails on, so every source check fails; mended after."""
    from tests.integration.test_source_check import FAILING_CAST, replace_view

    dialer = Dialer(conn)
    with_watermark(conn, db_now(conn))
    dialer.cdr(cost=Decimal("0"))  # the row the broken view's cast fails on
    replace_view(conn, *FAILING_CAST)
    try:
        yield dialer
    finally:
        mend_source(conn)


def mend_source(conn: psycopg.Connection[Any]) -> None:
    """The reference view again."""
    from tests.integration.test_source_check import FAILING_CAST, replace_view

    replace_view(conn, FAILING_CAST[0], FAILING_CAST[0])


def test_a_failing_source_is_left_to_the_schedule_instead_of_a_run_per_commit(cdr_db, capfd):
    with failing_source(cdr_db) as dialer:
        # Every run would fail at its source check and leave the watermark where it is: the watcher
        # starts none, however many commits come (one instance for the whole stretch, as in the
        # triggerer), and says why in the triggerer's log.
        async def commits_while_watching() -> TriggerEvent | None:
            task = asyncio.create_task(_next(watcher(), 4))
            for _ in range(6):
                await asyncio.sleep(0.5)
                dialer.cdr()
            return await task

        assert asyncio.run(commits_while_watching()) is None
        assert fires(cdr_db) == 0
        logged = capfd.readouterr()
        text = logged.out + logged.err
        assert text.count("the source check fails") == 1, text  # said once, not on every poll
        assert 'invalid input syntax for type integer: ""' in text
        assert "runs are left to the schedule" in text

    # Corrected, the next commit (or the next recheck) starts a run.
    event = next_event(watcher())
    assert event is not None


def dag_select_task() -> Any:
    """The DAG's module (``cdr_webhook.dag``, which the DAG file builds from), loaded afresh."""
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location(
        "cdr_webhook_dag_clock", ROOT / "plugins" / "cdr_webhook" / "dag.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_event_runs_scan_ends_on_the_database_clock_so_a_worker_ahead_skips_no_row(cdr_db, monkeypatch):
    import types

    from demo.connections import http_conn

    ahead = dt.timedelta(seconds=Settings().lag_seconds + 60)

    class WorkerClock(dt.datetime):
        """A worker whose clock runs ahead of the database's by more than lag_seconds."""

        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:  # type: ignore[override]
            return dt.datetime.now(tz) + ahead

    monkeypatch.setenv("AIRFLOW_CONN_CDR_WEBHOOK", http_conn("http://127.0.0.1:9/"))
    module = dag_select_task()
    monkeypatch.setattr(
        module, "dt", types.SimpleNamespace(datetime=WorkerClock, UTC=dt.UTC, timedelta=dt.timedelta)
    )
    select = module.cdr_webhook_dag().task_dict["select_cdrs"].python_callable

    def event_select(number: int) -> list[str]:
        dag_run = types.SimpleNamespace(
            dag_id="cdr_webhook", run_id=f"asset_triggered__{number}", run_type=ASSET
        )
        mapped = select(cdrs_per_task=1, dag_run=dag_run, params={})
        return [cdr for item in mapped for cdr in item["cdr_ids"]]

    dialer = Dialer(cdr_db)
    with_watermark(cdr_db, db_now(cdr_db))
    first = dialer.cdr()
    assert event_select(1) == [first]
    committed_after_the_scan = dialer.cdr()  # created_at on the database's clock, after run 1's scan
    assert event_select(2) == [committed_after_the_scan]


ASSET = "asset_triggered"


def test_the_notify_trigger_goes_on_the_table_the_name_resolves_to(cdr_db):
    cdr_db.execute('CREATE TABLE public."Calls" (id int)')
    notify.install(cdr_db, "Dialer.CDR")  # unquoted: folds to dialer.cdr, as PostgreSQL reads it
    assert notify.remove(cdr_db, "dialer.cdr")
    notify.install(cdr_db, 'public."Calls"')  # quoted: keeps its case
    assert notify.remove(cdr_db, 'Public."Calls"')
    with pytest.raises(notify.NotifyError, match="does not exist"):
        notify.install(cdr_db, "public.Calls")  # folds to public.calls: no such table


def test_the_watcher_reads_the_relation_the_setting_names_whatever_its_case(cdr_db):
    dialer = Dialer(cdr_db)
    cdr_db.execute("CREATE VIEW Public.Mixed AS SELECT * FROM cdr_webhook_source")
    with_watermark(cdr_db, db_now(cdr_db))
    cdr_db.execute(
        "INSERT INTO cdr_webhook.watermark (source_relation, created_at) VALUES ('Public.Mixed', %s)",
        (db_now(cdr_db),),
    )
    new = dialer.cdr()
    event = next_event(CdrCommitTrigger(source_relation="Public.Mixed", interval_seconds=0.2))
    assert event is not None
    assert dt.datetime.fromisoformat(event.payload["newest_created_at"]) == created_at(cdr_db, new)


def test_the_watcher_reads_its_connections_extras_on_an_airflow_without_aextra_dejson(monkeypatch):
    """Connection.aextra_dejson() came with Airflow 3.3.2 (Task SDK 1.3.2); the watcher runs on 3.3.0."""
    import types

    from airflow.sdk import BaseHook

    # A connection as Airflow 3.3.0's Task SDK hands it over: no aextra_dejson.
    connection = types.SimpleNamespace(
        conn_id="cdr_db",
        host="127.0.0.1",
        port=None,
        login="cdr",
        password="pw",
        schema="cdr",
        extra=json.dumps({"application_name": "cdr-watcher", "sslmode": "disable"}),
    )

    async def aget_connection(conn_id: str) -> Any:
        assert conn_id == "cdr_db"
        return connection

    monkeypatch.setattr(BaseHook, "aget_connection", aget_connection)
    args = asyncio.run(watcher()._connect_args())
    assert args["application_name"] == "cdr-watcher"
    assert args["sslmode"] == "disable"
    assert (args["host"], args["user"], args["dbname"]) == ("127.0.0.1", "cdr", "cdr")


def test_extras_that_are_not_a_json_object_stop_the_watcher_with_a_reason(monkeypatch):
    from cdr_webhook.db import async_extra

    connection = type("Conn", (), {"conn_id": "cdr_db", "extra": '["sslmode"]'})()
    with pytest.raises(ValueError, match="connection 'cdr_db': its extra is not a JSON object"):
        asyncio.run(async_extra(connection))
    connection.extra = "{not json"
    with pytest.raises(ValueError, match="its extra is not a JSON object"):
        asyncio.run(async_extra(connection))


# -- its health, where operators look (cdr_webhook.ledger.watch_health) -------------------------------------


def watcher_health(conn: psycopg.Connection[Any]) -> health.Health:
    return health.read(conn, RELATION)


def test_the_watcher_records_its_heartbeat_every_few_seconds_not_on_every_poll(cdr_db, monkeypatch):
    with_watermark(cdr_db, db_now(cdr_db))  # a watcher that never fires: the heartbeat makes its row
    assert health.assess(watcher_health(cdr_db), interval_seconds=0.1).state == "never_seen"

    began = db_now(cdr_db)
    assert next_event(watcher(interval=0.1), QUIET) is None  # some 15 polls
    first = watcher_health(cdr_db)
    assert first.state == "watching"
    assert first.error is None
    assert first.heartbeat_seconds == health.HEARTBEAT_SECONDS
    assert first.seen_at is not None
    assert (first.seen_at - began).total_seconds() < 0.7  # written once, at the start, not per poll
    verdict = health.assess(first, interval_seconds=0.1)
    assert verdict.ok
    assert verdict.headline.startswith("commit watcher: watching, last seen ")

    # With a shorter heartbeat period, the same stretch writes it again and again.
    monkeypatch.setattr(health, "HEARTBEAT_SECONDS", 0.3)
    began = db_now(cdr_db)
    assert next_event(watcher(interval=0.1), QUIET) is None
    later = watcher_health(cdr_db)
    assert later.seen_at is not None
    assert (later.seen_at - began).total_seconds() > 0.9
    assert later.since == first.since  # still the same state, since the first heartbeat


def test_a_failing_source_check_is_recorded_with_its_reason_and_cleared_when_mended(cdr_db, monkeypatch):
    with failing_source(cdr_db):
        assert next_event(watcher(), QUIET) is None
        recorded = watcher_health(cdr_db)
        assert recorded.state == "source_failing"
        assert recorded.error is not None
        assert 'invalid input syntax for type integer: ""' in recorded.error
        assert recorded.heartbeat_seconds == 30.0  # it rechecks every 30 s: not stale meanwhile
        verdict = health.assess(recorded, interval_seconds=0.2)
        assert (verdict.ok, verdict.state) == (False, "source_failing")

        # Mended while one watcher runs, and the schedule's run took the rows (nothing left to fire
        # for): its next recheck clears the state, though no fire asks for a check.
        monkeypatch.setattr("cdr_webhook.watch.trigger.SOURCE_RECHECK_SECONDS", 0.5)

        async def mended_while_watching() -> list[str | None]:
            task = asyncio.create_task(_next(watcher(), 3))
            await asyncio.sleep(1.0)
            seen = [watcher_health(cdr_db).state]
            with_watermark(cdr_db, db_now(cdr_db))  # first: the mended view must find nothing to fire for
            mend_source(cdr_db)
            assert await task is None
            return [*seen, watcher_health(cdr_db).state]

        assert asyncio.run(mended_while_watching()) == ["source_failing", "watching"]


def test_a_misconfigured_connection_is_recorded_as_the_watchers_error(cdr_db, cdr_dsn, monkeypatch):
    from psycopg.conninfo import conninfo_to_dict

    with_watermark(cdr_db, db_now(cdr_db))
    assert next_event(watcher(), QUIET) is None  # a healthy start: its row and heartbeat
    assert watcher_health(cdr_db).state == "watching"

    # A connection the database accepts, with an extra only the Postgres provider's hook understands.
    params = conninfo_to_dict(cdr_dsn)
    monkeypatch.setenv(
        "AIRFLOW_CONN_CDR_DB",
        json.dumps(
            {"conn_type": "postgres", "host": params.get("host"), "port": int(params.get("port") or 5432)}
            | {"login": params.get("user"), "schema": params.get("dbname")}
            | {"password": params.get("password"), "extra": json.dumps({"iam": True})}
        ),
    )
    assert next_event(watcher(), 3) is None  # it retries; it never raises
    recorded = watcher_health(cdr_db)
    assert recorded.state == "error"
    assert recorded.error is not None
    assert "has extras only the Postgres provider's hook understands (iam)" in recorded.error
    verdict = health.assess(recorded, interval_seconds=0.2)
    assert verdict.state == "error"
    assert "minute schedule only" in verdict.headline


def test_the_recorded_error_is_one_bounded_line_without_the_connections_secrets(cdr_db, cdr_dsn, monkeypatch):
    from psycopg.conninfo import conninfo_to_dict

    secret = "s3cr3t-watcher-key-pw"  # noqa: S105 (a test value)
    relation = f"missing_{secret.replace('-', '_')}_" + "x" * 40  # its error names it: the secret too
    schema.migrate(cdr_db)
    # A watcher that has run before (its row exists) and now fails on every poll.
    cdr_db.execute("INSERT INTO cdr_webhook.watch_state (source_relation) VALUES (%s)", (relation,))
    params = conninfo_to_dict(cdr_dsn)
    monkeypatch.setenv(
        "AIRFLOW_CONN_CDR_DB",
        json.dumps(
            {"conn_type": "postgres", "host": params.get("host"), "port": int(params.get("port") or 5432)}
            | {
                "login": params.get("user"),
                "schema": params.get("dbname"),
                "password": params.get("password"),
            }
            | {"extra": json.dumps({"sslpassword": secret.replace("-", "_")})}
        ),
    )
    monkeypatch.setattr(health, "MAX_ERROR_CHARS", 60)
    assert next_event(CdrCommitTrigger(source_relation=relation, interval_seconds=0.2), 3) is None
    recorded = health.read(cdr_db, relation)
    assert recorded.state == "error"
    assert recorded.error is not None
    assert secret.replace("-", "_") not in recorded.error
    assert recorded.error.startswith('UndefinedTable: relation "missing_***_xxx')
    assert len(recorded.error) == 60
    assert recorded.error.endswith("…")
    assert "\n" not in recorded.error


class GaugeRecorder:
    """Airflow's Stats.gauge, recorded (no StatsD listener in-process)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def __call__(self, name: str, value: float, *args: Any, **kwargs: Any) -> None:
        self.values[name] = value


def scheduled_run(number: int, start: dt.datetime) -> RunInfo:
    end = start + dt.timedelta(minutes=1)
    return RunInfo("cdr_webhook", f"scheduled__{number}", "scheduled", start, end, {})


def test_a_scheduled_run_finding_what_the_watcher_missed_warns_naming_its_state(cdr_db, monkeypatch, caplog):
    from airflow.sdk.observability.stats import Stats

    gauges = GaugeRecorder()
    monkeypatch.setattr(Stats, "gauge", gauges)
    dialer = Dialer(cdr_db)
    start = db_now(cdr_db) - dt.timedelta(minutes=5)
    with_watermark(cdr_db, start)
    dialer.cdr(created_at=start + dt.timedelta(seconds=10))
    select = lambda run: claim_cdrs(  # noqa: E731
        cdr_db, run, Settings(), now=start + dt.timedelta(minutes=3), connections=configs({"cdr_webhook": {}})
    )

    # No watcher has ever reported (no triggerer): the scheduled run delivers, and says why it had to.
    with caplog.at_level("WARNING", logger="cdr_webhook.selection"):
        assert select(scheduled_run(1, start))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1
    assert warned[0].startswith("1 new CDR(s) waited for the minute schedule: the commit watcher did not")
    assert "(never_seen)" in warned[0]
    assert "triggerer may not be running" in warned[0]
    assert gauges.values == {"cdr_webhook.watcher.healthy": 0}

    # A watcher that reports: no warning, and its heartbeat's age is a metric.
    assert next_event(watcher(), QUIET) is None
    caplog.clear()
    dialer.cdr(created_at=start + dt.timedelta(seconds=70))
    with caplog.at_level("WARNING", logger="cdr_webhook.selection"):
        assert select(scheduled_run(2, start + dt.timedelta(minutes=1)))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert gauges.values["cdr_webhook.watcher.healthy"] == 1
    assert 0 <= gauges.values["cdr_webhook.watcher.heartbeat_age"] < 10


def test_the_cli_shows_the_watchers_health_and_fails_unless_it_watches(cdr_db, cdr_dsn, capsys):
    from cdr_webhook.__main__ import main

    with_watermark(cdr_db, db_now(cdr_db))
    assert main(["watch", "status", "--dsn", cdr_dsn]) == 1  # no triggerer has run it yet
    shown = capsys.readouterr()
    assert shown.out == "commit watcher on cdr_webhook_source: never_seen\n"
    assert shown.err.startswith("error: Commit watcher: never seen.")
    assert "minute schedule only" in shown.err

    assert next_event(watcher(), QUIET) is None
    capsys.readouterr()  # the watcher's own log lines
    assert main(["watch", "status", "--dsn", cdr_dsn]) == 0
    out = capsys.readouterr().out
    assert out.startswith("commit watcher on cdr_webhook_source: watching\n  last heartbeat  ")
    assert "it reports at least every 5 s)" in out
    assert "  recorded state  watching since " in out
    assert re.search(r"^commit watcher: watching, last seen \d+ s ago$", out, re.M)

    cdr_db.execute("UPDATE cdr_webhook.watch_state SET seen_at = seen_at - interval '1 hour'")
    assert main(["watch", "status", "--dsn", cdr_dsn]) == 1
    assert "the triggerer may be down" in capsys.readouterr().err
