"""Attempts built through the public :mod:`cdr_webhook.outcome` API, for benchmarks that record by hand."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from cdr_webhook.outcome import Attempt, Claim, Decision, PostResult, Verdict
from cdr_webhook.signing import webhook_id

if TYPE_CHECKING:
    import psycopg

#: The verdict that leaves a ledger row in each status (a retry leaves it queued).
VERDICT_OF = {"delivered": Verdict.DELIVERED, "queued": Verdict.RETRY, "failed": Verdict.FAIL_NOW}


def attempt(
    claim: Claim,
    status: str,
    http_status: int | None = None,
    error: str | None = None,
    excerpt: str | None = None,
    latency_ms: int = 1,
) -> Attempt:
    """One POST of ``claim`` that leaves its row in ``status``, for ``ledger.record_attempts``."""
    if status not in VERDICT_OF:
        raise ValueError(f"status {status!r}: expected one of {', '.join(VERDICT_OF)}")
    result = PostResult(http_status, None, excerpt, latency_ms, sent_at=time.time())
    return Attempt(
        claim, result, Decision(VERDICT_OF[status], error=error), webhook_id(claim.cdr_id, claim.endpoint)
    )


def delivered_claims(conn: psycopg.Connection[Any], count: int, endpoint: str | None = None) -> list[Claim]:
    """Claims of the newest ``count`` delivered ledger rows (of ``endpoint`` if given), as runs hold them."""
    rows = conn.execute(
        "SELECT cdr_id, endpoint, client_id, cdr_created_at FROM cdr_webhook.delivery "
        "WHERE status = 'delivered' AND (%(endpoint)s::text IS NULL OR endpoint = %(endpoint)s) "
        "ORDER BY cdr_created_at DESC LIMIT %(count)s",
        {"endpoint": endpoint, "count": count},
    )
    return [Claim(cdr_id, name, client_id, created, "queued", 1) for cdr_id, name, client_id, created in rows]
