"""A test CDR on demand: a sample body POSTed once to one endpoint the way a delivery is, and its verdict.

The body is built by the payload mapping from a made-up row, signed by :func:`~cdr_webhook.signing.
signed_headers` and POSTed by :meth:`CdrWebhookHook.post <cdr_webhook.deliver.hook.CdrWebhookHook.post>`
(egress guard, TLS and mutual TLS, ``x-api-key``, deadline, bounded read), exactly once: no retry
schedule, no ledger row. What happened is an endpoint event (:func:`cdr_webhook.ledger.events.record_test`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import uuid
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from cdr_webhook.adapters import load_settings
from cdr_webhook.deliver.hook import CdrWebhookHook
from cdr_webhook.endpoint_config import EndpointConfigError
from cdr_webhook.ledger import endpoints, events
from cdr_webhook.outcome import GONE, Verdict, classify_response, describe_status
from cdr_webhook.request import request_body
from cdr_webhook.routing import routed_client
from cdr_webhook.signing import signed_headers, webhook_id

if TYPE_CHECKING:
    import psycopg

    from cdr_webhook.endpoint_config import EndpointConfig
    from cdr_webhook.outcome import PostResult

#: The header that marks a test CDR's POST (docs/payload.md); a real delivery never has it.
TEST_HEADER = "cdr-webhook-test"
#: Every test CDR's ``cdr_id`` starts so: no CDR of the dialer has such an id.
TEST_ID_PREFIX = "test-"


@dataclasses.dataclass(frozen=True)
class TestOutcome:
    """What a test CDR did: its verdict in words, whether it was delivered, and the receiver's answer."""

    __test__ = False  # not a pytest class

    endpoint: str
    cdr_id: str
    verdict: str
    kind: str  # delivered, retry, fail or refused: how the page colours the verdict
    http_status: int | None
    latency_ms: int | None
    excerpt: str | None
    event: events.Event

    @property
    def delivered(self) -> bool:
        return self.kind == "delivered"


def sample_client_id(conn: psycopg.Connection[Any], endpoint: str) -> int:
    """The client a test CDR names: the one the routing sends to this endpoint, else its latest, else 1."""
    own = routed_client(endpoint)
    if own is not None:
        return own
    latest = events.latest_client(conn, endpoint)
    return 1 if latest is None else latest


def sample_row(endpoint: EndpointConfig, *, client_id: int, now: dt.datetime | None = None) -> dict[str, Any]:
    """
    A made-up source row of an answered call, as the view would give it, that the endpoint's
    filters accept (its leg type, campaign and minimum billed duration).
    """
    now = now or dt.datetime.now(dt.UTC)
    filters = endpoint.filters
    leg_types = sorted(filters.leg_types) if filters and filters.leg_types else [1]
    campaigns = sorted(filters.campaign_ids) if filters and filters.campaign_ids else [1]
    billed = Decimal(42)
    if filters and filters.min_billed_duration is not None:
        billed = max(billed, Decimal(math.ceil(filters.min_billed_duration)))
    return {
        "client_id": client_id,
        "cdr_id": f"{TEST_ID_PREFIX}{uuid.uuid4()}",
        "callerid": "+14155550100",
        "callrequest_id": str(uuid.uuid4()),
        "call_id": str(uuid.uuid4()),
        "campaign_id": campaigns[0],
        "campaign_name": "cdr-webhook test CDR",
        "leg_type": leg_types[0],
        "phone_number": "+14155550123",
        "list_phonebook_id": [1],
        "list_phonebook_name": ["test phonebook"],
        "gateway": "test-gateway",
        "amd_status": 1,
        "hangup_cause_code": 16,
        "hangup_cause": None,  # the mapping names it from the code, as for a real CDR: NORMAL_CLEARING
        "cost": Decimal("0.01250"),
        "billed_duration": billed,
        "incremental_duration": Decimal(math.ceil(billed / 6) * 6),
        "call_date": (now - dt.timedelta(seconds=int(billed) + 5)).replace(microsecond=0),
    }


def verdict_of(result: PostResult) -> tuple[str, str]:
    """``(kind, words)``: what a delivery of this CDR would have come to, said for an operator."""
    if result.refused:  # the egress guard or a malformed endpoint: nothing was sent
        return "refused", result.error or "refused"
    if result.http_status is None:
        error = result.error or "no reply"
        if error.startswith("TLS failed: "):
            return "fail", "TLS: " + error.removeprefix("TLS failed: ")
        return "retry", f"would be retried: {error}"
    status = result.http_status
    reason = f" {result.reason}" if result.reason else ""
    verdict = classify_response(status)
    if verdict is Verdict.DELIVERED:
        return "delivered", "delivered"
    if verdict is Verdict.RETRY:
        return "retry", f"would be retried: {status}{reason}"
    if status in (401, 403):
        return "fail", f"fails at once: {status}, check the x-api-key"
    if status == GONE:
        gone = "the receiver says this endpoint is gone (a delivery pauses it)"
        return "fail", f"fails at once: {status}, {gone}"
    if 300 <= status < 400:
        return "fail", f"fails at once: {status}, redirects are never followed: check the URL"
    return "fail", f"fails at once: {describe_status(status, result.reason).removeprefix('HTTP ')}"


def send_test(
    conn: psycopg.Connection[Any], endpoint_id: str, *, actor: str, hook: CdrWebhookHook | None = None
) -> TestOutcome:
    """
    POST one test CDR to ``endpoint_id`` now, paused or not, and record it as an endpoint event.

    Raises :class:`~cdr_webhook.ledger.endpoints.EndpointNameError` for a name that is not an
    endpoint one may act on (as a pause does); a connection that cannot be used is a verdict.
    """
    endpoints.check_pausable(conn, endpoint_id)
    hook = hook or CdrWebhookHook.from_settings(endpoint_id)
    client_id = sample_client_id(conn, endpoint_id)
    try:
        endpoint = hook.endpoint
    except EndpointConfigError as err:
        cdr_id = f"{TEST_ID_PREFIX}{uuid.uuid4()}"
        return _recorded(conn, endpoint_id, actor, cdr_id, "refused", f"not sent: {err}", None)
    row = sample_row(endpoint, client_id=client_id)
    body = request_body(
        row["cdr_id"], row, relation="a test CDR", max_bytes=load_settings().max_payload_bytes
    )
    msg_id = webhook_id(row["cdr_id"], endpoint.conn_id)
    headers = signed_headers(endpoint, body, msg_id) | {TEST_HEADER: "true"}
    result = hook.post(body, headers).scrubbed(endpoint.secrets())
    kind, words = verdict_of(result)
    if result.http_status == 401 and endpoint.auth.oauth2 is not None:  # a new token was refused too
        words += " and the OAuth2 client"
    return _recorded(conn, endpoint_id, actor, row["cdr_id"], kind, words, result)


def _recorded(
    conn: psycopg.Connection[Any],
    endpoint: str,
    actor: str,
    cdr_id: str,
    kind: str,
    words: str,
    result: PostResult | None,
) -> TestOutcome:
    event = events.record_test(
        conn,
        endpoint,
        actor=actor,
        verdict=words,
        cdr_id=cdr_id,
        http_status=result.http_status if result else None,
        latency_ms=result.latency_ms if result else None,
        excerpt=result.response_excerpt if result else None,
    )
    return TestOutcome(
        endpoint=endpoint,
        cdr_id=cdr_id,
        verdict=event.reason or words,
        kind=kind,
        http_status=event.http_status,
        latency_ms=event.latency_ms,
        excerpt=event.response_excerpt,
        event=event,
    )
