"""The steps of a delivery attempt that a CDR task and a chunk task share: one set of rules for both.

Reading the endpoint, building a body, signing and sending, recording the outcomes (ledger and
endpoint state) and logging them are here; :mod:`cdr_webhook.deliver.operator` (one CDR per task) and
:mod:`cdr_webhook.deliver.chunk` (many) differ only in how they end the task.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from cdr_webhook.deliver.hook import CdrWebhookHook, describe_excerpt

if TYPE_CHECKING:
    import logging
    from collections.abc import Mapping, Sequence

    import psycopg
    from requests import Session

    from cdr_webhook.config import EndpointConfig, EndpointConfigError
    from cdr_webhook.deliver.hook import AttemptResult
    from cdr_webhook.ledger import Claim
    from cdr_webhook.outcome import Decision
    from cdr_webhook.settings import Settings


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One POST of one CDR, what it produced and what was decided."""

    claim: Claim
    result: AttemptResult
    decision: Decision
    msg_id: str


def make_hook(conn_id: str) -> CdrWebhookHook:
    """The hook that sends the request, with the ``request_timeout_seconds`` and egress settings."""
    from cdr_webhook.settings import load_settings

    settings = load_settings()
    return CdrWebhookHook(
        conn_id, timeout=settings.request_timeout_seconds, allowed_networks=settings.allowed_networks
    )


def hold_endpoint(
    conn: psycopg.Connection[Any], conn_id: str, claims: Sequence[Claim], err: EndpointConfigError
) -> str:
    """
    Hold an endpoint whose connection cannot be used; return what the failing task says.

    No retry can mend a connection, so the endpoint is paused with the reason and the claims go back
    to the queue (they go out once it is fixed and resumed).
    """
    from cdr_webhook import ledger
    from cdr_webhook.ledger import endpoints

    reason = f"configuration: {err}"
    ledger.release_many(conn, claims, reason=reason)
    event = endpoints.pause(conn, conn_id, reason=reason, actor="cdr_webhook")
    if event is not None:
        endpoints.notify(event)
    shown = claims[0].cdr_id if len(claims) == 1 else f"{claims[0].cdr_id} and {len(claims) - 1} more"
    return (
        f"CDR {shown} not sent: {err}. Endpoint {conn_id} is paused and its CDRs stay queued: fix the "
        f"connection, then `python -m cdr_webhook endpoints resume {conn_id}`"
    )


def build_bodies(
    rows: Mapping[str, Mapping[str, Any]], claims: Sequence[Claim], relation: str
) -> tuple[dict[str, bytes], list[tuple[Claim, str]]]:
    """Build each claim's body from its current source row; return the bodies and the unmappable."""
    from cdr_webhook.payload import InvalidCdr

    bodies, invalid = {}, []
    for claim in claims:
        try:
            bodies[claim.cdr_id] = build_body(claim.cdr_id, rows.get(claim.cdr_id), relation)
        except InvalidCdr as err:
            invalid.append((claim, str(err)))
    return bodies, invalid


def build_body(cdr_id: str, row: Mapping[str, Any] | None, relation: str) -> bytes:
    """The body of CDR ``cdr_id`` from its source ``row``; raises ``InvalidCdr`` (a row gone is one too)."""
    from cdr_webhook.payload import InvalidCdr, build_payload, encode_body

    if row is None:
        raise InvalidCdr(cdr_id, "cdr_id", cdr_id, f"no longer in {relation}")
    return encode_body(build_payload(row))


def mask_secrets(endpoint: EndpointConfig) -> None:
    """Have Airflow mask the endpoint's secrets in every log line of this task."""
    from airflow.sdk.log import mask_secret

    for secret in endpoint.secrets():
        mask_secret(secret)


def signed_post(
    hook: CdrWebhookHook,
    endpoint: EndpointConfig,
    body: bytes,
    msg_id: str,
    session: Session | None = None,
) -> AttemptResult:
    """Sign ``body`` now and POST it; the result has the endpoint's secrets scrubbed."""
    return hook.post(body, sign(endpoint, body, msg_id), session=session).scrubbed(endpoint.secrets())


