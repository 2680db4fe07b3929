"""Redaction: every form of a secret comes out of a text, and a shown request hides its key."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdr_webhook.__main__ import _one_line
from cdr_webhook.redact import NOT_SHOWN, REDACTED, masked_headers, scrub


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


def test_a_shown_request_hides_its_api_key_and_its_signatures():
    shown = masked_headers({"x-api-key": "k3y", "webhook-signature": "v1,a v1,b", "content-type": "json"})
    assert shown == {
        "x-api-key": NOT_SHOWN,
        "webhook-signature": "v1,… (2 signature(s), computed when sent)",
        "content-type": "json",
    }


def test_the_clis_database_error_hides_the_password_in_every_form_on_one_line():
    password = "pa55/word+long"
    encoded = base64.b64encode(password.encode()).decode()
    err = OSError(f"connection to server failed:\n  password={password}\n  auth={encoded}")
    line = _one_line(err, [password])
    assert line == f"connection to server failed: password={REDACTED} auth={REDACTED}"
    assert _one_line(OSError(""), [password]) == "OSError"
