"""The owner contact of an endpoint's extras, as parsed, shown and written into an alert. Pure."""

from __future__ import annotations

import datetime as dt

import pytest

from cdr_webhook import owners
from cdr_webhook.endpoint_config import EndpointConfigError

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER = "whsec_" + "b3duZXItYWxlcnRzLXNpZ25pbmcta2V5LTEyMzQ1Ng=="


def test_no_owner_extra_is_no_owner():
    assert owners.parse_owner("cdr_webhook", {"signing_secret": SECRET}) is None
    assert owners.parse_owner("cdr_webhook", {"owner_email": "", "owner_webhook_url": None}) is None


def test_addresses_as_a_comma_list_or_a_json_list_deduplicated():
    one = owners.parse_owner("e", {"owner_email": "a@x.example, b@x.example,a@x.example"})
    two = owners.parse_owner("e", {"owner_email": ["a@x.example", "b@x.example"]})
    assert one.emails == two.emails == ("a@x.example", "b@x.example")
    assert one.webhook_url is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"owner_email": "jane"}, "extra 'owner_email': address 1 (j•••@) is not an email address"),
        ({"owner_email": "a@x.example\r\nBcc: all@x.example"}, "is not an email address"),
        ({"owner_email": 7}, "must be an address, a comma-separated list, or a JSON list"),
        ({"owner_email": [f"u{i}@x.example" for i in range(21)]}, "holds 21 addresses; at most 20"),
        ({"owner_webhook_url": "ftp://x.example/a"}, "extra 'owner_webhook_url': must be an http(s) URL"),
        ({"owner_webhook_url": "https://x.example/a"}, "needs a signing secret"),
        ({"owner_webhook_url": "https://x.example/a", "owner_webhook_secret": "whsec_bad"}, "is invalid"),
    ],
)
def test_a_bad_owner_extra_names_the_extra_and_never_the_secret(extra, message):
    with pytest.raises(EndpointConfigError, match="connection 'e'") as caught:
        owners.parse_owner("e", extra)
    assert message in str(caught.value)
    assert "whsec_bad" not in str(caught.value)


def test_the_webhook_is_signed_with_its_own_secret_else_the_endpoints():
    own = owners.parse_owner(
        "e",
        {"owner_webhook_url": "https://h.example/p", "owner_webhook_secret": OTHER, "signing_secret": SECRET},
    )
    endpoints = owners.parse_owner(
        "e", {"owner_webhook_url": "https://h.example/p", "signing_secret": SECRET}
    )
    assert own.webhook_secrets == (OTHER,)
    assert endpoints.webhook_secrets == (SECRET,)


def test_the_page_shows_the_contact_masked_and_the_url_by_its_origin_only():
    contact = owners.parse_owner(
        "e",
        {
            "owner_email": ["jane.doe@acme.example"],
            "owner_webhook_url": "https://user:pw@status.acme.example:8443/t0ken?k=v",
            "signing_secret": SECRET,
        },
    )
    assert contact.masked() == ["j•••@acme.example", "POST https://status.acme.example:8443"]
    assert {"/t0ken", "k=v", "user", "pw", SECRET} <= set(contact.secrets())


def test_the_message_escapes_what_it_quotes_and_links_the_endpoints_page():
    body = owners.message(
        endpoint="cdr_webhook_client_42",
        kind="paused",
        reason="<script>alert(1)</script>",
        actor="bob",
        at=dt.datetime(2026, 12, 7, 1, 2, 3, tzinfo=dt.UTC),
        counts={"attempts": 3, "first_failing_cdr_at": dt.datetime(2026, 12, 7, 0, 59, tzinfo=dt.UTC)},
        window_minutes=60,
        link=owners.page_link("https://af.example/", "cdr_webhook_client_42"),
    )
    assert body["type"] == "endpoint.paused"
    assert body["data"]["first_failing_cdr_at"] == "2026-12-07T00:59:00+00:00"
    assert body["data"]["page"] == "https://af.example/cdr-webhook/endpoint?endpoint=cdr_webhook_client_42"
    assert owners.subject(body) == "[CDR webhook] endpoint cdr_webhook_client_42 paused"
    html = owners.email_html(body)
    assert "<script>" not in html
    assert "&lt;script&gt;" in html
    assert owners.page_link("", "x") is None  # [api] base_url unset: no link
