"""A CDR's request to an endpoint: its body from the source row, and its headers as they may be shown.

One pipeline (payload → the endpoint's filters → a body within ``max_payload_bytes`` → signed headers
→ masked headers) for the POST itself (:mod:`cdr_webhook.deliver.engine`), the select step's check of
its claims, ``source preview`` and the Deliveries page's preview of a delivery's next request. The
headers of a POST are signed when it is sent (:func:`cdr_webhook.signing.signed_headers`). Pure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cdr_webhook.payload import InvalidCdr, build_payload, sized_body
from cdr_webhook.redact import masked_headers
from cdr_webhook.signing import BASE_HEADERS, signed_headers

if TYPE_CHECKING:
    from collections.abc import Mapping

    from cdr_webhook.endpoint_config import EndpointConfig, EndpointFilters


class Excluded(ValueError):
    """The endpoint's filters do not want the CDR; the message names the filter and the value."""


def request_body(
    cdr_id: str,
    row: Mapping[str, Any] | None,
    *,
    relation: str,
    max_bytes: int,
    filters: EndpointFilters | None = None,
) -> bytes:
    """
    The body of CDR ``cdr_id`` from its source ``row``, at most ``max_bytes`` long; raises
    :class:`~cdr_webhook.payload.InvalidCdr` (a row gone from ``relation`` is one too) and, with
    ``filters``, :class:`Excluded` for a CDR they leave out.
    """
    if row is None:
        raise InvalidCdr(cdr_id, "cdr_id", cdr_id, f"no longer in {relation}")
    payload = build_payload(row)
    reason = filters.exclusion(payload) if filters else None
    if reason is not None:
        raise Excluded(reason)
    return sized_body(payload, max_bytes)


def shown_headers(endpoint: EndpointConfig, body: bytes, msg_id: str) -> dict[str, str]:
    """
    Every header the POST of ``body`` carries (:data:`~cdr_webhook.signing.BASE_HEADERS`, its length,
    the endpoint's own and the signed ones), fit to show: secrets masked, the signature described.
    """
    headers = {**BASE_HEADERS, "content-length": str(len(body)), **signed_headers(endpoint, body, msg_id)}
    return masked_headers(headers, endpoint.auth)
