"""SQL of the commit watcher: its state row in ``cdr_webhook.watch_state``, the probe of the source.

The trigger reads and writes through psycopg's async connection (it runs in the triggerer's event
loop); the select step's two statements are sync. Identifiers go through :mod:`psycopg.sql`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psycopg import sql

from cdr_webhook.db import relation_identifier
from cdr_webhook.watch.decide import WatchState

if TYPE_CHECKING:
    import datetime as dt

    import psycopg

#: The channel the NOTIFY trigger of sql/notify_trigger.sql notifies on.
CHANNEL = "cdr_webhook_commits"
#: The trigger function that sql/notify_trigger.sql creates; its triggers mean NOTIFY is installed.
NOTIFY_FUNCTION = ("cdr_webhook", "notify_commit")

_READ_STATE = (
    "SELECT now(), (SELECT created_at FROM cdr_webhook.watermark WHERE source_relation = %(rel)s), "
    "s.source_relation IS NOT NULL, s.started_from, s.fired_through, s.fired_at, s.more_at "
    "FROM (SELECT 1) AS one LEFT JOIN cdr_webhook.watch_state AS s ON s.source_relation = %(rel)s"
)


def newest_query(relation: str, bounded: bool) -> sql.Composed:
    """The watcher's poll: the newest ``created_at`` (newer than ``%(covered)s`` when ``bounded``)."""
    # One probe of the created_at index, backwards; bounded by what is covered, it stops at once when
    # nothing is newer (bench/selection_at_size.py measures it at 5,000,000 CDRs).
    where = sql.SQL("WHERE created_at > %(covered)s ") if bounded else sql.SQL("")
    return sql.SQL("SELECT created_at FROM {relation} {where}ORDER BY created_at DESC LIMIT 1").format(
        relation=relation_identifier(relation), where=where
    )


async def read_state(conn: psycopg.AsyncConnection[Any], relation: str) -> WatchState:
    cur = await conn.execute(_READ_STATE, {"rel": relation})
    row = await cur.fetchone()
    assert row is not None  # the outer SELECT 1 always returns its row
    now, watermark, initialized, started_from, fired_through, fired_at, more_at = row
    return WatchState(
        now=now,
        watermark=watermark,
        initialized=initialized,
        started_from=started_from,
        fired_through=fired_through,
        fired_at=fired_at,
        more_at=more_at,
    )


async def newest_created_at(
    conn: psycopg.AsyncConnection[Any], relation: str, covered: dt.datetime | None
) -> dt.datetime | None:
    """The newest committed created_at of the source newer than ``covered`` (any, when None)."""
    cur = await conn.execute(newest_query(relation, covered is not None), {"covered": covered})
    row = await cur.fetchone()
    return row[0] if row else None


async def record_baseline(
    conn: psycopg.AsyncConnection[Any], relation: str, started_from: dt.datetime | None
) -> None:
    """The first start with no scan ever: rows up to ``started_from`` (or now) are history."""
    await conn.execute(
        "INSERT INTO cdr_webhook.watch_state (source_relation, started_from) "
        "VALUES (%s, COALESCE(%s, now())) ON CONFLICT (source_relation) DO NOTHING",
        (relation, started_from),
    )


async def record_fire(
    conn: psycopg.AsyncConnection[Any], relation: str, newest: dt.datetime | None
) -> dt.datetime:
    """
    Record that the watcher fires for rows up to ``newest`` (None: for more of the queue), before it
    yields: a restarted watcher does not fire again for the same rows. Return the fire's time.
    """
    cur = await conn.execute(
        "INSERT INTO cdr_webhook.watch_state AS s (source_relation, fired_through, fired_at, fires) "
        "VALUES (%(rel)s, %(newest)s, now(), 1) ON CONFLICT (source_relation) DO UPDATE SET "
        "fired_through = GREATEST(s.fired_through, EXCLUDED.fired_through), fired_at = now(), "
        "fires = s.fires + 1, updated_at = now() RETURNING fired_at",
        {"rel": relation, "newest": newest},
    )
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def notify_installed(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether an enabled trigger of the database calls :data:`NOTIFY_FUNCTION`."""
    cur = await conn.execute(_NOTIFY_INSTALLED, NOTIFY_FUNCTION)
    row = await cur.fetchone()
    return bool(row and row[0])


_NOTIFY_INSTALLED = (
    "SELECT EXISTS (SELECT 1 FROM pg_trigger AS t JOIN pg_proc AS p ON p.oid = t.tgfoid "
    "JOIN pg_namespace AS n ON n.oid = p.pronamespace "
    "WHERE n.nspname = %s AND p.proname = %s AND t.tgenabled <> 'D')"
)


# -- the select step's side (sync) ----------------------------------------------------------------


def started_from(conn: psycopg.Connection[Any], relation: str) -> dt.datetime | None:
    """Where the watcher started when there was no watermark: an event run's first scan starts there."""
    row = conn.execute(
        "SELECT started_from FROM cdr_webhook.watch_state WHERE source_relation = %s", (relation,)
    ).fetchone()
    return row[0] if row else None


def request_run(conn: psycopg.Connection[Any]) -> None:
    """Queued CDRs can go out now (an endpoint was resumed): ask every watcher for a run."""
    conn.execute("UPDATE cdr_webhook.watch_state SET more_at = clock_timestamp(), updated_at = now()")


def request_more(conn: psycopg.Connection[Any], relation: str) -> None:
    """A run took a full max_cdrs_per_run and CDRs wait: ask the watcher (if one runs) for another run."""
    # clock_timestamp, not the transaction's start: a fire after this write must count as after it.
    conn.execute(
        "UPDATE cdr_webhook.watch_state SET more_at = clock_timestamp(), updated_at = now() "
        "WHERE source_relation = %s",
        (relation,),
    )
