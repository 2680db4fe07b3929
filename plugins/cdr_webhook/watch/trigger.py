"""The commit watcher: an event trigger, run by Airflow's triggerer, that starts a run on new CDRs.

``CdrCommitTrigger`` is the trigger of the ``AssetWatcher`` on the DAG's asset
(:func:`cdr_webhook.watch.schedule.watched_schedule`). It polls the source relation for a
``created_at`` newer than what is covered (:mod:`cdr_webhook.watch.decide`), every
``interval_seconds``, or waits on the NOTIFY channel when the source table carries the notify
trigger (``python -m cdr_webhook source install-notify TABLE``) and polls only as a fallback. When it
fires it records the fire in ``cdr_webhook.watch_state`` first, then yields one event and returns:
the triggerer starts it again, and the restarted watcher resumes from the database.

It never raises: the database being down, a connection it cannot use or a missing source are logged
(without the connection's secrets) and retried with a back-off, while the schedule keeps delivering.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import psycopg
from airflow.triggers.base import BaseEventTrigger, TriggerEvent
from psycopg import sql

from cdr_webhook.settings import CDR_DB_CONN_ID
from cdr_webhook.watch import state
from cdr_webhook.watch.decide import decide, poll_seconds

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

#: Back-off after a failure (connect, query), doubling up to the maximum.
RETRY_FIRST_SECONDS = 2.0
RETRY_MAX_SECONDS = 60.0


class WatchError(RuntimeError):
    """A reason the watcher cannot watch (its message carries no secret)."""


class CdrCommitTrigger(BaseEventTrigger):
    """
    Fires once when CDRs newer than the ledger's watermark (and the last fire) are committed.

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
        self._secrets: list[str] = []

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
        delay = RETRY_FIRST_SECONDS
        while True:
            try:
                event = await self._watch()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # logged and retried: the watcher must outlive any outage
                self.log.warning(
                    "CDR commit watcher on %s: %s; retrying in %.0f s (the schedule still delivers)",
                    self.source_relation,
                    self._scrubbed(err),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            yield event
            return  # one event per run(): the triggerer starts the watcher again

    async def _watch(self) -> TriggerEvent:
        """Watch until there is something to fire for; record the fire; return its event."""
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
                    await state.record_baseline(conn, relation, newest)
                    self.log.info(
                        "No scan yet: CDRs up to %s are history (a backfill's job); watching from there",
                        newest.isoformat() if newest else "now",
                    )
                    continue
                newest = await state.newest_created_at(conn, relation, seen.covered)
                decision = decide(
                    seen,
                    newest,
                    min_gap_seconds=self.interval_seconds,
                    poll_seconds=poll_seconds(self.interval_seconds, notify_installed=notify),
                )
                if decision.fire:
                    fired_at = await state.record_fire(conn, relation, newest)  # before the yield
                    self.log.info("Starting a run: %s", decision.reason)
                    return TriggerEvent(
                        {
                            "source_relation": relation,
                            "newest_created_at": newest.isoformat() if newest else None,
                            "fired_at": fired_at.isoformat(),
                            "reason": decision.reason,
                        }
                    )
                woken = await _wait(conn, decision.wait_seconds, listen=not decision.due)
                if not woken:
                    notify = await state.notify_installed(conn)  # installed or removed meanwhile

    async def _connect_args(self) -> dict[str, Any]:
        """The psycopg arguments of the Airflow connection, fetched the triggerer's (async) way."""
        from airflow.sdk import BaseHook

        from cdr_webhook.db import PROVIDER_EXTRAS, connection_args

        connection = await BaseHook.aget_connection(self.conn_id)
        extra = await connection.aextra_dejson()
        self._secrets = [secret for secret in (connection.password,) if secret]
        needs_hook = sorted(PROVIDER_EXTRAS & extra.keys())
        if needs_hook:
            raise WatchError(
                f"connection {self.conn_id!r} has extras only the Postgres provider's hook understands "
                f"({', '.join(needs_hook)}): the watcher opens plain connections only; give it a plain one "
                "or set watch_interval_seconds = 0"
            )
        return connection_args(connection, extra=extra)

    def _scrubbed(self, err: BaseException) -> str:
        """The error as one line, with the connection's password removed wherever it appears."""
        text = " ".join(str(err).split()) or type(err).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return f"{type(err).__name__}: {text}"


async def _wait(conn: psycopg.AsyncConnection[Any], seconds: float, *, listen: bool) -> bool:
    """
    Wait ``seconds``; listening, a notification ends the wait early (return True). Not listening (a
    fire is due but too soon after the last), notifications pile up meanwhile and are dropped: the
    probe that follows sees what they announced.
    """
    if listen:
        async for _ in conn.notifies(timeout=max(seconds, 0.0), stop_after=1):
            await _drain(conn)
            return True
        return False
    await asyncio.sleep(max(seconds, 0.0))
    await _drain(conn)
    return False


async def _drain(conn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(TimeoutError):
        async for _ in conn.notifies(timeout=0.0):
            pass


def _migrate(args: dict[str, Any]) -> None:
    from cdr_webhook.ledger import schema

    with psycopg.connect(**args, autocommit=True) as conn:
        schema.migrate(conn)
