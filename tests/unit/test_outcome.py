from __future__ import annotations

import pytest

from cdr_webhook.outcome import Decision, Outcome, Verdict, classify_response, decide_attempt, describe_status


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (202, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (301, Outcome.FAIL),
        (302, Outcome.FAIL),
        (307, Outcome.FAIL),
        (308, Outcome.FAIL),
        (400, Outcome.FAIL),
        (401, Outcome.FAIL),
        (404, Outcome.FAIL),
        (410, Outcome.FAIL),
        (413, Outcome.FAIL),
        (408, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (502, Outcome.RETRY),
        (503, Outcome.RETRY),
        (504, Outcome.RETRY),
        (100, Outcome.FAIL),
    ],
)
def test_classify_response(status, outcome):
    assert classify_response(status) is outcome


def test_redirect_error_says_it_was_not_followed():
    assert describe_status(302, "Found") == "HTTP 302 Found (redirects are never followed)"
    assert describe_status(400, "Bad Request") == "HTTP 400 Bad Request"


def decide(http_status=None, *, error=None, refused=False, try_number=1, max_tries=3, reason=None):
    return decide_attempt(
        http_status=http_status,
        reason=reason,
        error=error,
        refused=refused,
        try_number=try_number,
        max_tries=max_tries,
    )


def test_a_2xx_is_delivered_and_ends_the_delivery():
    decision = decide(204, try_number=4, max_tries=3)
    assert decision == Decision("delivered", Verdict.SUCCEED, None, final=True, gone=False)


@pytest.mark.parametrize("status", [429, 503, None])
def test_a_retryable_failure_is_retried_while_tries_remain(status):
    decision = decide(status, error=None if status else "timed out", try_number=3, max_tries=3)
    assert (decision.status, decision.verdict, decision.final) == ("queued", Verdict.RETRY, False)
    assert decision.error == ("timed out" if status is None else describe_status(status, None))


def test_the_last_try_of_a_retryable_failure_gives_up():
    decision = decide(503, reason="Service Unavailable", try_number=4, max_tries=3)
    assert decision == Decision(
        "failed", Verdict.EXHAUSTED, "HTTP 503 Service Unavailable", final=True, gone=False
    )


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
    assert decision == Decision(
        "failed", Verdict.FAIL_NOW, "refused by the egress guard: …", final=True, gone=False
    )
