"""The commit watcher's row in ``cdr_webhook.watch_state``: read on each poll, a baseline, each fire.

Async (the watcher runs in the triggerer's event loop); the select step's and a resume's statements
on the row are in :mod:`cdr_webhook.ledger.watch_requests`, its health in
:mod:`cdr_webhook.ledger.watch_health`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datetime as dt

    import psycopg

_READ_STATE = (
    "SELECT now(), (SELECT created_at FROM cdr_webhook.watermark WHERE source_relation = %(rel)s), "
    "s.source_relation IS NOT NULL, s.started_from, s.fired_through, s.fired_at, s.more_at "
    "FROM (SELECT 1) AS one LEFT JOIN cdr_webhook.watch_state AS s ON s.source_relation = %(rel)s"
)


async def read(conn: psycopg.AsyncConnection[Any], relation: str) -> tuple[Any, ...]:
    """
    ``(now, watermark, initialized, started_from, fired_through, fired_at, more_at)``: the
    database's clock, the ledger's watermark, whether the row exists, and the row's times.
    """
    cur = await conn.execute(_READ_STATE, {"rel": relation})
    row = await cur.fetchone()
    assert row is not None  # the outer SELECT 1 always returns its row
    return tuple(row)


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
