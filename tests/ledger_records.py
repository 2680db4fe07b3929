"""Attempts and endpoint decisions as the delivery engine makes them, for tests that record by hand."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from cdr_webhook.outcome import Attempt, Decision, PostResult, Verdict
from cdr_webhook.signing import webhook_id

if TYPE_CHECKING:
    from cdr_webhook.ledger import Claim

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
    result = PostResult(http_status, None, excerpt, latency_ms, sent_at=time.time())
    decision = Decision(VERDICT_OF[status], error=error)
    return Attempt(claim, result, decision, webhook_id(claim.cdr_id, claim.endpoint))


def outcome(*, delivered: bool, final: bool = True, gone: bool = False) -> Decision:
    """A decided attempt as its endpoint counts it, for ``endpoints.record_outcomes``."""
    if delivered:
        return Decision(Verdict.DELIVERED)
    return Decision(Verdict.FAIL_NOW if final else Verdict.RETRY, gone=gone)
