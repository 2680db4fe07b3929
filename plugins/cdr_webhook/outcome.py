"""What one POST produced and what it means: delivered, retry later, or fail now. Pure: no Airflow.

One value travels from the hook to the ledger: the hook's :class:`PostResult`, decided into a
:class:`Decision` (:func:`decide_attempt`), makes an :class:`Attempt`, which the ledger records as it is
(:func:`cdr_webhook.ledger.record_attempts`, :func:`cdr_webhook.ledger.pause_rules.record_outcomes`).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING

from cdr_webhook.redact import scrub

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Sequence


class DeliveryStatus(enum.StrEnum):
    """A ledger row's status: the state of one CDR's delivery to one endpoint."""

    QUEUED = "queued"  # waiting to be sent, or between two tries
    DELIVERED = "delivered"  # a 2xx came back
    FAILED = "failed"  # given up: no retry can help, or the retries ran out
    SKIPPED = "skipped"  # never to be sent: the row cannot be mapped (the error says why)


@dataclasses.dataclass(frozen=True)
class PostResult:
    """What one POST produced: a status line, or the network error that prevented one."""

    http_status: int | None
    reason: str | None
    response_excerpt: str | None
    latency_ms: int
    sent_at: float  # when the POST began, seconds since the epoch
    error: str | None = None
    refused: bool = False  # the egress guard refused the endpoint: no request was sent
    retry_after: float | None = None  # seconds the receiver asked us to wait (Retry-After)

    def scrubbed(self, secrets: Sequence[str]) -> PostResult:
        """The same result with every secret removed from the texts a receiver can echo into."""
        return dataclasses.replace(
            self,
            reason=scrub(self.reason, secrets),
            error=scrub(self.error, secrets),
            response_excerpt=scrub(self.response_excerpt, secrets),
        )


class Verdict(enum.Enum):
    """What an attempt means, and so what the task does after recording it."""

    DELIVERED = "delivered"  # a 2xx: the task succeeds
    RETRY = "retry"  # a later attempt can succeed (throttling, server errors, network trouble): retry
    FAIL_NOW = "fail_now"  # no retry can help (the receiver refused this request): fail at once
    EXHAUSTED = "exhausted"  # retryable, but this was the last try: fail


_STATUS_OF = {
    Verdict.DELIVERED: DeliveryStatus.DELIVERED,
    Verdict.RETRY: DeliveryStatus.QUEUED,  # a retry follows
    Verdict.FAIL_NOW: DeliveryStatus.FAILED,
    Verdict.EXHAUSTED: DeliveryStatus.FAILED,
}

_RETRYABLE_4XX = frozenset({408, 429})
GONE = 410


def classify_response(status: int) -> Verdict:
    """
    Classify an HTTP status: 2xx delivered; 408, 429 and 5xx retried; anything else fails at once.

    3xx is a failure: a webhook is never redirected, since following a redirect would turn the
    POST into a GET and hand the API key to another host.
    """
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status in _RETRYABLE_4XX or 500 <= status < 600:
        return Verdict.RETRY
    return Verdict.FAIL_NOW


def describe_status(status: int, reason: str | None) -> str:
    """Return the ledger's error text for a status that was not delivered."""
    text = f"HTTP {status}" + (f" {reason}" if reason else "")
    if 300 <= status < 400:
        text += " (redirects are never followed)"
    return text


@dataclasses.dataclass(frozen=True)
class Decision:
    """The decision on one attempt: the task's verdict, the ledger's error text, and a 410."""

    verdict: Verdict
    error: str | None = None  # the ledger's error text; None when delivered
    gone: bool = False  # HTTP 410: the endpoint is to be paused

    @property
    def status(self) -> DeliveryStatus:
        """The ledger row's status to record: delivered, queued (a retry follows) or failed."""
        return _STATUS_OF[self.verdict]

    @property
    def final(self) -> bool:
        """The delivery has ended (delivered or given up): it counts in the endpoint's streak."""
        return self.verdict is not Verdict.RETRY


def decide_attempt(result: PostResult, *, try_number: int, max_tries: int) -> Decision:
    """
    Decide one attempt from what the POST produced and where the task stands in its tries.

    ``max_tries`` is the task instance's, not the operator's ``retries``: Airflow raises it when a
    task is cleared (``try_number + retries``), so a cleared task gets its retries again. A try is
    retried while ``try_number <= max_tries``. Only a delivery's end (delivered, failed at once or
    retries exhausted) counts in the endpoint's failure streak, never a try that will be retried.
    """
    if result.refused:
        verdict = Verdict.FAIL_NOW  # the egress guard or a malformed endpoint: nothing was sent
    elif result.http_status is None:
        verdict = Verdict.RETRY  # a timeout or a connection error
    else:
        verdict = classify_response(result.http_status)
    if verdict is Verdict.DELIVERED:
        return Decision(verdict)
    text = result.error or describe_status(result.http_status or 0, result.reason)
    if verdict is Verdict.FAIL_NOW:
        return Decision(verdict, text, gone=result.http_status == GONE)
    if try_number <= max_tries:
        return Decision(Verdict.RETRY, text)
    return Decision(Verdict.EXHAUSTED, text)


@dataclasses.dataclass(frozen=True)
class Claim:
    """A ledger row a run owns: one CDR to POST to one endpoint; :mod:`cdr_webhook.ledger.claims` reads it."""

    cdr_id: str
    endpoint: str
    client_id: int | None
    cdr_created_at: dt.datetime
    status: str
    attempts: int


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One POST of one CDR: its claim, what the POST produced, what was decided, its ``webhook-id``."""

    claim: Claim
    result: PostResult
    decision: Decision
    webhook_id: str

    @property
    def number(self) -> int:
        """The attempt's number in the CDR's delivery (1 for its first POST)."""
        return self.claim.attempts + 1

    @property
    def pickup_seconds(self) -> float:
        """How long after the CDR's ``created_at`` this POST began."""
        return self.result.sent_at - self.claim.cdr_created_at.timestamp()
