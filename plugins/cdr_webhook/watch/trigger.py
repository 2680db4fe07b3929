"""The commit watcher: an event trigger, run by Airflow's triggerer, that starts a run on new CDRs.

``CdrCommitTrigger`` is the trigger of the ``AssetWatcher`` on the DAG's asset
(:func:`cdr_webhook.watch.schedule.watched_schedule`). It polls the source relation for a
``created_at`` newer than what is covered (:mod:`cdr_webhook.watch.firing`), twice
every ``interval_seconds``, or waits on the NOTIFY channel when the source table carries the notify
trigger (``python -m cdr_webhook source install-notify TABLE``) and polls only as a fallback. When it
fires it records the fire in ``cdr_webhook.watch_state`` first, then yields the event and goes on
watching on the same connection; a watcher the triggerer starts again (after a restart, or a
reassignment to another triggerer) resumes from the database.

It never raises: the database being down, a connection it cannot use or a missing source are logged
(without the connection's secrets) and retried with a back-off, while the schedule keeps delivering.
Before each fire it runs the source check every run starts with: while that fails, it starts no run
(each would fail at the check) and leaves runs to the schedule, saying so in the triggerer's log.

Where operators look, it records its health (:mod:`cdr_webhook.ledger.watch_health`): a heartbeat every few
seconds, its state and the last error, scrubbed; when it cannot reach the database, the heartbeat
goes stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import psycopg
from airflow.triggers.base import BaseEventTrigger, TriggerEvent
from psycopg import sql

from cdr_webhook.ledger import watch_health as health
from cdr_webhook.ledger import watch_state
from cdr_webhook.redact import scrub
from cdr_webhook.settings import CDR_DB_CONN_ID
from cdr_webhook.watch import state
from cdr_webhook.watch.firing import SOURCE_RECHECK_SECONDS, poll_seconds, when_to_fire

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

#: Back-off after a failure (connect, query), doubling up to the maximum.
RETRY_FIRST_SECONDS = 2.0
RETRY_MAX_SECONDS = 60.0


class WatchError(RuntimeError):
    """A reason the watcher cannot watch (its message carries no secret)."""


class CdrCommitTrigger(BaseEventTrigger):
    """
    Fires each time CDRs newer than the ledger's watermark (and the last fire) are committed.

    :param source_relation: the relation the DAG reads (setting ``source_relation``).
    :param interval_seconds: seconds between polls, and the least time between two fires.
    :param conn_id: the Airflow connection of the CDR database.

    Its kwargs are the trigger's identity for Airflow (classpath + kwargs): they come from parse-time
    settings only, so every parse of the DAG finds the same watcher.
    """

    def __init__(
        self, *, source_relation: str, interval_seconds: float = 1.0, conn_id: str = CDR_DB_CONN_ID
    ) -> None:
        super().__init__()
        self.source_relation = source_relation
        self.interval_seconds = float(interval_seconds)
        self.conn_id = conn_id
        self._secrets: tuple[str, ...] = ()
        self._source_failure: str | None = None  # the source check's last failure, while it fails
        self._source_checked_at = 0.0  # time.monotonic() of the last source check
        self._args: dict[str, Any] | None = None  # the last connection arguments read, to record an error
        self._beat: tuple[str, float] | None = None  # the last heartbeat written: state, time.monotonic()

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "source_relation": self.source_relation,
                "interval_seconds": self.interval_seconds,
                "conn_id": self.conn_id,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        # One run() yields an event per fire and goes on watching on the same connection: returning
        # after an event would leave commits unwatched until the triggerer starts the watcher again
        # (its next sync, up to a second or two later, then a new connection).
        delay = RETRY_FIRST_SECONDS
        while True:
            try:
                async for event in self._watch():
                    delay = RETRY_FIRST_SECONDS
                    yield event
            except asyncio.CancelledError:
                raise
            except Exception as err:  # logged and retried: the watcher must outlive any outage
                self.log.warning(
                    "CDR commit watcher on %s: %s; retrying in %.0f s (the schedule still delivers)",
                    self.source_relation,
                    self._scrubbed(err),
                    delay,
                )
                await self._record_error(self._scrubbed(err), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)

    async def _watch(self) -> AsyncIterator[TriggerEvent]:
        """Watch; each time there is something to fire for, record the fire and yield its event."""
        args = await self._connect_args()
        await asyncio.to_thread(_migrate, args)  # the state table, before any run has migrated
        relation = self.source_relation
        async with await psycopg.AsyncConnection.connect(**args, autocommit=True) as conn:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(state.CHANNEL)))
            notify = await state.notify_installed(conn)
            self.log.info(
                "Watching %s for new CDRs: %s, polling every %g s",
                relation,
                f"woken by NOTIFY on {state.CHANNEL}" if notify else "no NOTIFY trigger installed",
                poll_seconds(self.interval_seconds, notify_installed=notify),
            )
            while True:
                seen = await state.read_state(conn, relation)
                if seen.needs_baseline:
                    newest = await state.newest_created_at(conn, relation, None)
                    await watch_state.record_baseline(conn, relation, newest)
                    self.log.info(
                        "No scan yet: CDRs up to %s are history (a backfill's job); watching from there",
                        newest.isoformat() if newest else "now",
                    )
                    continue
                await self._heartbeat(conn, notify=notify)
                newest = await state.newest_created_at(conn, relation, seen.covered)
                decision = when_to_fire(
                    seen,
                    newest,
                    min_gap_seconds=self.interval_seconds,
                    poll_seconds=poll_seconds(self.interval_seconds, notify_installed=notify),
                )
                if decision.fire and not await self._source_passes(args):
                    await self._heartbeat(conn, notify=notify)  # the failure shows at once
                    await _wait(conn, SOURCE_RECHECK_SECONDS, listen=False)
                    continue
                if (
                    not decision.fire
                    and self._source_failure is not None
                    and time.monotonic() - self._source_checked_at >= SOURCE_RECHECK_SECONDS
                ):
                    # Nothing to fire for (the schedule's runs took the rows): a source mended meanwhile
                    # must not go on showing as failing.
                    await self._source_passes(args)
                    await self._heartbeat(conn, notify=notify)
                if decision.fire:
                    fired_at = await watch_state.record_fire(conn, relation, newest)  # before the yield
                    self.log.info("Starting a run: %s", decision.reason)
                    yield TriggerEvent(
                        {
                            "source_relation": relation,
                            "newest_created_at": newest.isoformat() if newest else None,
                            "fired_at": fired_at.isoformat(),
                            "reason": decision.reason,
                        }
                    )
                    continue
                woken = await _wait(conn, decision.wait_seconds, listen=not decision.due)
                if not woken:
                    notify = await state.notify_installed(conn)  # installed or removed meanwhile

    async def _connect_args(self) -> dict[str, Any]:
        """The psycopg arguments of the Airflow connection, fetched the triggerer's (async) way."""
        from airflow.sdk import BaseHook

        from cdr_webhook.db import PROVIDER_EXTRAS, async_extra, connection_args, connection_secrets

        connection = await BaseHook.aget_connection(self.conn_id)
        extra = await async_extra(connection)  # not aextra_dejson(): Airflow 3.3.0-3.3.1 lack it
        args = connection_args(connection, extra=extra)
        self._secrets = connection_secrets(args)
        # Without the provider's extras, which no plain connection accepts: an error they cause can
        # still be recorded, when the rest of the connection reaches the database.
        self._args = {key: value for key, value in args.items() if key not in PROVIDER_EXTRAS}
        needs_hook = sorted(PROVIDER_EXTRAS & extra.keys())
        if needs_hook:
            raise WatchError(
                f"connection {self.conn_id!r} has extras only the Postgres provider's hook understands "
                f"({', '.join(needs_hook)}): the watcher opens plain connections only; give it a plain one "
                "or set watch_interval_seconds = 0"
            )
        return args

    async def _source_passes(self, args: dict[str, Any]) -> bool:
        """
        Whether the source check every run starts with passes; a failure is logged when it begins or
        changes, and when it ends.
        """
        failure = await asyncio.to_thread(_source_failure, args, self.source_relation)
        self._source_checked_at = time.monotonic()
        if failure is not None and failure != self._source_failure:
            self.log.warning(
                "CDR commit watcher on %s: the source check fails, so every run would fail at it: %s. "
                "No run is started for new commits: runs are left to the schedule (each fails its "
                "select_cdrs task with this reason) until the check passes; checking again every %g s",
                self.source_relation,
                self._scrubbed_text(failure),
                SOURCE_RECHECK_SECONDS,
            )
        elif failure is None and self._source_failure is not None:
            self.log.info("CDR commit watcher on %s: the source check passes again", self.source_relation)
        self._source_failure = failure
        return failure is None

    async def _heartbeat(self, conn: psycopg.AsyncConnection[Any], *, notify: bool) -> None:
        """
        Record the watcher's state and the time, at most every ``health.HEARTBEAT_SECONDS`` in one
        state (a change is written at once): one statement, never one per poll.
        """
        current = health.SOURCE_FAILING if self._source_failure is not None else health.WATCHING
        now = time.monotonic()
        if self._beat is not None:
            last_state, last_at = self._beat
            if last_state == current and now - last_at < health.HEARTBEAT_SECONDS:
                return
        # The longest this state waits between two heartbeats: the page calls a heartbeat stale from it.
        every = max(health.HEARTBEAT_SECONDS, poll_seconds(self.interval_seconds, notify_installed=notify))
        if current == health.SOURCE_FAILING:
            every = max(every, SOURCE_RECHECK_SECONDS)
        error = self._scrubbed_text(self._source_failure) if self._source_failure is not None else None
        if await health.record(conn, self.source_relation, current, error, every, create=True):
            self._beat = (current, now)

    async def _record_error(self, error: str, *, retry_in: float) -> None:
        """
        Record the error the watcher retries after, on a connection of its own: the database may be
        what fails, and then nothing is written and the heartbeat going stale is the signal.
        """
        if self._args is None:
            return  # not even the connection could be read: nothing to write with
        try:
            async with await psycopg.AsyncConnection.connect(
                **({"connect_timeout": 5} | self._args), autocommit=True
            ) as conn:
                every = max(health.HEARTBEAT_SECONDS, retry_in)
                if await health.record(conn, self.source_relation, health.ERROR, error, every, create=False):
                    self._beat = (health.ERROR, time.monotonic())
        except Exception as err:  # the warning above says it already; the stale heartbeat shows it
            self.log.debug("CDR commit watcher: cannot record its error: %s", self._scrubbed(err))

    def _scrubbed(self, err: BaseException) -> str:
        """The error as one line, with every secret of the connection removed wherever it appears."""
        return f"{type(err).__name__}: {self._scrubbed_text(str(err)) or type(err).__name__}"

    def _scrubbed_text(self, text: str) -> str:
        return scrub(" ".join(text.split()), self._secrets) or ""


