from __future__ import annotations

import pytest

from cdr_webhook.outcome import Outcome, classify_response, describe_status


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
