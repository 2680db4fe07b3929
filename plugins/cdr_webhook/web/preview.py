"""The request a delivery would send now: built from the source row by the code ``post_cdr`` runs.

The body comes from :func:`~cdr_webhook.selection.source.fetch_rows` and
:func:`~cdr_webhook.payload.build_body`, the headers from
:func:`~cdr_webhook.signing.signed_headers`; what the connection's secrets produce (``x-api-key``, the
signatures) is replaced before anything reaches a page.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from cdr_webhook.config import EndpointConfigError, load_endpoint, scrub
from cdr_webhook.payload import InvalidCdr, build_body
from cdr_webhook.selection.source import fetch_rows
from cdr_webhook.signing import masked_headers, signed_headers, webhook_id

if TYPE_CHECKING:
    import psycopg

    from cdr_webhook.web.deliveries import Delivery


@dataclasses.dataclass(frozen=True)
class Preview:
    """The body (pretty-printed) and headers of the next POST, or why none can be built."""

    body: str | None
    headers: dict[str, str]
    endpoint_origin: str | None
    problem: str | None = None


def preview(conn: psycopg.Connection[Any], delivery: Delivery, *, relation: str, max_bytes: int) -> Preview:
    """Build the delivery's next request now, secrets redacted."""
    msg_id = webhook_id(delivery.cdr_id, delivery.endpoint)
    try:
        endpoint = load_endpoint(delivery.endpoint)
    except EndpointConfigError as err:
        return Preview(None, {"webhook-id": msg_id}, None, f"endpoint configuration: {err}")
    row = fetch_rows(conn, relation, [(delivery.cdr_id, delivery.cdr_created_at)]).get(delivery.cdr_id)
    try:
        body = build_body(delivery.cdr_id, row, relation, max_bytes)
    except InvalidCdr as err:
        problem = scrub(str(err), endpoint.secrets())
        return Preview(None, {"webhook-id": msg_id}, endpoint.origin, problem)
    headers = masked_headers(signed_headers(endpoint, body, msg_id))
    pretty = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    return Preview(pretty, headers, endpoint.origin)
