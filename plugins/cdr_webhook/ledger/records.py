"""What each attempt produced, on its CDR's ledger row: count, status, HTTP status, error, latency.

Every update that adds an attempt also adds a row to ``cdr_webhook.delivery_attempt``, the attempt
history the Deliveries page shows: a PL/pgSQL trigger on ``cdr_webhook.delivery`` writes it when
``attempts`` grows (schema step 6, :mod:`cdr_webhook.ledger.schema`), so the one-CDR and the batched
chunk records are both covered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cdr_webhook.ledger import health
from cdr_webhook.outcome import DeliveryStatus

if TYPE_CHECKING:
    from collections.abc import Sequence

    import psycopg

    from cdr_webhook.ledger.claims import Claim
    from cdr_webhook.outcome import Attempt


def mark_skipped(conn: psycopg.Connection[Any], claim: Claim, reason: str) -> None:
    """Record that a CDR will not be sent, and why."""
    mark_skipped_many(conn, [(claim, reason)])


def mark_skipped_many(conn: psycopg.Connection[Any], skipped: Sequence[tuple[Claim, str]]) -> None:
    """Record that these CDRs will not be sent, each with its reason, in one statement."""
    if not skipped:
        return
    conn.execute(
        "UPDATE cdr_webhook.delivery AS d SET status = %s, error = s.reason, updated_at = now() "
        "FROM unnest(%s::text[], %s::text[], %s::text[]) AS s(cdr_id, endpoint, reason) "
        "WHERE d.cdr_id = s.cdr_id AND d.endpoint = s.endpoint",
        (
            DeliveryStatus.SKIPPED,
            [claim.cdr_id for claim, _ in skipped],
            [claim.endpoint for claim, _ in skipped],
            [reason for _, reason in skipped],
        ),
    )


def record_attempts(conn: psycopg.Connection[Any], attempts: Sequence[Attempt]) -> None:
    """
    Record attempts on their CDRs' rows in one statement (an UPDATE of each row, as one attempt's is).

    Each row gets one more attempt, its status, HTTP status, error, response excerpt and latency;
    the endpoint's health rollup (:mod:`cdr_webhook.ledger.health`) counts them in the same statement.
    """
    if not attempts:
        return
    _write(
        conn,
        [a.claim for a in attempts],
        [a.decision.status for a in attempts],
        [a.result.http_status for a in attempts],
        [a.decision.error for a in attempts],
        [a.result.response_excerpt for a in attempts],
        [a.result.latency_ms for a in attempts],
        health.rollups(attempts),
    )


def _write(
    conn: psycopg.Connection[Any],
    claims: Sequence[Claim],
    statuses: list[str],
    http_statuses: list[int | None],
    errors: list[str | None],
    excerpts: list[str | None],
    latencies: list[int | None],
    rollups: Sequence[health.Rollup] = (),
) -> None:
    columns = {
        "cdr_ids": [claim.cdr_id for claim in claims],
        "endpoints": [claim.endpoint for claim in claims],
        "statuses": statuses,
        "http_statuses": http_statuses,
        "errors": errors,
        "excerpts": excerpts,
        "latencies": latencies,
    }
    update = (
        "UPDATE cdr_webhook.delivery AS d SET attempts = d.attempts + 1, status = a.status, "
        "http_status = a.http_status, error = a.error, response_excerpt = a.excerpt, "
        "latency_ms = a.latency_ms, last_attempt_at = now(), updated_at = now(), "
        "delivered_at = CASE WHEN a.status = 'delivered' THEN now() ELSE d.delivered_at END "
        "FROM unnest(%(cdr_ids)s::text[], %(endpoints)s::text[], %(statuses)s::text[], "
        "  %(http_statuses)s::int[], %(errors)s::text[], %(excerpts)s::text[], %(latencies)s::int[]) "
        "  AS a(cdr_id, endpoint, status, http_status, error, excerpt, latency_ms) "
        "WHERE d.cdr_id = a.cdr_id AND d.endpoint = a.endpoint"
    )
    with conn.transaction():
        if rollups:  # the endpoint's health rollup in the same statement (ledger/health.py)
            statement = f"WITH recorded AS ({update}) {health.ADD_ROWS}"
            conn.execute(statement, columns | health.add_params(rollups))
        else:
            conn.execute(update, columns)
