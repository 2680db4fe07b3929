"""What a try tells of each attempt: its line in the task log, and Airflow's metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk.observability.stats import Stats

from cdr_webhook.deliver.hook import describe_excerpt
from cdr_webhook.outcome import Verdict

if TYPE_CHECKING:
    import logging

    from cdr_webhook.outcome import Attempt

#: A CDR's line in the task log, by its attempt's outcome (the README quotes them).
DELIVERED_LINE = "CDR %s delivered to %s: HTTP %s in %d ms (attempt %d, webhook-id %s)"
FAILED_LINE = "CDR %s to endpoint %s failed: HTTP %s, %s (attempt %d, %d ms, webhook-id %s)"
#: Appended to the line on a CDR's first attempt: how long it waited to go out.
PICKUP = ", %.1f s after its created_at"


def log_attempt(log: logging.Logger, attempt: Attempt) -> None:
    """Log one attempt's outcome (a line per CDR: id, outcome, HTTP status, latency, webhook-id)."""
    claim, result, decision = attempt.claim, attempt.result, attempt.decision
    since = (attempt.pickup_seconds,) if attempt.number == 1 else ()
    pickup = PICKUP if since else ""
    if decision.verdict is Verdict.DELIVERED:
        line = DELIVERED_LINE + pickup
        log.info(
            line,
            claim.cdr_id,
            claim.endpoint,
            result.http_status,
            result.latency_ms,
            attempt.number,
            attempt.webhook_id,
            *since,
        )
        return
    line = FAILED_LINE + pickup
    log.error(
        line,
        claim.cdr_id,
        claim.endpoint,
        result.http_status if result.http_status is not None else "-",
        decision.error,
        attempt.number,
        result.latency_ms,
        attempt.webhook_id,
        *since,
    )
    if result.response_excerpt is not None:
        log.error("Response body starts: %s", describe_excerpt(result.response_excerpt))


def count(attempt: Attempt) -> None:
    """
    Emit Airflow metrics (StatsD / OpenTelemetry, as configured): the outcome, the POST's latency
    and, on a CDR's first attempt, its pickup latency (from its ``created_at`` to the POST).
    """
    tags = {"endpoint": attempt.claim.endpoint}
    decision = attempt.decision
    event = "retried" if decision.verdict is Verdict.RETRY else decision.status
    Stats.incr(f"cdr_webhook.{event}", tags=tags)
    Stats.timing("cdr_webhook.latency", attempt.result.latency_ms, tags=tags)
    if attempt.number == 1:
        Stats.timing("cdr_webhook.pickup_latency", round(attempt.pickup_seconds * 1000), tags=tags)
