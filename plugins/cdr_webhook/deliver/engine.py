"""One try of ``post_cdr``: claim → endpoint → bodies → slots → POST → decide → record → report → end.

Each step is written once, in :class:`DeliveryEngine`, for both shapes of the task; what differs is a
strategy the operator picks: :class:`OneCdrDelivery` (here) sends a task's one CDR from its thread and
ends by its outcome; :class:`~cdr_webhook.deliver.chunks.ChunkDelivery` sends many CDRs of one or many
endpoints on lanes (:mod:`cdr_webhook.deliver.lanes`) and ends by the worst outcome.
"""

from __future__ import annotations

import abc
import contextlib
import datetime as dt
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowFailException, AirflowRescheduleException, AirflowSkipException
from airflow.sdk.log import mask_secret

from cdr_webhook import ledger
from cdr_webhook.adapters import notify_endpoint_event
from cdr_webhook.deliver import report
from cdr_webhook.deliver.errors import task_exception
from cdr_webhook.deliver.rate import pace_one, send_deadline
from cdr_webhook.deliver.slots import NoSlot, endpoint_slots
from cdr_webhook.endpoint_config import EndpointConfigError
from cdr_webhook.ledger import endpoints, pause_rules
from cdr_webhook.outcome import Attempt, DeliveryStatus, Verdict, decide_attempt
from cdr_webhook.payload import InvalidCdr
from cdr_webhook.request import Excluded, request_body
from cdr_webhook.selection.source import fetch_rows
from cdr_webhook.signing import signed_headers, webhook_id

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable, Iterator, Mapping, Sequence

    import psycopg
    from requests import Session

    from cdr_webhook.deliver.hook import CdrWebhookHook
    from cdr_webhook.deliver.slots import HeldSlots
    from cdr_webhook.endpoint_config import EndpointConfig, EndpointFilters
    from cdr_webhook.ledger import Claim, NotStarted
    from cdr_webhook.outcome import Decision, PostResult
    from cdr_webhook.settings import Settings

    #: ``(endpoint, its cdr_ids)`` of a task, in order.
    Deliveries = Sequence[tuple[str, Sequence[str]]]

#: How a task of one CDR ends, by its verdict (many CDRs end by their worst: :func:`~.lanes.end_lanes`).
_ENDINGS = {
    Verdict.RETRY: "Airflow will retry",
    Verdict.FAIL_NOW: "not retried, no retry can help",
    Verdict.EXHAUSTED: "retries exhausted, marked failed",
}


