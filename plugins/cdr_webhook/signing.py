"""Standard Webhooks headers: a stable ``webhook-id``, the timestamp, and the HMAC-SHA256 signature.

Pure: no Airflow. See https://www.standardwebhooks.com/ (signed content ``id.timestamp.body``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

_SECRET_PREFIX = "whsec_"
# A fixed namespace makes webhook-id a pure function of (endpoint, cdr_id): the same on every
# retry, clear, backfill and redelivery, so receivers can deduplicate on it.
_ID_NAMESPACE = uuid.UUID("6f1c2a4e-9b1d-5c8e-a3f0-2d7b4e6c8a10")


class InvalidSigningSecret(ValueError):
    """A signing secret that is not ``whsec_`` followed by base64 of 24 to 64 bytes."""


def webhook_id(cdr_id: str, endpoint: str) -> str:
    """Return the ``webhook-id`` of a CDR at an endpoint: stable, and free of the ``.`` separator."""
    return "msg_" + uuid.uuid5(_ID_NAMESPACE, f"{endpoint}\n{cdr_id}").hex


def secret_key(secret: str) -> bytes:
    """Decode a ``whsec_…`` signing secret to its key bytes."""
    if not secret.startswith(_SECRET_PREFIX):
        raise InvalidSigningSecret("a signing secret must start with 'whsec_' (Standard Webhooks format)")
    try:
        key = base64.b64decode(secret[len(_SECRET_PREFIX) :], validate=True)
    except ValueError as err:
        raise InvalidSigningSecret("a signing secret must be 'whsec_' followed by base64") from err
    if not 24 <= len(key) <= 64:
        raise InvalidSigningSecret(f"a signing secret must decode to 24-64 bytes, not {len(key)}")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the ``v1,<base64>`` signature of ``msg_id.timestamp.body`` under ``secret``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def build_headers(
    *,
    msg_id: str,
    timestamp: int,
    body: bytes,
    api_key: str | None,
    signing_secrets: Sequence[str] = (),
) -> dict[str, str]:
    """Return exactly the headers of one POST: content type, API key, and the Standard Webhooks trio."""
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
    }
    if api_key:
        headers["x-api-key"] = api_key
    if signing_secrets:
        headers["webhook-signature"] = " ".join(sign(s, msg_id, timestamp, body) for s in signing_secrets)
    return headers


#: What a shown request has instead of its ``x-api-key``.
REDACTED = "(secret, not shown)"


def masked_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """
    Return a copy of a request's headers fit to show: no ``x-api-key``, no signature.

    A signature is no secret, yet with its ``webhook-id`` and timestamp it is a request a receiver
    would accept again; a shown one says how many there are instead.
    """
    shown = dict(headers)
    if "x-api-key" in shown:
        shown["x-api-key"] = REDACTED
    if "webhook-signature" in shown:
        count = len(shown["webhook-signature"].split())
        shown["webhook-signature"] = f"v1,… ({count} signature(s), computed when sent)"
    return shown
