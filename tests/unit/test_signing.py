from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from cdr_webhook.signing import InvalidSigningSecret, build_headers, sign, webhook_id

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"o" * 24).decode()


def test_webhook_id_is_stable_per_cdr_and_endpoint_and_has_no_dot():
    first = webhook_id("cdr.1", "cdr_webhook")
    assert first == webhook_id("cdr.1", "cdr_webhook")
    assert first != webhook_id("cdr.1", "cdr_webhook_client_7")
    assert first != webhook_id("cdr.2", "cdr_webhook")
    assert "." not in first
    assert first.startswith("msg_")


def test_signature_verifies_with_the_reference_library():
    body = b'{"cdr_id":"1","callerid":"{{ 7 * 7 }}"}'
    now = int(time.time())
    headers = build_headers(msg_id="msg_1", timestamp=now, body=body, api_key="k", signing_secrets=[SECRET])
    assert Webhook(SECRET).verify(body, headers) == {"cdr_id": "1", "callerid": "{{ 7 * 7 }}"}


def test_one_byte_tamper_and_stale_timestamp_are_rejected():
    body = b'{"cdr_id":"1"}'
    now = int(time.time())
    headers = build_headers(msg_id="msg_1", timestamp=now, body=body, api_key=None, signing_secrets=[SECRET])
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(b'{"cdr_id":"2"}', headers)
    old = build_headers(
        msg_id="msg_1", timestamp=now - 360, body=body, api_key=None, signing_secrets=[SECRET]
    )
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body, old)


def test_two_secrets_give_two_signatures_each_verifying():
    body = b"{}"
    headers = build_headers(
        msg_id="msg_1",
        timestamp=int(time.time()),
        body=body,
        api_key=None,
        signing_secrets=[SECRET, OTHER_SECRET],
    )
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(SECRET).verify(body, headers)
    Webhook(OTHER_SECRET).verify(body, headers)


def test_headers_are_exactly_the_contract():
    body = b"{}"
    assert set(build_headers(msg_id="m", timestamp=1, body=body, api_key=None)) == {
        "content-type",
        "webhook-id",
        "webhook-timestamp",
    }
    full = build_headers(msg_id="m", timestamp=1, body=body, api_key="key-123", signing_secrets=[SECRET])
    assert full["x-api-key"] == "key-123"
    assert full["content-type"] == "application/json"
    assert full["webhook-signature"] == sign(SECRET, "m", 1, body)


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("not-prefixed", "must start with 'whsec_'"),
        ("whsec_%%%", "followed by base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "24-64 bytes, not 5"),
    ],
)
def test_bad_secret_is_refused_with_the_rule(secret, problem):
    with pytest.raises(InvalidSigningSecret, match=problem):
        sign(secret, "m", 1, b"{}")
