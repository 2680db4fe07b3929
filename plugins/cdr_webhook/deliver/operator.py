"""The mapped POST task: one CDR to one endpoint, every attempt recorded in the ledger."""

from __future__ import annotations

import datetime as dt
import functools
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.definitions.retry_policy import RetryDecision, RetryPolicy
from airflow.sdk.exceptions import AirflowException

from cdr_webhook.deliver.attempts import (
    Attempt,
    build_bodies,
    decide,
    hold_endpoint,
    log_attempt,
    make_hook,
    mask_secrets,
    record,
    signed_post,
)
from cdr_webhook.outcome import Verdict
from cdr_webhook.settings import CDR_DB_CONN_ID, DEFAULT_ENDPOINT_CONN_ID

if TYPE_CHECKING:
    from collections.abc import Sequence

    import psycopg
    from airflow.sdk import Context

    from cdr_webhook.config import EndpointConfig
    from cdr_webhook.deliver.hook import AttemptResult, CdrWebhookHook
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


class EndpointPostOperator(BaseOperator):
    """
    What the one-CDR and the chunk operators share: no template fields, the hook, the endpoint.

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
        self, *, http_conn_id: str = DEFAULT_ENDPOINT_CONN_ID, db_conn_id: str = CDR_DB_CONN_ID, **kwargs: Any
    ) -> None:
        kwargs["do_xcom_push"] = False
        super().__init__(**kwargs)
        self.http_conn_id = http_conn_id
        self.db_conn_id = db_conn_id

    @functools.cached_property
    def hook(self) -> CdrWebhookHook:
        """The hook that sends the requests, with the ``request_timeout_seconds`` and egress settings."""
        return make_hook(self.http_conn_id)

    def _endpoint(self, conn: psycopg.Connection[Any], claims: Sequence[Claim]) -> EndpointConfig:
        """
        Read the endpoint's connection; a configuration error holds the endpoint and fails at once.

        No retry can mend a connection, so the endpoint is paused with the reason (its CDRs, these
        included, stay queued and go out once it is fixed and resumed) and the task fails without
        using its retries.
        """
        from airflow.sdk.exceptions import AirflowFailException

        from cdr_webhook.config import EndpointConfigError

        try:
            return self.hook.endpoint
        except EndpointConfigError as err:
            raise AirflowFailException(hold_endpoint(conn, self.http_conn_id, claims, err)) from None


class CdrWebhookOperator(EndpointPostOperator):
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
    """

    def __init__(self, *, cdr_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cdr_id = cdr_id

    def execute(self, context: Context) -> None:
        from cdr_webhook.db import connect
        from cdr_webhook.settings import load_settings
        from cdr_webhook.signing import webhook_id

        settings = load_settings()
        ti = context["ti"]
        with connect(self.db_conn_id) as conn:
            claim = self._claim(conn, ti, settings)
            endpoint = self._endpoint(conn, [claim])
            body = self._body(conn, claim, settings)
            msg_id = webhook_id(claim.cdr_id, endpoint.conn_id)
            self.log.info(
                "Sending CDR %s to endpoint %s (try %d, webhook-id %s)",
                claim.cdr_id,
                endpoint.conn_id,
                ti.try_number,
                msg_id,
            )
            result = self._post(conn, endpoint, body, msg_id, settings)
            attempt = Attempt(claim, result, decide(result, ti), msg_id)
            record(conn, [attempt], settings)
        self._report(attempt)

    def _claim(self, conn: psycopg.Connection[Any], ti: Any, settings: Settings) -> Claim:
        """Own the CDR's ledger row for this try; skip when another run has it or its endpoint is paused."""
        from airflow.sdk.exceptions import AirflowSkipException

        from cdr_webhook import ledger
        from cdr_webhook.ledger import endpoints

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

    def _body(self, conn: psycopg.Connection[Any], claim: Claim, settings: Settings) -> bytes:
        """Build the body from the CDR's current source row; an unmappable row is skipped and fails."""
        from airflow.sdk.exceptions import AirflowFailException

        from cdr_webhook import ledger
        from cdr_webhook.selection.source import fetch_rows

        rows = fetch_rows(conn, settings.source_relation, [(claim.cdr_id, claim.cdr_created_at)])
        bodies, invalid = build_bodies(rows, [claim], settings.source_relation)
        if invalid:
            [(_, reason)] = invalid
            ledger.mark_skipped(conn, claim, reason)
            raise AirflowFailException(f"CDR {claim.cdr_id} cannot be sent: {reason}")
        return bodies[claim.cdr_id]

    def _post(
        self,
        conn: psycopg.Connection[Any],
        endpoint: EndpointConfig,
        body: bytes,
        msg_id: str,
        settings: Settings,
    ) -> AttemptResult:
        """Sign and send, holding one of the endpoint's in-flight slots."""
        from cdr_webhook.deliver.slots import NoSlot, endpoint_slot

        mask_secrets(endpoint)
        limit = endpoint.in_flight_limit(settings.max_in_flight_per_endpoint)
        try:
            with endpoint_slot(conn, endpoint.conn_id, limit=limit, wait_seconds=settings.slot_wait_seconds):
                return signed_post(self.hook, endpoint, body, msg_id)
        except NoSlot as err:
            raise reschedule(self.log, err, settings) from None

    def _report(self, attempt: Attempt) -> None:
        """Log the attempt and end the task as the decision says: succeed, retry or fail."""
        from airflow.sdk.exceptions import AirflowFailException

        log_attempt(self.log, attempt)
        decision = attempt.decision
        if decision.verdict is Verdict.SUCCEED:
            return
        message = f"CDR {attempt.claim.cdr_id} to {attempt.claim.endpoint}: {decision.error}"
        if decision.verdict is Verdict.FAIL_NOW:
            raise AirflowFailException(f"{message}; not retried, no retry can help")
        if decision.verdict is Verdict.EXHAUSTED:
            raise AirflowException(f"{message}; retries exhausted, marked failed")
        raise RetryLater(f"{message}; Airflow will retry", retry_after=attempt.result.retry_after)


def reschedule(log: Any, err: Exception, settings: Settings) -> Exception:
    """
    Busy slots are the endpoint's congestion, not the CDRs' failure: the try gives its worker back
    and starts again later, without using one of its retries.
    """
    from airflow.sdk.exceptions import AirflowRescheduleException

    wake = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=settings.request_timeout_seconds)
    log.info("%s; trying again at %s, without using a retry", err, wake.isoformat())
    return AirflowRescheduleException(reschedule_date=wake)
