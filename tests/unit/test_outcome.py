from __future__ import annotations

import pytest

from cdr_webhook.outcome import (
    Decision,
    PostResult,
    Verdict,
    classify_response,
    decide_attempt,
    describe_status,
)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Verdict.DELIVERED),
        (202, Verdict.DELIVERED),
        (204, Verdict.DELIVERED),
        (301, Verdict.FAIL_NOW),
        (302, Verdict.FAIL_NOW),
        (307, Verdict.FAIL_NOW),
        (308, Verdict.FAIL_NOW),
        (400, Verdict.FAIL_NOW),
        (401, Verdict.FAIL_NOW),
        (404, Verdict.FAIL_NOW),
        (410, Verdict.FAIL_NOW),
        (413, Verdict.FAIL_NOW),
        (408, Verdict.RETRY),
        (429, Verdict.RETRY),
        (500, Verdict.RETRY),
        (502, Verdict.RETRY),
        (503, Verdict.RETRY),
        (504, Verdict.RETRY),
        (100, Verdict.FAIL_NOW),
    ],
)
def test_classify_response(status, outcome):
    assert classify_response(status) is outcome


def test_redirect_error_says_it_was_not_followed():
    assert describe_status(302, "Found") == "HTTP 302 Found (redirects are never followed)"
    assert describe_status(400, "Bad Request") == "HTTP 400 Bad Request"


def decide(http_status=None, *, error=None, refused=False, try_number=1, max_tries=3, reason=None):
    result = PostResult(http_status, reason, None, latency_ms=1, sent_at=0.0, error=error, refused=refused)
    return decide_attempt(result, try_number=try_number, max_tries=max_tries)


def test_a_2xx_is_delivered_and_ends_the_delivery():
    decision = decide(204, try_number=4, max_tries=3)
    assert decision == Decision(Verdict.DELIVERED, None, gone=False)
    assert (decision.status, decision.final) == ("delivered", True)


@pytest.mark.parametrize("status", [429, 503, None])
def test_a_retryable_failure_is_retried_while_tries_remain(status):
    decision = decide(status, error=None if status else "timed out", try_number=3, max_tries=3)
    assert (decision.status, decision.verdict, decision.final) == ("queued", Verdict.RETRY, False)
    assert decision.error == ("timed out" if status is None else describe_status(status, None))


def test_the_last_try_of_a_retryable_failure_gives_up():
    decision = decide(503, reason="Service Unavailable", try_number=4, max_tries=3)
    assert decision == Decision(Verdict.EXHAUSTED, "HTTP 503 Service Unavailable", gone=False)
    assert (decision.status, decision.final) == ("failed", True)


def test_a_cleared_task_is_judged_by_its_max_tries_not_its_retries():
    # retries = 3; exhausted after try 4, then cleared: Airflow sets max_tries = 4 + 3 = 7.
    assert decide(503, try_number=5, max_tries=7).verdict is Verdict.RETRY
    assert decide(503, try_number=7, max_tries=7).verdict is Verdict.RETRY
    assert decide(503, try_number=8, max_tries=7).verdict is Verdict.EXHAUSTED


@pytest.mark.parametrize("status", [400, 401, 302, 410])
def test_a_refusal_by_the_receiver_fails_at_once_whatever_the_tries(status):
    decision = decide(status, try_number=1, max_tries=6)
    assert (decision.status, decision.verdict, decision.final) == ("failed", Verdict.FAIL_NOW, True)
    assert decision.gone is (status == 410)


def test_a_refused_endpoint_fails_at_once_with_its_error():
    decision = decide(None, error="refused by the egress guard: …", refused=True, max_tries=6)
    assert decision == Decision(Verdict.FAIL_NOW, "refused by the egress guard: …", gone=False)
    assert (decision.status, decision.final) == ("failed", True)
