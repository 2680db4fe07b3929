"""What is shown instead of a secret: the one home of redaction. Pure.

:func:`scrub` takes every form of an endpoint's (or a DSN's) secrets out of a text before it reaches a
log, the ledger, an event or the page; :func:`masked_headers` makes a request's headers fit to show.
"""

from __future__ import annotations

import base64
import functools
import json
import urllib.parse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from cdr_webhook.receiver_auth import ReceiverAuth

#: What stands in a text for a secret taken out of it.
REDACTED = "***"


#: Secrets shorter than this are not looked for in base64: their encoding is too short to be told
#: from other base64 text.
_BASE64_MIN_BYTES = 8


@functools.lru_cache(maxsize=64)
def secret_forms(secrets: tuple[str, ...]) -> tuple[str, ...]:
    """
    Each secret as written, JSON-escaped, URL-encoded and base64-encoded; longest first (computed once
    per endpoint): what :func:`scrub` replaces, and what the tests' secrets sweep looks for.
    """
    forms: set[str] = set()
    for secret in secrets:
        escaped = json.dumps(secret)[1:-1]
        # JSON as Python writes it, and as encoders that also escape "/" (PHP's) write it.
        forms.update({secret, escaped, escaped.replace("/", "\\/"), urllib.parse.quote(secret, safe="")})
        forms.update(_base64_forms(secret.encode()))
    return tuple(sorted((f for f in forms if f), key=len, reverse=True))


def _base64_forms(secret: bytes) -> set[str]:
    """
    The base64 texts (standard and URL-safe, padded or not) that carry ``secret``: on its own, and
    inside a longer encoded value such as basic auth's ``user:key``, where it starts at any of three
    offsets in a 3-byte group. Only the characters made of the secret's bits alone are kept, so each
    form matches whatever surrounds the secret.
    """
    if len(secret) < _BASE64_MIN_BYTES:
        return set()
    found: set[str] = set()
    whole = base64.b64encode(secret).decode()
    found.update({whole, whole.rstrip("=")})
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + secret).decode().rstrip("=")
        first = -(-offset * 8 // 6)  # the first character with no bit of the bytes before
        last = (offset + len(secret)) * 8 // 6  # past the last character with no bit of the bytes after
        found.add(encoded[first:last])
    return found | {form.replace("+", "-").replace("/", "_") for form in found}


def scrub(text: str | None, secrets: Iterable[str]) -> str | None:
    """
    Replace every secret in ``text`` with ``***``, also in its JSON-escaped, URL-encoded and base64
    forms (:func:`_base64_forms`).

    A text cut short (a response excerpt) may end inside a secret: a trailing piece of four or more
    characters that starts a secret is replaced too.
    """
    if not text:
        return text
    forms = secret_forms(tuple(secrets))
    for form in forms:
        if form in text:
            text = text.replace(form, REDACTED)
    for form in forms:
        length = _cut_secret(text, form)
        if length:
            return text[:-length] + REDACTED
    return text


def _cut_secret(text: str, form: str) -> int:
    """
    The length of the longest end of ``text`` (4 characters or more, shorter than ``form``) that
    starts ``form``, or 0. Only the places where ``form``'s first character occurs are tried.
    """
    start = max(len(text) - (len(form) - 1), 0)
    end = len(text) - 3
    if end <= start:  # (a negative end would count from the text's end)
        return 0
    at = text.find(form[0], start, end)
    while at != -1:
        if form.startswith(text[at:]):
            return len(text) - at
        at = text.find(form[0], at + 1, end)
    return 0


#: What a shown request has instead of its ``x-api-key``.
NOT_SHOWN = "(secret, not shown)"


def masked_headers(headers: Mapping[str, str], auth: ReceiverAuth | None = None) -> dict[str, str]:
    """
    Return a copy of a request's headers fit to show: no ``x-api-key``, no signature, none of the
    endpoint's secret headers (``auth``); with OAuth2, what its ``authorization`` will be.

    A signature is no secret, yet with its ``webhook-id`` and timestamp it is a request a receiver
    would accept again; a shown one says how many there are instead.
    """
    shown = dict(headers)
    secret_names = {"x-api-key", *(auth.secret_names() if auth else ())}
    for name in shown:
        if name.lower() in secret_names:
            shown[name] = NOT_SHOWN
    if auth is not None and auth.oauth2 is not None:
        shown["authorization"] = (
            f"Bearer (OAuth2 access token from {auth.oauth2.token_origin}, fetched when sent)"
        )
    if "webhook-signature" in shown:
        count = len(shown["webhook-signature"].split())
        shown["webhook-signature"] = f"v1,… ({count} signature(s), computed when sent)"
    return shown
