"""The receiver's own authentication from a connection's extra: headers, secret headers, OAuth2 client
credentials; every clash and malformed value refused naming the field, never quoting a secret."""

from __future__ import annotations

import pytest

from cdr_webhook.endpoint_config import EndpointConfigError, parse_endpoint
from cdr_webhook.redact import NOT_SHOWN, masked_headers
from cdr_webhook.signing import signed_headers

CLIENT_SECRET = "cl13nt-s3cret-9f8e7d"
HEADER_SECRET = "Basic c2VjcmV0LWhlYWRlci12YWx1ZQ=="
OAUTH2 = {
    "oauth2_token_url": "https://idp.example.com/tenant-9/oauth/token",
    "oauth2_client_id": "cdr-sender",
    "oauth2_client_secret": CLIENT_SECRET,
}


def parse(extra):
    return parse_endpoint(
        "cdr_webhook_client_7", host="https://crm.example.com/hook", password="k3y", extra=extra
    )


def refused(extra) -> str:
    with pytest.raises(EndpointConfigError) as raised:
        parse(extra)
    message = str(raised.value)
    assert message.startswith("connection 'cdr_webhook_client_7' extra ")
    for secret in (CLIENT_SECRET, HEADER_SECRET, "hidden-value"):
        assert secret not in message
    return message


def test_headers_and_secret_headers_go_on_every_post_and_only_the_secret_ones_are_secrets():
    config = parse({"headers": {"X-Tenant": "acme"}, "secret_headers": {"Authorization": HEADER_SECRET}})

    assert config.auth.fixed_headers() == {"X-Tenant": "acme", "Authorization": HEADER_SECRET}
    assert HEADER_SECRET in config.secrets()
    assert "acme" not in config.secrets()
    assert HEADER_SECRET not in repr(config)
    headers = signed_headers(config, b"{}", "msg_1")
    assert headers["X-Tenant"] == "acme"
    assert headers["Authorization"] == HEADER_SECRET
    assert headers["x-api-key"] == "k3y"  # ours stay
    assert set(headers) >= {"webhook-id", "webhook-timestamp", "content-type"}
    assert config.auth.describe() == "headers X-Tenant, Authorization (secret)"


def test_a_shown_request_masks_the_secret_headers_and_says_where_the_bearer_token_comes_from():
    config = parse({**OAUTH2, "headers": {"X-Tenant": "acme"}, "secret_headers": {"X-Token": HEADER_SECRET}})
    shown = masked_headers(signed_headers(config, b"{}", "msg_1"), config.auth)

    assert shown["X-Tenant"] == "acme"
    assert shown["X-Token"] == NOT_SHOWN
    assert shown["x-api-key"] == NOT_SHOWN
    assert shown["authorization"] == (
        "Bearer (OAuth2 access token from https://idp.example.com, fetched when sent)"
    )
    assert HEADER_SECRET not in str(shown)
    assert CLIENT_SECRET not in str(shown)


@pytest.mark.parametrize(
    "name",
    ["x-api-key", "X-API-Key", "webhook-id", "Webhook-Timestamp", "webhook-signature", "Content-Type",
     "content-length", "Host", "transfer-encoding", "user-agent", "accept-encoding", "cdr-webhook-test"],
)  # fmt: skip
@pytest.mark.parametrize("field", ["headers", "secret_headers"])
def test_a_header_that_would_replace_one_of_ours_is_refused_naming_it(field, name):
    message = refused({field: {name: "hidden-value"}})
    assert f"extra '{field}' header '{name}': clashes with a header the delivery sets itself (" in message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"headers": ["X-Tenant", "acme"]}, "extra 'headers': must be a JSON object of header names"),
        ({"headers": {"X Tenant": "a"}}, "'X Tenant' is not a header name"),
        ({"headers": {"X-Tenant:": "a"}}, "'X-Tenant:' is not a header name"),
        ({"headers": {"X-Count": 3}}, "header 'X-Count': its value must be text, not int"),
        ({"secret_headers": {"X-Token": "hidden-value\r\nX-Evil: 1"}}, "holds a line break or a control"),
        ({"headers": {"X-Tenant": "hidden-value\n"}}, "holds a line break or a control character"),
        ({"secret_headers": {"X-Token": " hidden-value"}}, "begins or ends with white space"),
        ({"secret_headers": {"X-Token": ""}}, "its value is empty: a secret header needs one"),
        ({"headers": {"X-Name": "hidden-value€"}}, "non-Latin-1"),
        ({"headers": {"X-Big": "v" * 5000}}, "5000 characters long, at most 4096"),
        (
            {"headers": {"X-Tenant": "a"}, "secret_headers": {"x-tenant": "hidden-value"}},
            "header 'x-tenant': is set twice (also in extra 'headers')",
        ),
        ({"headers": {f"X-H{i}": "v" for i in range(33)}}, "33 headers in all, at most 32"),
        (
            {**OAUTH2, "secret_headers": {"Authorization": "hidden-value"}},
            "header 'Authorization': clashes with OAuth2: the bearer token goes in authorization",
        ),
    ],
)
def test_malformed_headers_are_refused_naming_the_problem_never_the_value(extra, expected):
    assert expected in refused(extra)


