"""An endpoint connection parsed once: every field checked, errors naming connection and field, no secret."""

from __future__ import annotations

import base64
from decimal import Decimal

import pytest

from cdr_webhook.endpoint_config import EndpointConfigError, EndpointFilters, parse_endpoint

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n"
PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIDazCCAlOgAwIBAgIUUq\n-----END CERTIFICATE-----\n"


def parse(extra=None, *, host="https://hooks.example.com/cdr/t0ken-abc?sig=s3cr3t", password="api-key-1"):
    return parse_endpoint("cdr_webhook_client_7", host=host, password=password, extra=extra or {})


def test_a_complete_connection_becomes_one_typed_configuration():
    config = parse(
        {
            "signing_secret": [SECRET, SECRET],
            "client_cert": PEM_CERT,
            "client_key": PEM_KEY,
            "leg_types": [1],
            "min_billed_duration": "1.5",
            "campaign_ids": [12, 13],
            "max_in_flight": 3,
            "x_other": "ignored",
        }
    )
    assert config.url == "https://hooks.example.com/cdr/t0ken-abc?sig=s3cr3t"
    assert config.origin == "https://hooks.example.com"
    assert (config.api_key, config.signing_secrets, config.max_in_flight) == (
        "api-key-1",
        (SECRET, SECRET),
        3,
    )
    assert config.filters == EndpointFilters(
        "cdr_webhook_client_7", frozenset({1}), Decimal("1.5"), frozenset({12, 13})
    )
    assert config.tls_extra() == {"client_cert": PEM_CERT, "client_key": PEM_KEY}


def test_a_bare_host_gets_the_schema_and_port_like_the_http_provider():
    config = parse_endpoint("ep", host="hooks.example.com", schema="https", port=8443)
    assert config.url == "https://hooks.example.com:8443"
    assert config.origin == "https://hooks.example.com:8443"
    assert parse_endpoint("ep", host="hooks.example.com").url == "http://hooks.example.com"


def test_secrets_are_keys_signing_secrets_tls_key_and_the_urls_credentials_path_and_query():
    config = parse(
        {"signing_secret": SECRET, "client_key": PEM_KEY, "client_cert": PEM_CERT},
        host="https://user:pa55@hooks.example.com/cdr/t0ken-abc?sig=s3cr3t",
    )
    assert set(config.secrets()) == {
        "api-key-1",
        SECRET,
        PEM_KEY,
        "user",
        "pa55",
        "/cdr/t0ken-abc",
        "sig=s3cr3t",
    }
    assert parse_endpoint("ep", host="https://hooks.example.com/").secrets() == ()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"leg_types": "1"},
            "connection 'cdr_webhook_client_7' extra 'leg_types': must be a list of integers",
        ),
        ({"campaign_ids": [1, True]}, "extra 'campaign_ids': must be a list of integers"),
        ({"min_billed_duration": "soon"}, "extra 'min_billed_duration': must be a number, not 'soon'"),
        ({"min_billed_duration": "NaN"}, "extra 'min_billed_duration': must be a number"),
        ({"max_in_flight": 0}, "extra 'max_in_flight': must be a positive integer, not 0"),
        ({"max_in_flight": "8"}, "extra 'max_in_flight': must be a positive integer"),
        ({"signing_secret": {"a": 1}}, "extra 'signing_secret': must be a whsec_ string or a list of them"),
        ({"ca_bundle": "/etc/ssl/ca.pem"}, "extra 'ca_bundle': must be PEM text"),
        ({"client_key": PEM_KEY}, "extra 'client_key': needs extra 'client_cert'"),
        ({"client_cert": PEM_CERT}, "extra 'client_cert': holds no private key"),
    ],
)
def test_a_malformed_extra_names_the_connection_and_the_extra(extra, message):
    with pytest.raises(EndpointConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(extra)


@pytest.mark.parametrize(
    "secret",
    ["whsec_tooshort", "not-a-whsec-secret-at-all-0123456789", "whsec_" + "!" * 40],
)
def test_an_invalid_signing_secret_is_a_configuration_error_that_never_quotes_it(secret):
    with pytest.raises(EndpointConfigError, match="extra 'signing_secret': the secret is invalid") as err:
        parse({"signing_secret": secret})
    assert secret not in str(err.value)
    with pytest.raises(EndpointConfigError, match="secret 2 of 2 is invalid"):
        parse({"signing_secret": [SECRET, secret]})


@pytest.mark.parametrize(
    ("host", "shown"),
    [
        ("ftp://files.example.com/t0ken-abc", "not ftp://files.example.com"),
        ("https://hooks.example.com:99999/t0ken-abc", "scheme 'https'"),
        ("https:///t0ken-abc", "not https://"),
        ("", "is empty"),
    ],
)
def test_a_bad_url_is_named_by_scheme_and_host_only(host, shown):
    with pytest.raises(EndpointConfigError, match="connection 'ep' host") as err:
        parse_endpoint("ep", host=host)
    assert shown in str(err.value)
    assert "t0ken-abc" not in str(err.value)


def test_an_extra_that_is_not_an_object_is_a_configuration_error():
    with pytest.raises(EndpointConfigError, match="extra: must be a JSON object, not list"):
        parse_endpoint("ep", host="https://hooks.example.com", extra=[1])


def test_filters_say_which_filter_excluded_a_cdr():
    filters = parse({"leg_types": [1], "min_billed_duration": 1, "campaign_ids": [12, 13]}).filters
    ok = {"leg_type": 1, "billed_duration": 5, "campaign_id": 12}
    assert filters.exclusion(ok) is None
    assert filters.exclusion(ok | {"leg_type": 2}) == (
        "filtered out by cdr_webhook_client_7 extra leg_types=[1]: leg_type is 2"
    )
    assert filters.exclusion(ok | {"billed_duration": 0}) == (
        "filtered out by cdr_webhook_client_7 extra min_billed_duration=1: billed_duration is 0"
    )
    assert "billed_duration is None" in filters.exclusion(ok | {"billed_duration": None})
    assert filters.exclusion(ok | {"campaign_id": 99}) == (
        "filtered out by cdr_webhook_client_7 extra campaign_ids=[12, 13]: campaign_id is 99"
    )
    assert parse().filters.exclusion(ok | {"leg_type": 2}) is None
