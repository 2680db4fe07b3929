"""What one delivery attempt's result means: delivered, retry later, or fail now. Pure: no Airflow."""

from __future__ import annotations

import enum


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
