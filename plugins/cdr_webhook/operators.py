"""The mapped POST task: one CDR to one endpoint, every attempt recorded in the ledger."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from airflow.providers.http.operators.http import HttpOperator

from cdr_webhook.hooks import CdrWebhookHook, describe_excerpt
from cdr_webhook.outcome import Outcome, classify_response, describe_status
from cdr_webhook.settings import CDR_DB_CONN_ID, DEFAULT_ENDPOINT_CONN_ID

if TYPE_CHECKING:
    from collections.abc import Sequence

    from airflow.sdk import Context

    from cdr_webhook.hooks import AttemptResult


class CdrWebhookOperator(HttpOperator):
    """
    POST one CDR to its endpoint as the Standard Webhooks–signed JSON payload.

    The body is read from the source relation and built when the task runs: it is never a template
    field (CDR text such as ``{{ 7 * 7 }}`` must arrive verbatim) and never travels through XCom, so
    phone numbers stay out of Airflow's metadata database. Outcome: 2xx delivered; 408, 429, 5xx,
    timeouts and connection errors raise for Airflow to retry with backoff; any other status fails
    the task at once, without using its retries.

    :param cdr_id: The CDR to send.
    :param http_conn_id: The HTTP connection of the endpoint: ``host`` is the full URL, ``password``
        the ``x-api-key`` value, extra ``signing_secret`` the ``whsec_…`` secret.
    :param db_conn_id: The Postgres connection of the CDR database.
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
        super().__init__(http_conn_id=http_conn_id, method="POST", log_response=False, **kwargs)
        self.cdr_id = cdr_id
        self.db_conn_id = db_conn_id

    @property
    def hook(self) -> CdrWebhookHook:
        """The hook that sends the request; its timeout is the ``request_timeout_seconds`` setting."""
        from cdr_webhook.settings import load_settings

        return CdrWebhookHook(self.http_conn_id, timeout=load_settings().request_timeout_seconds)

    def execute(self, context: Context) -> None:
        from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException
        from airflow.sdk.log import mask_secret

        from cdr_webhook import ledger
        from cdr_webhook.db import connect
        from cdr_webhook.payload import InvalidCdr, build_payload, encode_body
        from cdr_webhook.settings import load_settings
        from cdr_webhook.signing import build_headers, webhook_id
        from cdr_webhook.source import fetch_rows

        settings = load_settings()
        ti = context["ti"]
        endpoint = self.http_conn_id
        with connect(self.db_conn_id) as conn:
            try:
                claim = ledger.start_attempt(
                    conn,
                    cdr_id=self.cdr_id,
                    endpoint=endpoint,
                    dag_id=ti.dag_id,
                    run_id=ti.run_id,
                    map_index=ti.map_index,
                    claim_timeout_seconds=settings.claim_timeout_seconds,
                )
            except ledger.ClaimLost as err:
                raise AirflowSkipException(f"{err}; not sending it from this task") from None

            row = fetch_rows(conn, settings.source_relation, [(claim.cdr_id, claim.cdr_created_at)]).get(
                claim.cdr_id
            )
            try:
                if row is None:
                    raise InvalidCdr(
                        claim.cdr_id, "cdr_id", claim.cdr_id, f"no longer in {settings.source_relation}"
                    )
                body = encode_body(build_payload(row))
            except InvalidCdr as err:
                ledger.mark_skipped(conn, claim, str(err))
                raise AirflowFailException(f"CDR {claim.cdr_id} cannot be sent: {err}") from None

            msg_id = webhook_id(claim.cdr_id, endpoint)
            self.log.info(
                "Sending CDR %s to endpoint %s (try %d, webhook-id %s)",
                claim.cdr_id,
                endpoint,
                ti.try_number,
                msg_id,
            )
            hook = self.hook
            api_key, secrets = hook.credentials()
            for secret in (api_key, *secrets):
                if secret:
                    mask_secret(secret)
            headers = build_headers(
                msg_id=msg_id,
                timestamp=int(time.time()),
                body=body,
                api_key=api_key,
                signing_secrets=secrets,
            )
            result = hook.post(body, headers)
            outcome = Outcome.RETRY if result.http_status is None else classify_response(result.http_status)
            error = result.error or (
                None
                if outcome is Outcome.DELIVERED
                else describe_status(result.http_status or 0, result.reason)
            )
            will_retry = outcome is Outcome.RETRY and ti.try_number <= self.retries
            status = {
                Outcome.DELIVERED: "delivered",
                Outcome.FAIL: "failed",
                Outcome.RETRY: "queued" if will_retry else "failed",
            }[outcome]
            ledger.record_attempt(
                conn,
                claim,
                status=status,
                http_status=result.http_status,
                error=error,
                response_excerpt=result.response_excerpt,
                latency_ms=result.latency_ms,
            )

        attempt = claim.attempts + 1
        _count("retried" if will_retry else status, endpoint, result)
        if outcome is Outcome.DELIVERED:
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
        self._log_failure(claim.cdr_id, endpoint, result, error, attempt, msg_id)
        message = f"CDR {claim.cdr_id} to {endpoint}: {error}"
        if outcome is Outcome.FAIL:
            raise AirflowFailException(f"{message}; not retried, no retry can help")
        raise AirflowException(
            message + ("; Airflow will retry" if will_retry else "; retries exhausted, marked failed")
        )

    def _log_failure(
        self, cdr_id: str, endpoint: str, result: AttemptResult, error: str | None, attempt: int, msg_id: str
    ) -> None:
        self.log.error(
            "CDR %s to endpoint %s failed: HTTP %s, %s (attempt %d, %d ms, webhook-id %s)",
            cdr_id,
            endpoint,
            result.http_status if result.http_status is not None else "-",
            error,
            attempt,
            result.latency_ms,
            msg_id,
        )
        if result.response_excerpt is not None:
            self.log.error("Response body starts: %s", describe_excerpt(result.response_excerpt))


def _count(event: str, endpoint: str, result: AttemptResult) -> None:
    """Emit Airflow metrics (StatsD / OpenTelemetry, as configured): the outcome and the latency."""
    from airflow.sdk.observability.stats import Stats

    tags = {"endpoint": endpoint}
    Stats.incr(f"cdr_webhook.{event}", tags=tags)
    Stats.timing("cdr_webhook.latency", result.latency_ms, tags=tags)
