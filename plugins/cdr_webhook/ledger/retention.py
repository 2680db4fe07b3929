"""Retention: finished ledger rows older than ``retention_days`` are deleted, a bounded batch per run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datetime as dt

    import psycopg


def prune(conn: psycopg.Connection[Any], *, before: dt.datetime, limit: int = 10_000) -> int:
    """
    Delete at most ``limit`` finished ledger rows (delivered, failed, skipped) of CDRs created before
    ``before``, and the run records selected before it; return how many ledger rows went.

    Queued rows are never deleted: they are work still to do. Bounded so that one run's select step
    stays short; the next runs go on where it stopped.
    """
    with conn.transaction():
        deleted = conn.execute(
            "DELETE FROM cdr_webhook.delivery WHERE ctid IN ("
            "  SELECT ctid FROM cdr_webhook.delivery WHERE cdr_created_at < %s AND status <> 'queued' "
            "  LIMIT %s)",
            (before, limit),
        ).rowcount
        conn.execute(
            "DELETE FROM cdr_webhook.run_selection AS r WHERE r.selected_at < %s AND NOT EXISTS ("
            "  SELECT 1 FROM cdr_webhook.delivery AS d WHERE d.dag_id = r.dag_id AND d.run_id = r.run_id)",
            (before,),
        )
    return deleted
