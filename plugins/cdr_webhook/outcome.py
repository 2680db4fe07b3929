"""What one delivery attempt's result means: delivered, retry later, or fail now. Pure: no Airflow."""

from __future__ import annotations

import dataclasses
import enum


class DeliveryStatus(enum.StrEnum):
    """A ledger row's status: the state of one CDR's delivery to one endpoint."""

    QUEUED = "queued"  # waiting to be sent, or between two tries
    DELIVERED = "delivered"  # a 2xx came back
    FAILED = "failed"  # given up: no retry can help, or the retries ran out
    SKIPPED = "skipped"  # never to be sent: the row cannot be mapped (the error says why)


class Outcome(enum.Enum):
    """The verdict on one attempt."""

    DELIVERED = "delivered"
    RETRY = "retry"  # a later attempt can succeed: throttling, server errors, network trouble
    FAIL = "fail"  # no retry can help: the receiver refused this request


_RETRYABLE_4XX = frozenset({408, 429})


def classify_response(status: int) -> Outcome:
    """
    Classify an HTTP status: 2xx delivered; 408, 429 and 5xx retried; anything else fails at once.

    3xx is a failure: a webhook is never redirected, since following a redirect would turn the
    POST into a GET and hand the API key to another host.
    """
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status in _RETRYABLE_4XX or 500 <= status < 600:
        return Outcome.RETRY
    return Outcome.FAIL


def describe_status(status: int, reason: str | None) -> str:
    """Return the ledger's error text for a status that was not delivered."""
    text = f"HTTP {status}" + (f" {reason}" if reason else "")
    if 300 <= status < 400:
        text += " (redirects are never followed)"
    return text


GONE = 410


class Verdict(enum.Enum):
    """What the task does after recording an attempt."""

    SUCCEED = "succeed"  # delivered: the task succeeds
    RETRY = "retry"  # raise for Airflow to retry (after the receiver's Retry-After, if any)
    FAIL_NOW = "fail_now"  # no retry can help: fail without using the remaining tries
    EXHAUSTED = "exhausted"  # retryable, but this was the last try: fail


@dataclasses.dataclass(frozen=True)
class Decision:
    """The whole decision on one attempt: the ledger's record, the task's verdict, the endpoint's count."""

    status: DeliveryStatus  # to record: delivered, queued (a retry follows) or failed
    verdict: Verdict
    error: str | None  # the ledger's error text; None when delivered
    final: bool  # the delivery has ended (delivered or given up): it counts in the endpoint's streak
    gone: bool  # HTTP 410: the endpoint is to be paused


def decide_attempt(
    *,
    http_status: int | None,
    reason: str | None,
    error: str | None,
    refused: bool,
    try_number: int,
    max_tries: int,
) -> Decision:
    """
    Decide one attempt from what the POST produced and where the task stands in its tries.

    ``max_tries`` is the task instance's, not the operator's ``retries``: Airflow raises it when a
    task is cleared (``try_number + retries``), so a cleared task gets its retries again. A try is
    retried while ``try_number <= max_tries``. Only a delivery's end (delivered, failed at once or
    retries exhausted) counts in the endpoint's failure streak, never a try that will be retried.
    """
    if refused:
        outcome = Outcome.FAIL  # the egress guard or a malformed endpoint: nothing was sent
    elif http_status is None:
        outcome = Outcome.RETRY  # a timeout or a connection error
    else:
        outcome = classify_response(http_status)
    if outcome is Outcome.DELIVERED:
        return Decision(DeliveryStatus.DELIVERED, Verdict.SUCCEED, None, final=True, gone=False)
    text = error or describe_status(http_status or 0, reason)
    gone = http_status == GONE
    if outcome is Outcome.FAIL:
        return Decision(DeliveryStatus.FAILED, Verdict.FAIL_NOW, text, final=True, gone=gone)
    if try_number <= max_tries:
        return Decision(DeliveryStatus.QUEUED, Verdict.RETRY, text, final=False, gone=False)
    return Decision(DeliveryStatus.FAILED, Verdict.EXHAUSTED, text, final=True, gone=False)
