"""The retry policy of post_cdr: Retry-After honoured, capped; everything else left to Airflow."""

from __future__ import annotations

import datetime as dt

from airflow.sdk.definitions.retry_policy import RetryAction

from cdr_webhook.deliver.hook import retry_after_seconds
from cdr_webhook.deliver.operator import RetryAfterPolicy, RetryLater


def test_retry_after_sets_the_delay_up_to_the_cap():
    policy = RetryAfterPolicy(max_delay_seconds=900)
    decision = policy.evaluate(RetryLater("429", retry_after=120), try_number=1, max_tries=6)
    assert (decision.action, decision.retry_delay) == (RetryAction.RETRY, dt.timedelta(seconds=120))
    capped = policy.evaluate(RetryLater("503", retry_after=86400), try_number=1, max_tries=6)
    assert capped.retry_delay == dt.timedelta(seconds=900)


def test_without_retry_after_airflow_backoff_applies():
    policy = RetryAfterPolicy(max_delay_seconds=900)
    assert policy.evaluate(RetryLater("500"), try_number=1, max_tries=6).action is RetryAction.DEFAULT
    assert policy.evaluate(ValueError("x"), try_number=1, max_tries=6).action is RetryAction.DEFAULT
    assert RetryAfterPolicy.deserialize(policy.serialize()).max_delay_seconds == 900


def test_retry_after_header_forms():
    assert retry_after_seconds("120") == 120
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470) == 10
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490) == 0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None
