"""What each attempt produced, on its CDR's ledger row: count, status, HTTP status, error, latency.

Every update that adds an attempt also adds a row to ``cdr_webhook.delivery_attempt``, the attempt
history the Deliveries page shows: a PL/pgSQL trigger on ``cdr_webhook.delivery`` writes it when
``attempts`` grows (schema step 6, :mod:`cdr_webhook.ledger.schema`), so the one-CDR and the batched
chunk records are both covered.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from cdr_webhook.outcome import DeliveryStatus

if TYPE_CHECKING:
    from collections.abc import Sequence

    import psycopg

    from cdr_webhook.ledger.claims import Claim


def mark_skipped(conn: psycopg.Connection[Any], claim: Claim, reason: str) -> None:
    """Record that a CDR will not be sent, and why."""
    mark_skipped_many(conn, [(claim, reason)])


def mark_skipped_many(conn: psycopg.Connection[Any], skipped: Sequence[tuple[Claim, str]]) -> None:
    """Record that these CDRs will not be sent, each with its reason, in one statement."""
    if not skipped:
        return
    conn.execute(
        "UPDATE cdr_webhook.delivery AS d SET status = 'skipped', error = s.reason, updated_at = now() "
        "FROM unnest(%s::text[], %s::text[], %s::text[]) AS s(cdr_id, endpoint, reason) "
        "WHERE d.cdr_id = s.cdr_id AND d.endpoint = s.endpoint",
        (
            [claim.cdr_id for claim, _ in skipped],
            [claim.endpoint for claim, _ in skipped],
            [reason for _, reason in skipped],
        ),
    )


@dataclasses.dataclass(frozen=True)
class AttemptRecord:
    """One attempt's result, as its CDR's ledger row records it."""

    claim: Claim
    status: str
    http_status: int | None
    error: str | None
    response_excerpt: str | None
    latency_ms: int | None


def record_attempts(conn: psycopg.Connection[Any], records: Sequence[AttemptRecord]) -> None:
    """
    Record attempts on their CDRs' rows in one statement (an UPDATE of each row, as one attempt's is).

    Each row gets one more attempt, its status, HTTP status, error, response excerpt and latency.
    """
    for record in records:
        if record.status not in DeliveryStatus.__members__.values():
            raise ValueError(f"unknown ledger status {record.status!r}")
    if not records:
        return
    columns = {
        "cdr_ids": [r.claim.cdr_id for r in records],
        "endpoints": [r.claim.endpoint for r in records],
        "statuses": [r.status for r in records],
        "http_statuses": [r.http_status for r in records],
        "errors": [r.error for r in records],
        "excerpts": [r.response_excerpt for r in records],
        "latencies": [r.latency_ms for r in records],
    }
    with conn.transaction():
        conn.execute(
            "UPDATE cdr_webhook.delivery AS d SET attempts = d.attempts + 1, status = a.status, "
            "http_status = a.http_status, error = a.error, response_excerpt = a.excerpt, "
            "latency_ms = a.latency_ms, last_attempt_at = now(), updated_at = now(), "
            "delivered_at = CASE WHEN a.status = 'delivered' THEN now() ELSE d.delivered_at END "
            "FROM unnest(%(cdr_ids)s::text[], %(endpoints)s::text[], %(statuses)s::text[], "
            "  %(http_statuses)s::int[], %(errors)s::text[], %(excerpts)s::text[], %(latencies)s::int[]) "
            "  AS a(cdr_id, endpoint, status, http_status, error, excerpt, latency_ms) "
            "WHERE d.cdr_id = a.cdr_id AND d.endpoint = a.endpoint",
            columns,
        )