def sign(endpoint: EndpointConfig, body: bytes, msg_id: str) -> dict[str, str]:
    """The request's headers for ``body``, signed now: ``webhook-*``, ``x-api-key``, content type."""
    from cdr_webhook.signing import build_headers

    return build_headers(
        msg_id=msg_id,
        timestamp=int(time.time()),
        body=body,
        api_key=endpoint.api_key,
        signing_secrets=endpoint.signing_secrets,
    )


def decide(result: AttemptResult, ti: Any) -> Decision:
    """Decide an attempt by what the POST produced and the task instance's try and max_tries."""
    from cdr_webhook.outcome import decide_attempt

    return decide_attempt(
        http_status=result.http_status,
        reason=result.reason,
        error=result.error,
        refused=result.refused,
        try_number=ti.try_number,
        max_tries=ti.max_tries,
    )


def record(conn: psycopg.Connection[Any], attempts: Sequence[Attempt], settings: Settings) -> list[str]:
    """
    Record attempts on their CDRs' rows (one statement) and on their endpoint (one, in their order).

    A delivery's end may pause the endpoint; its event is logged and sent to the notifier. Returns
    the endpoints these attempts paused.
    """
    from cdr_webhook import ledger
    from cdr_webhook.ledger import endpoints

    if not attempts:
        return []
    ledger.record_attempts(
        conn,
        [
            ledger.AttemptRecord(
                claim=a.claim,
                status=a.decision.status,
                http_status=a.result.http_status,
                error=a.decision.error,
                response_excerpt=a.result.response_excerpt,
                latency_ms=a.result.latency_ms,
            )
            for a in attempts
        ],
    )
    by_endpoint: dict[str, list[endpoints.AttemptOutcome]] = {}
    for a in attempts:
        by_endpoint.setdefault(a.claim.endpoint, []).append(
            endpoints.AttemptOutcome(
                delivered=a.decision.status == "delivered", final=a.decision.final, gone=a.decision.gone
            )
        )
    paused = []
    for endpoint, outcomes in by_endpoint.items():
        event = endpoints.record_outcomes(
            conn,
            endpoint,
            outcomes,
            pause_after_failures=settings.pause_after_failures,
            pause_after_hours=settings.pause_after_hours,
        )
        if event is not None:
            endpoints.notify(event)  # logs the pause too
            paused.append(endpoint)
    return paused


def log_attempt(log: logging.Logger, attempt: Attempt) -> None:
    """Log one attempt's outcome (a line per CDR: id, outcome, HTTP status, latency, webhook-id)."""
    from cdr_webhook.outcome import Verdict

    claim, result, decision = attempt.claim, attempt.result, attempt.decision
    number = claim.attempts + 1
    _count("retried" if decision.verdict is Verdict.RETRY else decision.status, claim.endpoint, result)
    if decision.verdict is Verdict.SUCCEED:
        log.info(
            "CDR %s delivered to %s: HTTP %s in %d ms (attempt %d, webhook-id %s)",
            claim.cdr_id,
            claim.endpoint,
            result.http_status,
            result.latency_ms,
            number,
            attempt.msg_id,
        )
        return
    log.error(
        "CDR %s to endpoint %s failed: HTTP %s, %s (attempt %d, %d ms, webhook-id %s)",
        claim.cdr_id,
        claim.endpoint,
        result.http_status if result.http_status is not None else "-",
        decision.error,
        number,
        result.latency_ms,
        attempt.msg_id,
    )
    if result.response_excerpt is not None:
        log.error("Response body starts: %s", describe_excerpt(result.response_excerpt))


def _count(event: str, endpoint: str, result: AttemptResult) -> None:
    """Emit Airflow metrics (StatsD / OpenTelemetry, as configured): the outcome and the latency."""
    from airflow.sdk.observability.stats import Stats

    tags = {"endpoint": endpoint}
    Stats.incr(f"cdr_webhook.{event}", tags=tags)
    Stats.timing("cdr_webhook.latency", result.latency_ms, tags=tags)