def test_oauth2_client_credentials_parse_with_scope_audience_and_client_auth():
    config = parse(
        {**OAUTH2, "oauth2_scope": ["cdr.write", "cdr.read"], "oauth2_audience": "https://crm.example.com",
         "oauth2_client_auth": "client_secret_post"}
    )  # fmt: skip
    oauth2 = config.auth.oauth2
    assert oauth2 is not None
    assert (oauth2.token_url, oauth2.client_id, oauth2.client_secret) == (
        "https://idp.example.com/tenant-9/oauth/token",
        "cdr-sender",
        CLIENT_SECRET,
    )
    assert (oauth2.scope, oauth2.audience, oauth2.client_auth) == (
        "cdr.write cdr.read",
        "https://crm.example.com",
        "client_secret_post",
    )
    assert parse({**OAUTH2, "oauth2_scope": "a b"}).auth.oauth2.scope == "a b"
    assert parse(OAUTH2).auth.oauth2.client_auth == "client_secret_basic"
    assert CLIENT_SECRET in config.secrets()
    assert CLIENT_SECRET not in repr(config)
    assert config.auth.describe() == "OAuth2 bearer token from https://idp.example.com"


def test_credentials_or_a_query_in_the_token_url_are_secrets_and_never_named():
    config = parse({**OAUTH2, "oauth2_token_url": "https://u:pw-in-url@idp.example.com/token?key=qs-secret"})
    assert {"u", "pw-in-url", "key=qs-secret"} <= set(config.secrets())
    assert config.auth.oauth2.token_origin == "https://idp.example.com"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            {"oauth2_client_id": "x", "oauth2_client_secret": CLIENT_SECRET},
            "extra 'oauth2_token_url': is missing: OAuth2 client credentials need oauth2_token_url, "
            "oauth2_client_id and oauth2_client_secret (set: oauth2_client_id, oauth2_client_secret)",
        ),
        ({**OAUTH2, "oauth2_client_secret": ""}, "extra 'oauth2_client_secret': is missing"),
        ({**OAUTH2, "oauth2_clientid": "x"}, "extra 'oauth2_clientid': is not an OAuth2 extra (known: "),
        (
            {**OAUTH2, "oauth2_token_url": "ftp://idp.example.com/t"},
            "must be an http(s) URL with a host, not ftp",
        ),
        ({**OAUTH2, "oauth2_token_url": 7}, "must be the token endpoint's https:// URL, not int"),
        ({**OAUTH2, "oauth2_token_url": "https://idp.example.com:99999/t"}, "is not a valid URL"),
        ({**OAUTH2, "oauth2_client_id": ["a"]}, "extra 'oauth2_client_id': must be non-empty text, not list"),
        ({**OAUTH2, "oauth2_client_secret": "hidden-value\n"}, "'oauth2_client_secret': holds a line break"),
        ({**OAUTH2, "oauth2_scope": 'a "b"'}, "extra 'oauth2_scope': must be space-separated scopes"),
        (
            {**OAUTH2, "oauth2_client_auth": "private_key_jwt"},
            "must be one of client_secret_basic, client_secret_post",
        ),
    ],
)
def test_incomplete_or_malformed_oauth2_extras_are_refused_naming_the_field(extra, expected):
    assert expected in refused(extra)


def test_no_authentication_extras_is_the_api_key_alone():
    config = parse({})
    assert config.auth.oauth2 is None
    assert config.auth.fixed_headers() == {}
    assert config.auth.describe() is None
    assert set(signed_headers(config, b"{}", "msg_1")) == {
        "content-type", "webhook-id", "webhook-timestamp", "x-api-key"
    }  # fmt: skip
