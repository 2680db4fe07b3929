"""Standard Webhooks headers: a stable ``webhook-id``, the timestamp, and the HMAC-SHA256 signature.

Pure: no Airflow. See https://www.standardwebhooks.com/ (signed content ``id.timestamp.body``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from typing import TYPE_CHECKING

from cdr_webhook import __version__

if TYPE_CHECKING:
    from collections.abc import Sequence

    from cdr_webhook.endpoint_config import EndpointConfig

#: Every request's headers besides the caller's (a session's, and each POST's): the hook sends them,
#: the dry run and the page's preview show them.
BASE_HEADERS = {
    "user-agent": f"cdr-webhook/{__version__}",
    "accept-encoding": "identity",  # no compressed replies: no decompression bombs
}

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


def signed_headers(endpoint: EndpointConfig, body: bytes, msg_id: str) -> dict[str, str]:
    """
    The headers of a POST of ``body`` to ``endpoint``, signed now: the endpoint's own extra headers,
    then ``webhook-*``, ``x-api-key`` and the type (an extra header never has one of their names).
    The OAuth2 bearer token is the hook's to add: it is fetched when sent.
    """
    return endpoint.auth.fixed_headers() | build_headers(
        msg_id=msg_id,
        timestamp=int(time.time()),
        body=body,
        api_key=endpoint.api_key,
        signing_secrets=endpoint.signing_secrets,
    )
