"""One try of ``post_cdr``: claim → endpoint → bodies → slots → POST → decide → record → report → end.

Each step is written once, for both shapes of the task: one CDR (the default) and a chunk of up to
``cdrs_per_task`` CDRs of one endpoint. What only a chunk needs (a pool of senders, batched records,
claims kept alive, its share of the endpoint's slots) is :mod:`cdr_webhook.deliver.chunk`'s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import (
    AirflowException,
    AirflowFailException,
    AirflowRescheduleException,
    AirflowSkipException,
)
from airflow.sdk.log import mask_secret

from cdr_webhook import ledger
from cdr_webhook.config import EndpointConfigError
from cdr_webhook.deliver import report
from cdr_webhook.deliver.operator import RetryLater
from cdr_webhook.deliver.slots import NoSlot, endpoint_slots
from cdr_webhook.ledger import endpoints
from cdr_webhook.outcome import Attempt, DeliveryStatus, Verdict, decide
from cdr_webhook.payload import InvalidCdr, build_body
from cdr_webhook.selection.source import fetch_rows
from cdr_webhook.signing import signed_headers, webhook_id

if TYPE_CHECKING:
    import logging
    from collections.abc import Iterator, Sequence

    import psycopg
    from requests import Session

    from cdr_webhook.config import EndpointConfig
    from cdr_webhook.deliver.hook import CdrWebhookHook
    from cdr_webhook.deliver.slots import HeldSlots
    from cdr_webhook.ledger import Claim, NotStarted
    from cdr_webhook.outcome import PostResult
    from cdr_webhook.settings import Settings

#: How a task of one CDR ends, by its verdict (a chunk ends by its worst: :func:`~.chunk.end_chunk`).
_ENDINGS = {
    Verdict.RETRY: "Airflow will retry",
    Verdict.FAIL_NOW: "not retried, no retry can help",
    Verdict.EXHAUSTED: "retries exhausted, marked failed",
}


class DeliveryEngine:
    """
    Deliver the CDRs of one endpoint in one try of ``post_cdr``, each its own POST, every attempt
    recorded in the ledger.

    :param conn: The CDR database (autocommit).
    :param hook: The endpoint's hook.
    :param ti: The running task instance (its run, map index, try number and max_tries).
    :param log: The task's log.
    :param chunk: The task is a chunk (``cdrs_per_task`` above 1): a retry sends only its CDRs still
        queued, they go out at once up to the endpoint's limit, and the task ends by its worst outcome.
    :param retries: The task's ``retries`` (a chunk's try after a clear is a fresh start).
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        hook: CdrWebhookHook,
        *,
        ti: Any,
        settings: Settings,
        log: logging.Logger,
        chunk: bool,
        retries: int,
    ) -> None:
        self.conn = conn
        self.hook = hook
        self.ti = ti
        self.settings = settings
        self.log = log
        self.chunk = chunk
        self.retries = retries
        self.endpoint_id = hook.http_conn_id
        self.not_started: dict[str, NotStarted] = {}  # CDRs this try does not send, and why
        self.skipped: list[tuple[Claim, str]] = []  # unmappable rows, and why

    def run(self, cdr_ids: Sequence[str]) -> None:
        """Deliver ``cdr_ids`` and end the task as their outcomes say: succeed, retry, fail or skip."""
        claims = self.claim(cdr_ids)
        attempts: list[Attempt] = []
        if claims:
            endpoint = self.endpoint(claims)
            bodies = self.bodies(claims)
            sendable = [claim for claim in claims if claim.cdr_id in bodies]
            if sendable:
                attempts = self.send(endpoint, sendable, bodies)
        self.end(cdr_ids, attempts)

    def claim(self, cdr_ids: Sequence[str]) -> list[Claim]:
        """
        Start an attempt on each CDR this try sends, in one statement; skip when the endpoint is paused.

        A task of one CDR sends it whenever its run owns it (a cleared try re-sends even a delivered
        CDR, on purpose) and is skipped, naming the owner, when another run does. A chunk's first
        try, and its first after a clear, sends every CDR of the chunk not delivered yet (a failed
        one again too); a retry only those still queued, those an earlier try left to retry.
        """
        claims, self.not_started = ledger.start_attempts(
            self.conn,
            cdr_ids=cdr_ids,
            endpoint=self.endpoint_id,
            dag_id=self.ti.dag_id,
            run_id=self.ti.run_id,
            map_index=self.ti.map_index,
            claim_timeout_seconds=self.settings.claim_timeout_seconds,
            own_statuses=self._own_statuses(),
        )
        for found in self.not_started.values():
            if not self.chunk:
                raise AirflowSkipException(f"{found.reason}; not sending it from this task")
            self.log.info("Not sent from this try: %s", found.reason)
        if claims and endpoints.is_paused(self.conn, self.endpoint_id):
            ledger.release_many(self.conn, claims)
            waiting = (
                f"the {len(claims)} CDR(s) of this chunk still to send stay"
                if self.chunk
                else f"CDR {claims[0].cdr_id} stays"
            )
            raise AirflowSkipException(
                f"endpoint {self.endpoint_id} is paused: {waiting} queued and go out, in order, once the "
                "endpoint is resumed"
            )
        return claims

    def _own_statuses(self) -> tuple[DeliveryStatus, ...]:
        """The statuses of this run's rows that this try sends again."""
        if not self.chunk:
            return tuple(DeliveryStatus)
        # Airflow sets max_tries to try_number + retries when it clears a task: this is a fresh start.
        if self.ti.try_number == self.ti.max_tries - self.retries + 1:
            return DeliveryStatus.QUEUED, DeliveryStatus.FAILED, DeliveryStatus.SKIPPED
        return (DeliveryStatus.QUEUED,)

    def endpoint(self, claims: Sequence[Claim]) -> EndpointConfig:
        """
        Read the endpoint's connection and mask its secrets in the task's log.

        A configuration error holds the endpoint (:func:`~cdr_webhook.ledger.endpoints.hold`: its
        CDRs, these included, stay queued until it is fixed and resumed) and fails the task without
        using its retries: no retry can mend a connection.
        """
        try:
            endpoint = self.hook.endpoint
        except EndpointConfigError as err:
            event = endpoints.hold(self.conn, self.endpoint_id, claims, err)
            if event is not None:
                endpoints.notify(event)
            shown = claims[0].cdr_id + (f" and {len(claims) - 1} more" if len(claims) > 1 else "")
            conn_id = self.endpoint_id
            raise AirflowFailException(
                f"CDR {shown} not sent: {err}. Endpoint {conn_id} is paused and its CDRs stay queued: fix "
                f"the connection, then `python -m cdr_webhook endpoints resume {conn_id}`"
            ) from None
        for secret in endpoint.secrets():
            mask_secret(secret)
        return endpoint

    def bodies(self, claims: Sequence[Claim]) -> dict[str, bytes]:
        """Build each claim's body from its current source row (one query); skip the unmappable ones."""
        relation = self.settings.source_relation
        rows = fetch_rows(self.conn, relation, [(claim.cdr_id, claim.cdr_created_at) for claim in claims])
        bodies = {}
        for claim in claims:
            try:
                bodies[claim.cdr_id] = build_body(
                    claim.cdr_id, rows.get(claim.cdr_id), relation, self.settings.max_payload_bytes
                )
            except InvalidCdr as err:
                self.skipped.append((claim, str(err)))
        ledger.mark_skipped_many(self.conn, self.skipped)
        for claim, reason in self.skipped:
            self.log.error("CDR %s cannot be sent, skipped: %s", claim.cdr_id, reason)
        return bodies

    def send(self, endpoint: EndpointConfig, claims: list[Claim], bodies: dict[str, bytes]) -> list[Attempt]:
        """POST the claims: a chunk's up to the endpoint's limit at once, one CDR from this thread."""
        if self.chunk:
            from cdr_webhook.deliver.chunk import send_chunk

            return send_chunk(self, endpoint, claims, bodies)
        [claim] = claims
        msg_id = webhook_id(claim.cdr_id, endpoint.conn_id)
        self.log.info(
            "Sending CDR %s to endpoint %s (try %d, webhook-id %s)",
            claim.cdr_id,
            endpoint.conn_id,
            self.ti.try_number,
            msg_id,
        )
        with self.slots(endpoint, wanted=1):
            result = self.post(endpoint, bodies[claim.cdr_id], msg_id)
        attempt = self.decide(claim, result, msg_id)
        self.record([attempt])
        self.report(attempt)
        return [attempt]

    def in_flight_limit(self, endpoint: EndpointConfig) -> int:
        """How many POSTs the endpoint may have in flight, across every task."""
        return endpoint.in_flight_limit(self.settings.max_in_flight_per_endpoint)

    @contextlib.contextmanager
    def slots(self, endpoint: EndpointConfig, *, wanted: int) -> Iterator[HeldSlots]:
        """
        Hold up to ``wanted`` of the endpoint's in-flight slots for the block (a chunk shares them
        with the endpoint's other chunks sending at once).

        When every slot stays busy, nothing was sent: the busy slots are the endpoint's congestion,
        not the CDRs' failure, so the try gives its worker back and starts again later, without
        using one of its retries (its claims stay this run's, queued).
        """
        with contextlib.ExitStack() as stack:
            try:
                held = stack.enter_context(
                    endpoint_slots(
                        self.conn,
                        endpoint.conn_id,
                        limit=self.in_flight_limit(endpoint),
                        wanted=wanted,
                        wait_seconds=self.settings.slot_wait_seconds,
                        share=self.chunk,
                    )
                )
            except NoSlot as err:
                wake = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.settings.request_timeout_seconds)
                self.log.info("%s; trying again at %s, without using a retry", err, wake.isoformat())
                raise AirflowRescheduleException(reschedule_date=wake) from None
            yield held

    def post(
        self, endpoint: EndpointConfig, body: bytes, msg_id: str, session: Session | None = None
    ) -> PostResult:
        """Sign ``body`` now and POST it (from any thread: no database); its secrets are scrubbed."""
        headers = signed_headers(endpoint, body, msg_id)
        return self.hook.post(body, headers, session=session).scrubbed(endpoint.secrets())

    def decide(self, claim: Claim, result: PostResult, msg_id: str) -> Attempt:
        """Decide an attempt by what its POST produced and the task instance's try and max_tries."""
        decision = decide(result, try_number=self.ti.try_number, max_tries=self.ti.max_tries)
        return Attempt(claim, result, decision, msg_id)

    def record(self, attempts: Sequence[Attempt]) -> bool:
        """
        Record attempts on their CDRs' rows (one statement) and on the endpoint (one, in their
        order); return whether they paused the endpoint (its event is logged and notified).
        """
        if not attempts:
            return False
        ledger.record_attempts(self.conn, attempts)
        event = endpoints.record_outcomes(
            self.conn,
            self.endpoint_id,
            [attempt.decision for attempt in attempts],
            pause_after_failures=self.settings.pause_after_failures,
            pause_after_hours=self.settings.pause_after_hours,
        )
        if event is None:
            return False
        endpoints.notify(event)  # logs the pause too
        return True

    def report(self, attempt: Attempt) -> None:
        """The attempt's line in the task log, and its metrics."""
        report.log_attempt(self.log, attempt)
        report.count(attempt)

    def end(self, cdr_ids: Sequence[str], attempts: list[Attempt]) -> None:
        """End the task as its outcome says: a chunk by its worst (and its summary), one CDR by its own."""
        if self.chunk:
            from cdr_webhook.deliver.chunk import end_chunk

            end_chunk(self, cdr_ids, attempts)
            return
        if self.skipped:
            [(claim, reason)] = self.skipped
            raise AirflowFailException(f"CDR {claim.cdr_id} cannot be sent: {reason}")
        [attempt] = attempts
        verdict = attempt.decision.verdict
        if verdict is not Verdict.DELIVERED:
            raise task_exception(
                verdict,
                f"CDR {attempt.claim.cdr_id} to {attempt.claim.endpoint}: {attempt.decision.error}; "
                f"{_ENDINGS[verdict]}",
                retry_after=attempt.result.retry_after,
            )


def task_exception(verdict: Verdict, message: str, *, retry_after: float | None = None) -> AirflowException:
    """What a try raises for a verdict that is not a delivery: retry (after ``retry_after``), or fail."""
    if verdict is Verdict.RETRY:
        return RetryLater(message, retry_after=retry_after)
    if verdict is Verdict.FAIL_NOW:
        return AirflowFailException(message)
    return AirflowException(message)  # exhausted: the last try failed, Airflow marks the task failed
