"""An endpoint connection parsed once: every field checked, errors naming connection and field, no secret."""

from __future__ import annotations

import base64
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdr_webhook.config import REDACTED, EndpointConfigError, EndpointFilters, parse_endpoint, scrub

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


def test_scrub_replaces_every_form_of_every_secret():
    secrets = ["k3y/with+chars", "/cdr/t0ken-abc"]
    echoed = (
        'POST /cdr/t0ken-abc HTTP/1.1\r\nx-api-key: k3y/with+chars\r\n{"echo": "k3y\\/with+chars"} '
        "url=%2Fcdr%2Ft0ken-abc key=k3y%2Fwith%2Bchars"
    )
    scrubbed = scrub(echoed, secrets)
    assert "t0ken" not in scrubbed
    assert "k3y" not in scrubbed
    assert scrubbed.count(REDACTED) == 5
    assert scrub(None, secrets) is None
    assert scrub("nothing secret", secrets) == "nothing secret"


def test_scrub_hides_a_secret_cut_short_at_the_end_of_an_excerpt():
    assert scrub("x-api-key: k3y-7d41c0", ["k3y-7d41c0ffee9b2e"]) == f"x-api-key: {REDACTED}"
    assert scrub("ends with k3y", ["k3y-7d41c0ffee9b2e"]) == "ends with k3y"  # three letters prove nothing


@given(
    text=st.text(max_size=40),
    secret=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=5, max_size=40),
    data=st.data(),
)
def test_scrub_hides_any_cut_off_start_of_a_secret_of_four_characters_or_more(text, secret, data):
    cut = data.draw(st.integers(min_value=4, max_value=len(secret) - 1))
    assert scrub(text + secret[:cut], [secret]).endswith(REDACTED)
    short = secret[: data.draw(st.integers(min_value=1, max_value=3))]
    assert scrub(short, [secret]) == short  # a text of three characters or fewer proves nothing


@pytest.mark.parametrize("key", ["k3y-7d41c0ffee9b2e", "k3y/with+chars?>>~", "0123456789abcdef0"])
def test_scrub_hides_a_secret_in_base64_alone_or_inside_a_longer_value(key):
    raw = key.encode()
    encodings = [base64.b64encode, base64.urlsafe_b64encode]
    echoed = [
        *(encode(raw).decode() for encode in encodings),
        *(encode(raw).decode().rstrip("=") for encode in encodings),
        # basic auth and other wrappers: the key at each offset of a 3-byte group
        *(
            encode(prefix + raw + b":tail").decode()
            for encode in encodings
            for prefix in (b"u:", b"us:", b"use:")
        ),
    ]
    for text in echoed:
        scrubbed = scrub(f'{{"echo": "{text}"}}', [key])
        assert REDACTED in scrubbed, text
        # Of the key's base64 characters, at most the two at each end that share bits with the
        # bytes around it are left.
        left = len(scrubbed) - len(REDACTED) - len('{"echo": ""}')
        assert left <= len(text) - (len(raw) * 8 // 6 - 2), (text, scrubbed)


def test_short_secrets_are_not_looked_for_in_base64():
    assert scrub("aGVsbG8=", ["hello"]) == "aGVsbG8="  # 5 bytes: too short to tell from other text


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