class DeliveryEngine(abc.ABC):
    """
    Deliver the CDRs of one try of ``post_cdr``, each its own POST, every attempt recorded in the ledger.

    :param conn: The CDR database (autocommit).
    :param hooks: ``endpoint -> its hook`` (one per endpoint for the task).
    :param ti: The running task instance (its run, map index, try number and max_tries).
    :param log: The task's log.
    :param retries: The task's ``retries`` (a chunk's try after a clear is a fresh start).
    :param time_limit: The task's ``execution_timeout``: no POST waits for its endpoint's rate past it.
    :param connect: Opens another connection to the CDR database (a chunk records its outcomes on one
        of its own, :mod:`cdr_webhook.deliver.recorder`).
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        hooks: Callable[[str], CdrWebhookHook],
        *,
        ti: Any,
        settings: Settings,
        log: logging.Logger,
        retries: int,
        time_limit: dt.timedelta | None = None,
        connect: Callable[[], psycopg.Connection[Any]] | None = None,
    ) -> None:
        self.conn = conn
        self.connect = connect
        self.hooks = hooks
        self.ti = ti
        self.settings = settings
        self.log = log
        self.retries = retries
        self.ends = send_deadline(settings, time_limit)  # the last moment a POST may start
        self.endpoint_ids: list[str] = []
        self.not_started: dict[str, NotStarted] = {}  # CDRs this try does not send, and why
        self.skipped: list[tuple[Claim, str]] = []  # unmappable rows, and why
        self.held: list[str] = []  # endpoints held (a connection that cannot be used), and why
        self.paused: list[str] = []  # endpoints paused: their CDRs stay queued
        self.paused_cdrs = 0

    def run(self, deliveries: Deliveries) -> None:
        """Deliver each endpoint's CDRs; end the task as their outcomes say: succeed, retry, fail or skip."""
        self.endpoint_ids = [endpoint_id for endpoint_id, _ in deliveries]
        claimed = self.claim(deliveries)
        # The bodies first: a CDR that cannot be sent is skipped whatever its endpoint's state.
        bodies = self.bodies(claimed)
        ready = []
        for endpoint_id, claims in claimed.items():
            sendable = [claim for claim in claims if claim.cdr_id in bodies]
            if sendable and (endpoint := self.endpoint(endpoint_id, sendable)) is not None:
                ready.append((endpoint, sendable))
        self.send(ready, bodies, [cdr_id for _, ids in deliveries for cdr_id in ids])

    @abc.abstractmethod
    def send(
        self, ready: list[tuple[EndpointConfig, list[Claim]]], bodies: dict[str, bytes], cdr_ids: list[str]
    ) -> None:
        """POST the claims that have a body, record and report them, and end the task by their outcomes."""

    @abc.abstractmethod
    def not_sent(self, found: NotStarted) -> None:
        """A CDR of the task this try does not send (delivered already, or another run's)."""

    @abc.abstractmethod
    def paused_back(self, endpoint_id: str, held_back: list[Claim]) -> None:
        """The claims of a paused endpoint, given back to the queue."""

    @abc.abstractmethod
    def unusable(self, endpoint_id: str, message: str) -> None:
        """An endpoint whose connection cannot be used: it is held, its CDRs queued."""

    @abc.abstractmethod
    def own_statuses(self) -> tuple[DeliveryStatus, ...]:
        """The statuses of this run's rows that this try sends again."""

    def claim(self, deliveries: Deliveries) -> dict[str, list[Claim]]:
        """
        Start an attempt on each CDR this try sends, in one statement; return them by endpoint, none
        of a paused endpoint.

        A task of one CDR sends it whenever its run owns it (a cleared try re-sends even a delivered
        CDR, on purpose) and is skipped, naming the owner, when another run does. A chunk's first
        try, and its first after a clear, sends every CDR of the chunk not delivered yet (a failed
        one again too); a retry only those still queued, those an earlier try left to retry.
        """
        claims, self.not_started = ledger.start_attempts(
            self.conn,
            cdr_ids=[cdr_id for _, ids in deliveries for cdr_id in ids],
            endpoint=[endpoint_id for endpoint_id, ids in deliveries for _ in ids],
            dag_id=self.ti.dag_id,
            run_id=self.ti.run_id,
            map_index=self.ti.map_index,
            claim_timeout_seconds=self.settings.claim_timeout_seconds,
            own_statuses=self.own_statuses(),
        )
        for found in self.not_started.values():
            self.not_sent(found)
        by_endpoint: dict[str, list[Claim]] = {}
        for claim in claims:
            by_endpoint.setdefault(claim.endpoint, []).append(claim)
        paused = endpoints.paused_endpoints(self.conn) & set(by_endpoint) if by_endpoint else set()
        for endpoint_id in sorted(paused):
            held_back = by_endpoint.pop(endpoint_id)
            ledger.release_many(self.conn, held_back)
            self.paused_back(endpoint_id, held_back)
        return by_endpoint

    def endpoint(self, endpoint_id: str, claims: Sequence[Claim]) -> EndpointConfig | None:
        """
        Read the endpoint's connection and mask its secrets in the task's log.

        A configuration error holds the endpoint (:func:`~cdr_webhook.ledger.endpoints.hold`: its
        CDRs, these included, stay queued until it is fixed and resumed): a task of one CDR fails
        at once, without using its retries (no retry can mend a connection); a task of many sends
        its other endpoints' CDRs, then fails naming it (None here).
        """
        try:
            endpoint = self.hooks(endpoint_id).endpoint
        except EndpointConfigError as err:
            event = endpoints.hold(self.conn, endpoint_id, claims, err)
            if event is not None:
                notify_endpoint_event(event)
            shown = claims[0].cdr_id + (f" and {len(claims) - 1} more" if len(claims) > 1 else "")
            message = (
                f"CDR {shown} not sent: {err}. Endpoint {endpoint_id} is paused and its CDRs stay queued: "
                f"fix the connection, then `python -m cdr_webhook endpoints resume {endpoint_id}`"
            )
            self.unusable(endpoint_id, message)
            self.held.append(f"{endpoint_id} ({err})")
            return None
        for secret in endpoint.secrets():
            mask_secret(secret)
        return endpoint

    def bodies(self, claimed: Mapping[str, list[Claim]]) -> dict[str, bytes]:
        """
        Build each claim's body from its current source row (one query), through its endpoint's
        filters; skip, each once with its reason, the CDRs that cannot become a body or that the
        filters leave out (the checks the select step makes on a task of one CDR).
        """
        claims = [claim for endpoint_claims in claimed.values() for claim in endpoint_claims]
        if not claims:
            return {}
        relation = self.settings.source_relation
        rows = fetch_rows(self.conn, relation, [(claim.cdr_id, claim.cdr_created_at) for claim in claims])
        bodies = {}
        skipped = []
        for endpoint_id, endpoint_claims in claimed.items():
            filters = self.filters(endpoint_id)
            for claim in endpoint_claims:
                try:
                    bodies[claim.cdr_id] = request_body(
                        claim.cdr_id,
                        rows.get(claim.cdr_id),
                        relation=relation,
                        max_bytes=self.settings.max_payload_bytes,
                        filters=filters,
                    )
                except (InvalidCdr, Excluded) as err:
                    skipped.append((claim, str(err)))
        ledger.mark_skipped_many(self.conn, skipped)
        for claim, reason in skipped:
            self.log.warning("CDR %s not sent, skipped: %s", claim.cdr_id, reason)
        self.skipped.extend(skipped)
        return bodies

    def filters(self, endpoint_id: str) -> EndpointFilters | None:
        """The endpoint's filters; none for a connection that cannot be used (:meth:`endpoint` holds it)."""
        try:
            return self.hooks(endpoint_id).endpoint.filters
        except EndpointConfigError:
            return None

    def in_flight_limit(self, endpoint: EndpointConfig) -> int:
        """How many POSTs the endpoint may have in flight, across every task."""
        return endpoint.in_flight_limit(self.settings.max_in_flight_per_endpoint)

    def later(self) -> dt.datetime:
        """When a try that found every slot busy starts again."""
        return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.settings.request_timeout_seconds)

    @contextlib.contextmanager
    def slots(self, endpoint: EndpointConfig) -> Iterator[HeldSlots]:
        """
        Hold one of the endpoint's in-flight slots for the block.

        When every slot stays busy, nothing was sent: the busy slots are the endpoint's congestion,
        not the CDR's failure, so the try gives its worker back and starts again later, without
        using one of its retries (its claim stays this run's, queued).
        """
        with contextlib.ExitStack() as stack:
            try:
                held = stack.enter_context(
                    endpoint_slots(
                        self.conn,
                        endpoint.conn_id,
                        limit=self.in_flight_limit(endpoint),
                        wanted=1,
                        wait_seconds=self.settings.slot_wait_seconds,
                    )
                )
            except NoSlot as err:
                wake = self.later()
                self.log.info("%s; trying again at %s, without using a retry", err, wake.isoformat())
                raise AirflowRescheduleException(reschedule_date=wake) from None
            yield held

    def post(
        self, endpoint: EndpointConfig, body: bytes, msg_id: str, session: Session | None = None
    ) -> PostResult:
        """Sign ``body`` now and POST it (from any thread: no database); its secrets are scrubbed."""
        headers = signed_headers(endpoint, body, msg_id)
        return self.hooks(endpoint.conn_id).post(body, headers, session=session).scrubbed(endpoint.secrets())

    def attempt_of(self, claim: Claim, result: PostResult, msg_id: str) -> Attempt:
        """Decide an attempt by what its POST produced and the task instance's try and max_tries."""
        decision = decide_attempt(result, try_number=self.ti.try_number, max_tries=self.ti.max_tries)
        return Attempt(claim, result, decision, msg_id)

    def record(self, attempts: Sequence[Attempt], conn: psycopg.Connection[Any] | None = None) -> set[str]:
        """
        Record attempts on their CDRs' rows (one statement) and on their endpoints (one each, in
        their order); return the endpoints they paused (each event is logged and notified).

        ``conn``: another connection than the task's (a chunk's recorder thread has its own).
        """
        if not attempts:
            return set()
        conn = self.conn if conn is None else conn
        ledger.record_attempts(conn, attempts)
        by_endpoint: dict[str, list[Decision]] = {}
        for attempt in attempts:
            by_endpoint.setdefault(attempt.claim.endpoint, []).append(attempt.decision)
        rules = pause_rules.PauseRules(
            self.settings.pause_after_failures,
            self.settings.pause_after_hours,
            self.settings.pause_after_minutes,
        )
        paused = set()
        for event in pause_rules.record_many_outcomes(conn, by_endpoint, rules):
            notify_endpoint_event(event)  # logs the pause too
            paused.add(event.endpoint)
        return paused

    def report(self, attempt: Attempt) -> None:
        """The attempt's line in the task log, and its metrics."""
        report.log_attempt(self.log, attempt)
        report.count(attempt)


