"""Retention: finished ledger rows older than ``retention_days`` are deleted, a bounded batch per run.

How far it has gone is recorded (``cdr_webhook.retention``): a ``policy: missing`` window is refused
only where the ledger may have lost rows, not merely because it is older than ``retention_days``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from cdr_webhook.ledger import health

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
        # Locks the bound's row first: concurrent prunes record in turn, the bound only ever grows.
        state = pruned(conn, lock=True)
        deleted = conn.execute(
            "DELETE FROM cdr_webhook.delivery WHERE ctid IN ("
            "  SELECT ctid FROM cdr_webhook.delivery WHERE cdr_created_at < %s AND status <> 'queued' "
            "  LIMIT %s)",
            (before, limit),
        ).rowcount
        # The health charts' rollup keeps its own span (a week and a day), whatever retention_days.
        conn.execute("DELETE FROM cdr_webhook.endpoint_health WHERE bucket < now() - %s", (health.KEEP,))
        conn.execute(
            "DELETE FROM cdr_webhook.run_selection AS r WHERE r.selected_at < %s AND NOT EXISTS ("
            "  SELECT 1 FROM cdr_webhook.delivery AS d WHERE d.dag_id = r.dag_id AND d.run_id = r.run_id)",
            (before,),
        )
        if deleted or not state.known:
            # Nothing deleted leaves a known ledger whole. An install of unknown history is bounded
            # from now on by this cut: an earlier release pruned before it too (same retention).
            conn.execute(
                "UPDATE cdr_webhook.retention SET pruned_before = GREATEST(pruned_before, %s), "
                "known = true, updated_at = now()",
                (before,),
            )
    return deleted


@dataclasses.dataclass(frozen=True)
class Pruned:
    """How far retention has gone: finished rows created before ``before`` may be gone."""

    before: dt.datetime | None  # None: nothing was ever pruned (as far as ``known``)
    known: bool  # False: an install from before this was recorded; it may have pruned anything


def pruned(conn: psycopg.Connection[Any], *, lock: bool = False) -> Pruned:
    """Read how far retention has pruned the ledger (with ``lock``, hold its row to the transaction's end)."""
    row = conn.execute(
        "SELECT pruned_before, known FROM cdr_webhook.retention" + (" FOR UPDATE" if lock else "")
    ).fetchone()
    return Pruned(before=row[0], known=row[1]) if row else Pruned(before=None, known=False)
