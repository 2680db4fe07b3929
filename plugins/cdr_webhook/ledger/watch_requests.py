"""The watcher's state row as the rest of the ledger sees it: where the watcher started, and requests
for another run.

The commit watcher (:mod:`cdr_webhook.watch`) owns ``cdr_webhook.watch_state``; the select step reads
where it started and asks for one more run after a full one, and a resumed endpoint asks for a run
for its queued CDRs. Each is one statement on the caller's connection (sync).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datetime as dt

    import psycopg


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
