"""The watermark of a source relation, and the cursor of its reconciliation sweep (one row per relation).

A scheduled scan reads from the watermark (minus ``lag_seconds``) and moves it to where it stopped; a
reconciliation re-checks a slice of the last ``reconcile_hours`` for CDRs whose transaction committed
after a scan had passed them (their rows are queued by :func:`cdr_webhook.ledger.queue.enqueue_new`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datetime as dt

    import psycopg


def lock_watermark(conn: psycopg.Connection[Any], relation: str) -> dt.datetime | None:
    """Return the stored watermark, locking its row until the transaction ends (None before run 1)."""
    conn.execute(
        "INSERT INTO cdr_webhook.watermark (source_relation) VALUES (%s) "
        "ON CONFLICT (source_relation) DO NOTHING",
        (relation,),
    )
    row = conn.execute(
        "SELECT created_at FROM cdr_webhook.watermark WHERE source_relation = %s FOR UPDATE", (relation,)
    ).fetchone()
    return row[0] if row else None


def advance_watermark(conn: psycopg.Connection[Any], relation: str, created_at: dt.datetime) -> None:
    """Move the watermark forward to ``created_at`` (never backward)."""
    # GREATEST ignores NULL, so the first run's NULL watermark simply becomes created_at.
    conn.execute(
        "UPDATE cdr_webhook.watermark SET created_at = GREATEST(created_at, %s), updated_at = now() "
        "WHERE source_relation = %s",
        (created_at, relation),
    )


def note_scan_start(conn: psycopg.Connection[Any], relation: str, start: dt.datetime) -> None:
    """Remember where the very first scan began: reconciliation never reaches before it."""
    conn.execute(
        "UPDATE cdr_webhook.watermark SET scanned_from = %s "
        "WHERE source_relation = %s AND scanned_from IS NULL",
        (start, relation),
    )


def due_reconciliation(
    conn: psycopg.Connection[Any], relation: str, *, now: dt.datetime, interval_seconds: int
) -> dt.datetime | None:
    """
    Return where scans began if a reconciliation is due (recording it as run at ``now``), else None.

    Call it with the watermark locked (:func:`lock_watermark`): one run at a time decides.
    """
    row = conn.execute(
        "UPDATE cdr_webhook.watermark SET reconciled_at = %(now)s "
        "WHERE source_relation = %(relation)s AND scanned_from IS NOT NULL "
        "AND (reconciled_at IS NULL OR reconciled_at <= %(now)s - make_interval(secs => %(secs)s)) "
        "RETURNING scanned_from",
        {"now": now, "relation": relation, "secs": interval_seconds},
    ).fetchone()
    return row[0] if row else None


def reconcile_slice(
    conn: psycopg.Connection[Any],
    relation: str,
    *,
    start: dt.datetime,
    before: dt.datetime,
    max_cdrs: int,
) -> tuple[dt.datetime, dt.datetime] | None:
    """
    Return the next slice ``[low, high)`` of the reconciliation's sweep, and move the cursor past it.

    A sweep checks ``[start, before)`` as it was when the sweep began, oldest first, one slice per
    reconciliation: a slice ends after about ``max_cdrs`` ledger rows (the index on their created_at
    counts them; the source is a view, counting its rows means joining them), so a reconciliation's
    work is bounded however many CDRs a day brings. When the cursor reaches the sweep's end, or the
    window has moved past it, the next slice begins a new sweep at ``start``. Returns None when the
    window is empty. Call it with the watermark locked (:func:`lock_watermark`).
    """
    row = conn.execute(
        "SELECT reconcile_cursor, reconcile_until FROM cdr_webhook.watermark WHERE source_relation = %s",
        (relation,),
    ).fetchone()
    cursor, until = row if row else (None, None)
    if until is not None:
        until = min(until, before)
    if cursor is None or until is None or max(cursor, start) >= until:
        cursor, until = start, before  # a new sweep
    low = max(cursor, start)
    if low >= until:
        return None
    # The created_at of the ledger row max_cdrs rows on: the slice ends there (or at the sweep's end).
    found = conn.execute(
        "SELECT cdr_created_at FROM cdr_webhook.delivery "
        "WHERE cdr_created_at >= %(low)s AND cdr_created_at < %(until)s "
        "ORDER BY cdr_created_at OFFSET %(rows)s LIMIT 1",
        {"low": low, "until": until, "rows": max_cdrs},
    ).fetchone()
    high = found[0] if found else until
    if high <= low:  # more than max_cdrs rows at one instant: the slice takes them all
        found = conn.execute(
            "SELECT min(cdr_created_at) FROM cdr_webhook.delivery "
            "WHERE cdr_created_at > %(low)s AND cdr_created_at < %(until)s",
            {"low": low, "until": until},
        ).fetchone()
        high = found[0] if found and found[0] is not None else until
    conn.execute(
        "UPDATE cdr_webhook.watermark SET reconcile_cursor = %s, reconcile_until = %s "
        "WHERE source_relation = %s",
        (high, until, relation),
    )
    return low, high
