"""The request a delivery would send now: built from the source row by the code ``post_cdr`` runs.

The row comes from :func:`~cdr_webhook.selection.source.fetch_rows`, the body and the headers from
:mod:`cdr_webhook.request`; what the connection's secrets produce (``x-api-key``, the signatures,
secret headers) is replaced before anything reaches a page.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from cdr_webhook.adapters import load_endpoint
from cdr_webhook.endpoint_config import EndpointConfigError
from cdr_webhook.payload import InvalidCdr
from cdr_webhook.redact import scrub
from cdr_webhook.request import request_body, shown_headers
from cdr_webhook.selection.source import fetch_rows
from cdr_webhook.signing import webhook_id

if TYPE_CHECKING:
    import psycopg

    from cdr_webhook.web.deliveries import Delivery


@dataclasses.dataclass(frozen=True)
class NextRequest:
    """The body (pretty-printed) and headers of the next POST, or why none can be built."""

    body: str | None
    headers: dict[str, str]
    endpoint_origin: str | None
    problem: str | None = None


def next_request(
    conn: psycopg.Connection[Any], delivery: Delivery, *, relation: str, max_bytes: int
) -> NextRequest:
    """Build the delivery's next request now, secrets redacted."""
    msg_id = webhook_id(delivery.cdr_id, delivery.endpoint)
    try:
        endpoint = load_endpoint(delivery.endpoint)
    except EndpointConfigError as err:
        return NextRequest(None, {"webhook-id": msg_id}, None, f"endpoint configuration: {err}")
    row = fetch_rows(conn, relation, [(delivery.cdr_id, delivery.cdr_created_at)]).get(delivery.cdr_id)
    try:
        body = request_body(delivery.cdr_id, row, relation=relation, max_bytes=max_bytes)
    except InvalidCdr as err:
        problem = scrub(str(err), endpoint.secrets())
        return NextRequest(None, {"webhook-id": msg_id}, endpoint.origin, problem)
    headers = shown_headers(endpoint, body, msg_id)
    pretty = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    return NextRequest(pretty, headers, endpoint.origin)
