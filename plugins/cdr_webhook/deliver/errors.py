"""How a try of ``post_cdr`` ends when it does not succeed: the exceptions Airflow acts on."""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from cdr_webhook.outcome import Verdict


class RetryLater(AirflowException):
    """A retryable failure; ``retry_after`` is the wait the receiver asked for (Retry-After), if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def task_exception(verdict: Verdict, message: str, *, retry_after: float | None = None) -> AirflowException:
    """What a try raises for a verdict that is not a delivery: retry (after ``retry_after``), or fail."""
    if verdict is Verdict.RETRY:
        return RetryLater(message, retry_after=retry_after)
    if verdict is Verdict.FAIL_NOW:
        return AirflowFailException(message)
    return AirflowException(message)  # exhausted: the last try failed, Airflow marks the task failed
