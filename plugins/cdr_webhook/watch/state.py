"""What the commit watcher reads on each poll: its state, the source's newest commit, the NOTIFY trigger.

Its state is the ledger's row (:mod:`cdr_webhook.ledger.watch_state`), as the firing rule reads it.

The trigger reads through psycopg's async connection (it runs in the triggerer's event loop).
Identifiers go through :mod:`psycopg.sql`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psycopg import sql

from cdr_webhook.db import relation_identifier
from cdr_webhook.ledger import watch_state
from cdr_webhook.watch.firing import WatchState

if TYPE_CHECKING:
    import datetime as dt

    import psycopg

#: The channel the NOTIFY trigger of sql/notify_trigger.sql notifies on.
CHANNEL = "cdr_webhook_commits"
#: The trigger function that sql/notify_trigger.sql creates; its triggers mean NOTIFY is installed.
NOTIFY_FUNCTION = ("cdr_webhook", "notify_commit")


def newest_query(relation: str, bounded: bool) -> sql.Composed:
    """
    The watcher's poll: the newest ``created_at`` up to the database's clock (and newer than
    ``%(covered)s`` when ``bounded``).

    Only rows a scan starting now reads count: a row dated ahead of the clock is read by the scan
    that reaches its time, and one dated 'infinity' or past year 9999 (which Python cannot load) by
    none. Counted, the first kept the watcher firing for rows no scan could cover, and the second
    failed every poll.
    """
    # One probe of the created_at index, backwards from now; bounded by what is covered, it stops at
    # once when nothing is newer (bench/selection_at_size.py measures it at 5,000,000 CDRs).
    covered = sql.SQL(" AND created_at > %(covered)s") if bounded else sql.SQL("")
    return sql.SQL(
        "SELECT created_at FROM {relation} WHERE created_at <= now(){covered} "
        "ORDER BY created_at DESC LIMIT 1"
    ).format(relation=relation_identifier(relation), covered=covered)


async def read_state(conn: psycopg.AsyncConnection[Any], relation: str) -> WatchState:
    """The watcher's row for ``relation`` and the ledger's watermark, as the firing rule reads them."""
    now, watermark, initialized, started_from, fired_through, fired_at, more_at = await watch_state.read(
        conn, relation
    )
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
