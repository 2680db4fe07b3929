"""The mapped POST task: one CDR to one endpoint, every attempt recorded in the ledger."""

from __future__ import annotations

import datetime as dt
import functools
import time
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.definitions.retry_policy import RetryDecision, RetryPolicy
from airflow.sdk.exceptions import AirflowException

from cdr_webhook.hooks import CdrWebhookHook, describe_excerpt
from cdr_webhook.outcome import Decision, Verdict, decide_attempt
from cdr_webhook.settings import CDR_DB_CONN_ID, DEFAULT_ENDPOINT_CONN_ID

if TYPE_CHECKING:
    from collections.abc import Sequence

    import psycopg
    from airflow.sdk import Context

    from cdr_webhook.config import EndpointConfig
    from cdr_webhook.hooks import AttemptResult
    from cdr_webhook.ledger import Claim
    from cdr_webhook.settings import Settings


class RetryLater(AirflowException):
    """A retryable failure; ``retry_after`` is the wait the receiver asked for (Retry-After), if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RetryAfterPolicy(RetryPolicy):
    """Wait as long as the receiver's ``Retry-After`` asks (capped), else Airflow's own backoff."""

    def __init__(self, max_delay_seconds: float) -> None:
        self.max_delay_seconds = max_delay_seconds

    def evaluate(
        self, exception: BaseException, try_number: int, max_tries: int, context: Context | None = None
    ) -> RetryDecision:
        if isinstance(exception, RetryLater) and exception.retry_after is not None:
            delay = min(exception.retry_after, self.max_delay_seconds)
            return RetryDecision.retry(
                delay=dt.timedelta(seconds=delay),
                reason=f"the receiver sent Retry-After: waiting {delay:g} s",
            )
        return RetryDecision.default()

    def serialize(self) -> dict[str, Any]:
        return {"__type": "RetryAfterPolicy", "max_delay_seconds": self.max_delay_seconds}

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> RetryAfterPolicy:
        return cls(max_delay_seconds=data["max_delay_seconds"])


class CdrWebhookOperator(BaseOperator):
    """
    POST one CDR to its endpoint as the Standard Webhooks–signed JSON payload.

    The body is read from the source relation and built when the task runs: it is never a template
    field (CDR text such as ``{{ 7 * 7 }}`` must arrive verbatim) and never travels through XCom, so
    phone numbers stay out of Airflow's metadata database. Outcome: 2xx delivered; 408, 429, 5xx,
    timeouts and connection errors raise for Airflow to retry with backoff (or after the receiver's
    ``Retry-After``); any other status, and an endpoint the egress guard refuses, fails the task at
    once, without using its retries. A 410, or sustained failure, pauses the endpoint.

    :param cdr_id: The CDR to send.
    :param http_conn_id: The HTTP connection of the endpoint: ``host`` is the full URL, ``password``
        the ``x-api-key`` value, extra ``signing_secret`` the ``whsec_…`` secret.
    :param db_conn_id: The Postgres connection of the CDR database.

    A ``BaseOperator``, not the HTTP provider's ``HttpOperator``: its ``execute`` and hook would both be
    replaced, and importing that module (``aiohttp``, for its deferrable mode) cost every task ~70 ms of
    CPU, a third of what a try added to Airflow's own floor (``docs/benchmarks.md``).
    """

    # Nothing is templated: every value here comes from CDR data, which must never be rendered.
    template_fields: Sequence[str] = ()
    template_fields_renderers: dict[str, str] = {}
    ui_color = "#9fd3c7"

    def __init__(
        self,
        *,
        cdr_id: str,
        http_conn_id: str = DEFAULT_ENDPOINT_CONN_ID,
        db_conn_id: str = CDR_DB_CONN_ID,
        **kwargs: Any,
    ) -> None:
        kwargs["do_xcom_push"] = False
        super().__init__(**kwargs)
        self.cdr_id = cdr_id
        self.http_conn_id = http_conn_id
        self.db_conn_id = db_conn_id

    @functools.cached_property
    def hook(self) -> CdrWebhookHook:
        """The hook that sends the request, with the ``request_timeout_seconds`` and egress settings."""
        from cdr_webhook.settings import load_settings

        settings = load_settings()
        return CdrWebhookHook(
            self.http_conn_id,
            timeout=settings.request_timeout_seconds,
            allowed_networks=settings.allowed_networks,
        )

    def execute(self, context: Context) -> None:
        from cdr_webhook.db import connect
        from cdr_webhook.settings import load_settings
        from cdr_webhook.signing import webhook_id

        settings = load_settings()
        ti = context["ti"]
        with connect(self.db_conn_id) as conn:
            claim = self._claim(conn, ti, settings)
            endpoint = self._endpoint(conn, claim)
            body = self._body(conn, claim, settings)
            msg_id = webhook_id(claim.cdr_id, endpoint.conn_id)
            self.log.info(
                "Sending CDR %s to endpoint %s (try %d, webhook-id %s)",
                claim.cdr_id,
                endpoint.conn_id,
                ti.try_number,
                msg_id,
            )
            result = self._post(conn, endpoint, body, msg_id, settings).scrubbed(endpoint.secrets())
            decision = decide_attempt(
                http_status=result.http_status,
                reason=result.reason,
                error=result.error,
                refused=result.refused,
                try_number=ti.try_number,
                max_tries=ti.max_tries,
            )
            self._record(conn, claim, result, decision, settings)
        self._report(claim, endpoint.conn_id, result, decision, msg_id)

    def _claim(self, conn: psycopg.Connection[Any], ti: Any, settings: Settings) -> Claim:
        """Own the CDR's ledger row for this try; skip when another run has it or its endpoint is paused."""
        from airflow.sdk.exceptions import AirflowSkipException

        from cdr_webhook import endpoints, ledger

        try:
            claim = ledger.start_attempt(
                conn,
                cdr_id=self.cdr_id,
                endpoint=self.http_conn_id,
                dag_id=ti.dag_id,
                run_id=ti.run_id,
                map_index=ti.map_index,
                claim_timeout_seconds=settings.claim_timeout_seconds,
            )
        except ledger.ClaimLost as err:
            raise AirflowSkipException(f"{err}; not sending it from this task") from None
        if endpoints.is_paused(conn, self.http_conn_id):
            ledger.release(conn, claim)
            raise AirflowSkipException(
                f"endpoint {self.http_conn_id} is paused: CDR {claim.cdr_id} stays queued and goes out, "
                "in order, once the endpoint is resumed"
            )
        return claim

    def _endpoint(self, conn: psycopg.Connection[Any], claim: Claim) -> EndpointConfig:
        """
        Read the endpoint's connection; a configuration error holds the endpoint and fails at once.

        No retry can mend a connection, so the endpoint is paused with the reason (its CDRs, this one
        included, stay queued and go out once it is fixed and resumed) and the task fails without
        using its retries.
        """
        from airflow.sdk.exceptions import AirflowFailException

        from cdr_webhook import endpoints, ledger
        from cdr_webhook.config import EndpointConfigError

        try:
            return self.hook.endpoint
        except EndpointConfigError as err:
            reason = f"configuration: {err}"
            ledger.release(conn, claim, reason=reason)
            event = endpoints.pause(conn, self.http_conn_id, reason=reason, actor="cdr_webhook")
            if event is not None:
                endpoints.notify(event)
            raise AirflowFailException(
                f"CDR {claim.cdr_id} not sent: {err}. Endpoint {self.http_conn_id} is paused and its CDRs "
                f"stay queued: fix the connection, then `python -m cdr_webhook endpoints resume "
                f"{self.http_conn_id}`"
            ) from None

    def _body(self, conn: psycopg.Connection[Any], claim: Claim, settings: Settings) -> bytes:
        """Build the body from the CDR's current source row; an unmappable row is skipped and fails."""
        from airflow.sdk.exceptions import AirflowFailException

        from cdr_webhook import ledger
        from cdr_webhook.payload import InvalidCdr, build_payload, encode_body
        from cdr_webhook.source import fetch_rows

        row = fetch_rows(conn, settings.source_relation, [(claim.cdr_id, claim.cdr_created_at)]).get(
            claim.cdr_id
        )
        try:
            if row is None:
                raise InvalidCdr(
                    claim.cdr_id, "cdr_id", claim.cdr_id, f"no longer in {settings.source_relation}"
                )
            return encode_body(build_payload(row))
        except InvalidCdr as err:
            ledger.mark_skipped(conn, claim, str(err))
            raise AirflowFailException(f"CDR {claim.cdr_id} cannot be sent: {err}") from None

    def _post(
        self,
        conn: psycopg.Connection[Any],
        endpoint: EndpointConfig,
        body: bytes,
        msg_id: str,
        settings: Settings,
    ) -> AttemptResult:
        """Sign and send, holding one of the endpoint's in-flight slots."""
        from airflow.sdk.exceptions import AirflowRescheduleException
        from airflow.sdk.log import mask_secret

        from cdr_webhook.signing import build_headers
        from cdr_webhook.slots import NoSlot, endpoint_slot

        for secret in endpoint.secrets():
            mask_secret(secret)
        limit = endpoint.max_in_flight or settings.max_in_flight_per_endpoint
        try:
            with endpoint_slot(conn, endpoint.conn_id, limit=limit, wait_seconds=settings.slot_wait_seconds):
                headers = build_headers(
                    msg_id=msg_id,
                    timestamp=int(time.time()),
                    body=body,
                    api_key=endpoint.api_key,
                    signing_secrets=endpoint.signing_secrets,
                )
                return self.hook.post(body, headers)
        except NoSlot as err:
            # Busy slots are the endpoint's congestion, not this CDR's failure: the try gives its
            # worker back and starts again later, without using one of its retries.
            wake = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=settings.request_timeout_seconds)
            self.log.info("%s; trying again at %s, without using a retry", err, wake.isoformat())
            raise AirflowRescheduleException(reschedule_date=wake) from None

    def _record(
        self,
        conn: psycopg.Connection[Any],
        claim: Claim,
        result: AttemptResult,
        decision: Decision,
        settings: Settings,
    ) -> None:
        """Record the attempt on the CDR's row and on its endpoint (a delivery's end may pause it)."""
        from cdr_webhook import endpoints, ledger

        ledger.record_attempt(
            conn,
            claim,
            status=decision.status,
            http_status=result.http_status,
            error=decision.error,
            response_excerpt=result.response_excerpt,
            latency_ms=result.latency_ms,
        )
        event = endpoints.record_outcome(
            conn,
            claim.endpoint,
            delivered=decision.status == "delivered",
            final=decision.final,
            gone=decision.gone,
            pause_after_failures=settings.pause_after_failures,
            pause_after_hours=settings.pause_after_hours,
        )
        if event is not None:
            endpoints.notify(event)  # logs the pause too

    def _report(
        self, claim: Claim, endpoint: str, result: AttemptResult, decision: Decision, msg_id: str
    ) -> None:
        """Log the attempt and end the task as the decision says: succeed, retry or fail."""
        from airflow.sdk.exceptions import AirflowFailException

        attempt = claim.attempts + 1
        _count("retried" if decision.verdict is Verdict.RETRY else decision.status, endpoint, result)
        if decision.verdict is Verdict.SUCCEED:
            self.log.info(
                "CDR %s delivered to %s: HTTP %s in %d ms (attempt %d, webhook-id %s)",
                claim.cdr_id,
                endpoint,
                result.http_status,
                result.latency_ms,
                attempt,
                msg_id,
            )
            return
        self.log.error(
            "CDR %s to endpoint %s failed: HTTP %s, %s (attempt %d, %d ms, webhook-id %s)",
            claim.cdr_id,
            endpoint,
            result.http_status if result.http_status is not None else "-",
            decision.error,
            attempt,
            result.latency_ms,
            msg_id,
        )
        if result.response_excerpt is not None:
            self.log.error("Response body starts: %s", describe_excerpt(result.response_excerpt))
        message = f"CDR {claim.cdr_id} to {endpoint}: {decision.error}"
        if decision.verdict is Verdict.FAIL_NOW:
            raise AirflowFailException(f"{message}; not retried, no retry can help")
        if decision.verdict is Verdict.EXHAUSTED:
            raise AirflowException(f"{message}; retries exhausted, marked failed")
        raise RetryLater(f"{message}; Airflow will retry", retry_after=result.retry_after)


def _count(event: str, endpoint: str, result: AttemptResult) -> None:
    """Emit Airflow metrics (StatsD / OpenTelemetry, as configured): the outcome and the latency."""
    from airflow.sdk.observability.stats import Stats

    tags = {"endpoint": endpoint}
    Stats.incr(f"cdr_webhook.{event}", tags=tags)
    Stats.timing("cdr_webhook.latency", result.latency_ms, tags=tags)