async def _wait(conn: psycopg.AsyncConnection[Any], seconds: float, *, listen: bool) -> bool:
    """
    Wait ``seconds``; listening, a notification ends the wait early (return True). Not listening (a
    fire is due but too soon after the last), notifications pile up meanwhile and are dropped: the
    probe that follows sees what they announced.
    """
    woken = False
    if listen:
        # notifies() holds the connection's lock until its generator is closed: closed here, before
        # anything else uses the connection (a generator left open would block every later query).
        async with contextlib.aclosing(conn.notifies(timeout=max(seconds, 0.0), stop_after=1)) as notes:
            async for _ in notes:
                woken = True
                break
    else:
        await asyncio.sleep(max(seconds, 0.0))
    await _drain(conn)
    return woken


async def _drain(conn: psycopg.AsyncConnection[Any]) -> None:
    """Drop the notifications already received: the probe that follows sees what they announced."""
    with contextlib.suppress(TimeoutError):
        async with contextlib.aclosing(conn.notifies(timeout=0.0)) as notes:
            async for _ in notes:
                pass


def _source_failure(args: dict[str, Any], relation: str) -> str | None:
    """The run's source check, on a connection of its own: its failure, or None when it passes."""
    from cdr_webhook.selection.source import SourceError, check_source

    with psycopg.connect(**args, autocommit=True) as conn:
        try:
            check_source(conn, relation)
        except SourceError as err:
            return str(err)
    return None


def _migrate(args: dict[str, Any]) -> None:
    from cdr_webhook.ledger import schema

    with psycopg.connect(**args, autocommit=True) as conn:
        schema.migrate(conn)