class OneCdrDelivery(DeliveryEngine):
    """
    A task of one CDR: it sends its CDR whenever its run owns it (a cleared try re-sends even a
    delivered CDR, on purpose), from its own thread, and ends as its outcome says: a CDR not its to
    send, or its endpoint paused, skips the task; an unusable connection fails it at once.
    """

    def send(
        self, ready: list[tuple[EndpointConfig, list[Claim]]], bodies: dict[str, bytes], cdr_ids: list[str]
    ) -> None:
        self.end_one(
            [self.send_one(endpoint, claim, bodies) for endpoint, [claim] in ready if claim.cdr_id in bodies]
        )

    def not_sent(self, found: NotStarted) -> None:
        raise AirflowSkipException(f"{found.reason}; not sending it from this task")

    def paused_back(self, endpoint_id: str, held_back: list[Claim]) -> None:
        raise AirflowSkipException(
            f"endpoint {endpoint_id} is paused: CDR {held_back[0].cdr_id} stays queued and goes out, "
            "in order, once the endpoint is resumed"
        )

    def unusable(self, endpoint_id: str, message: str) -> None:
        raise AirflowFailException(message) from None

    def own_statuses(self) -> tuple[DeliveryStatus, ...]:
        return tuple(DeliveryStatus)

    def send_one(self, endpoint: EndpointConfig, claim: Claim, bodies: dict[str, bytes]) -> Attempt:
        """POST a task's one CDR from this thread, holding one of its endpoint's slots."""
        msg_id = webhook_id(claim.cdr_id, endpoint.conn_id)
        self.log.info(
            "Sending CDR %s to endpoint %s (try %d, webhook-id %s)",
            claim.cdr_id,
            endpoint.conn_id,
            self.ti.try_number,
            msg_id,
        )
        with self.slots(endpoint):
            pacer = pace_one(self, endpoint)  # waits for its rate limit's send time, if it has one
            result = self.post(endpoint, bodies[claim.cdr_id], msg_id)
        attempt = self.attempt_of(claim, result, msg_id)
        if pacer is not None:
            pacer.heard(attempt)
        self.record([attempt])
        self.report(attempt)
        return attempt

    def end_one(self, attempts: list[Attempt]) -> None:
        """End a task of one CDR as its CDR's outcome says."""
        if self.skipped:
            [(claim, reason)] = self.skipped
            raise AirflowFailException(f"CDR {claim.cdr_id} cannot be sent: {reason}")
        if not attempts:
            return
        [attempt] = attempts
        verdict = attempt.decision.verdict
        if verdict is not Verdict.DELIVERED:
            raise task_exception(
                verdict,
                f"CDR {attempt.claim.cdr_id} to {attempt.claim.endpoint}: {attempt.decision.error}; "
                f"{_ENDINGS[verdict]}",
                retry_after=attempt.result.retry_after,
            )
