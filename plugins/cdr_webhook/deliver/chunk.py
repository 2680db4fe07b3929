"""Chunk mode: one mapped task POSTs up to ``cdrs_per_task`` CDRs of one endpoint, each its own POST.

Each CDR keeps its own ledger row, attempts, ``webhook-id``, deadline and outcome rules (the same
steps as a task of one CDR: :mod:`cdr_webhook.deliver.attempts`); the task sends up to the endpoint's
in-flight limit at once over kept-alive connections, and its ledger work is batched.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import TYPE_CHECKING, Any

from cdr_webhook.deliver.attempts import (
    Attempt,
    build_bodies,
    decide,
    log_attempt,
    mask_secrets,
    record,
    signed_post,
)
from cdr_webhook.deliver.operator import EndpointPostOperator
from cdr_webhook.outcome import Verdict

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import psycopg
    from airflow.sdk import Context
    from requests import Session

    from cdr_webhook.config import EndpointConfig
    from cdr_webhook.deliver.hook import AttemptResult
    from cdr_webhook.deliver.slots import HeldSlots
    from cdr_webhook.ledger import Claim, NotStarted
    from cdr_webhook.settings import Settings

#: Outcomes recorded at once: a worker lost mid-chunk re-sends at most these (at-least-once).
RECORD_EVERY = 50
#: ...or this often, in seconds, whichever comes first.
RECORD_SECONDS = 2.0
#: How often a chunk holding fewer slots than it could use asks for those that came free.
GROW_SECONDS = 0.1

#: The mapped task's name in the grid: its first CDR and how many it holds (ids only, never CDR text).
CHUNK_NAME_TEMPLATE = "{{ task.cdr_ids[0] }} ({{ task.cdr_ids | length }} CDRs)"


class CdrWebhookChunkOperator(EndpointPostOperator):
    """
    POST a chunk of CDRs of one endpoint, each as its own Standard Webhooks–signed request.

    Every CDR is claimed, built, signed, sent, decided and recorded exactly as
    :class:`~cdr_webhook.deliver.operator.CdrWebhookOperator` does for one; up to the endpoint's in-flight
    limit go at once. The task ends by the worst outcome among its CDRs: some to retry, it raises
    for Airflow to retry, and the retry sends only those; some failed for good (after its other CDRs
    were delivered), it fails, naming them; clearing it sends again its CDRs not delivered.

    :param cdr_ids: The CDRs to send, all of endpoint ``http_conn_id``, oldest first.
    :param http_conn_id: The HTTP connection of the endpoint.
    :param db_conn_id: The Postgres connection of the CDR database.
    """

    def __init__(self, *, cdr_ids: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cdr_ids = list(cdr_ids)

    def execute(self, context: Context) -> None:
        from cdr_webhook.db import connect
        from cdr_webhook.settings import load_settings

        settings = load_settings()
        ti = context["ti"]
        with connect(self.db_conn_id) as conn:
            claims, not_started = self._claim(conn, ti, settings)
            attempts: list[Attempt] = []
            skipped: list[tuple[Claim, str]] = []
            if claims:
                endpoint = self._endpoint(conn, claims)
                attempts, skipped = self._send(conn, ti, endpoint, claims, settings)
        self._report(ti, attempts, skipped, not_started)

    def _claim(
        self, conn: psycopg.Connection[Any], ti: Any, settings: Settings
    ) -> tuple[list[Claim], dict[str, NotStarted]]:
        """
        Start an attempt on each CDR of the chunk this try sends, in one statement.

        The first try, and the first after a clear, send every CDR of the chunk not delivered yet (a
        failed one again too); a retry sends only those still queued, those an earlier try left to
        retry. When the endpoint is paused, they go back to the queue and the task is skipped.
        """
        from airflow.sdk.exceptions import AirflowSkipException

        from cdr_webhook import ledger
        from cdr_webhook.ledger import endpoints

        # Airflow sets max_tries to try_number + retries when it clears a task: this is a fresh start.
        fresh = ti.try_number == ti.max_tries - self.retries + 1
        claims, not_started = ledger.start_attempts(
            conn,
            cdr_ids=self.cdr_ids,
            endpoint=self.http_conn_id,
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            map_index=ti.map_index,
            claim_timeout_seconds=settings.claim_timeout_seconds,
            own_statuses=("queued", "failed", "skipped") if fresh else ("queued",),
        )
        for found in not_started.values():
            self.log.info("Not sent from this try: %s", found.reason)
        if claims and endpoints.is_paused(conn, self.http_conn_id):
            ledger.release_many(conn, claims)
            raise AirflowSkipException(
                f"endpoint {self.http_conn_id} is paused: the {len(claims)} CDR(s) of this chunk still to "
                "send stay queued and go out, in order, once the endpoint is resumed"
            )
        return claims, not_started

    def _send(
        self,
        conn: psycopg.Connection[Any],
        ti: Any,
        endpoint: EndpointConfig,
        claims: list[Claim],
        settings: Settings,
    ) -> tuple[list[Attempt], list[tuple[Claim, str]]]:
        """Build every body (one query), then POST them up to the in-flight limit at once."""
        from cdr_webhook import ledger
        from cdr_webhook.deliver.operator import reschedule
        from cdr_webhook.deliver.slots import NoSlot, endpoint_slots
        from cdr_webhook.selection.source import fetch_rows

        rows = fetch_rows(conn, settings.source_relation, [(c.cdr_id, c.cdr_created_at) for c in claims])
        bodies, skipped = build_bodies(rows, claims, settings.source_relation)
        ledger.mark_skipped_many(conn, skipped)
        for claim, reason in skipped:
            self.log.error("CDR %s cannot be sent, skipped: %s", claim.cdr_id, reason)
        sendable = [claim for claim in claims if claim.cdr_id in bodies]
        if not sendable:
            return [], skipped
        mask_secrets(endpoint)
        limit = endpoint.in_flight_limit(settings.max_in_flight_per_endpoint)
        wanted = min(limit, len(sendable))
        self.log.info(
            "Sending %d CDR(s) to endpoint %s, up to %d at once (try %d)",
            len(sendable),
            endpoint.conn_id,
            limit,
            ti.try_number,
        )
        try:
            with endpoint_slots(
                conn,
                endpoint.conn_id,
                limit=limit,
                wanted=wanted,
                wait_seconds=settings.slot_wait_seconds,
                share=True,
            ) as held:
                attempts = self._post_all(conn, ti, held, wanted, endpoint, sendable, bodies, settings)
        except NoSlot as err:
            # Nothing was sent: the claims stay this run's, queued, for the rescheduled try.
            raise reschedule(self.log, err, settings) from None
        return attempts, skipped

    def _post_all(
        self,
        conn: psycopg.Connection[Any],
        ti: Any,
        held: HeldSlots,
        wanted: int,
        endpoint: EndpointConfig,
        claims: list[Claim],
        bodies: dict[str, bytes],
        settings: Settings,
    ) -> list[Attempt]:
        """
        POST every claim, as many at once as slots are held (``wanted`` at most: the endpoint's
        limit, or fewer when fewer CDRs), each sending thread with its kept-alive session; decide,
        log and record the outcomes as they come (a batch at a time).

        Only this thread touches the database: the workers only send. While CDRs wait, it takes the
        endpoint's slots that come free (another task finished) up to its fair share (the limit
        divided among the endpoint's chunks sending at once); once fewer CDRs are left than slots
        held, or more chunks share the endpoint, it gives the spare ones back.
        """
        import collections
        import contextlib

        from cdr_webhook import ledger
        from cdr_webhook.signing import webhook_id

        waiting = collections.deque(claims)
        running: dict[concurrent.futures.Future[AttemptResult], Claim] = {}
        attempts: list[Attempt] = []
        recorded = 0
        last_write = last_grow = last_alive = time.monotonic()
        share = len(held.slots)
        with contextlib.ExitStack() as stack:
            session: Callable[[], Session | None]
            try:
                session = stack.enter_context(self.hook.sessions())
            except ValueError:  # a malformed TLS extra: each POST reports the refusal itself
                session = lambda: None  # noqa: E731
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=wanted, thread_name_prefix="cdr-webhook")
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)

            msg_ids = {claim.cdr_id: webhook_id(claim.cdr_id, endpoint.conn_id) for claim in claims}

            def send(claim: Claim) -> AttemptResult:
                return signed_post(
                    self.hook, endpoint, bodies[claim.cdr_id], msg_ids[claim.cdr_id], session()
                )

            # At the end, and when the try is cut short (its execution_timeout): what was sent is recorded.
            stack.callback(lambda: record(conn, attempts[recorded:], settings))
            while waiting or running:
                while waiting and len(running) < len(held.slots):
                    claim = waiting.popleft()
                    running[pool.submit(send, claim)] = claim
                finished, _ = concurrent.futures.wait(
                    running, timeout=GROW_SECONDS, return_when="FIRST_COMPLETED"
                )
                for future in finished:
                    claim = running.pop(future)
                    result = future.result()
                    attempt = Attempt(claim, result, decide(result, ti), msg_ids[claim.cdr_id])
                    log_attempt(self.log, attempt)
                    attempts.append(attempt)
                now = time.monotonic()
                # A delivery that failed for good may pause the endpoint: it is recorded at once.
                ended_badly = any(
                    a.decision.final and a.decision.status == "failed" for a in attempts[recorded:]
                )
                if (
                    ended_badly
                    or len(attempts) - recorded >= RECORD_EVERY
                    or now - last_write >= RECORD_SECONDS
                ):
                    paused = record(conn, attempts[recorded:], settings)
                    recorded, last_write = len(attempts), now
                    if now - last_alive >= settings.claim_timeout_seconds / 8:
                        # A claim is refreshed once a quarter of the timeout old: asking more often
                        # only rereads the run's claims.
                        ledger.keep_claims_alive(
                            conn,
                            dag_id=ti.dag_id,
                            run_id=ti.run_id,
                            claim_timeout_seconds=settings.claim_timeout_seconds,
                        )
                        last_alive = now
                    if paused and waiting:
                        ledger.release_many(conn, list(waiting))
                        self.log.warning(
                            "Endpoint %s was paused: the %d CDR(s) of this chunk not sent yet stay "
                            "queued and go out, in order, once it is resumed",
                            endpoint.conn_id,
                            len(waiting),
                        )
                        waiting.clear()
                if now - last_grow >= GROW_SECONDS:
                    share = min(wanted, held.fair_share())
                    if waiting and len(held.slots) < share:
                        held.take_more(share)
                    last_grow = now
                # Slots no POST uses go back: beyond what is left to send, or beyond this chunk's
                # share now that more chunks of the endpoint send (never one a POST is using).
                while len(held.slots) > max(min(share, len(running) + len(waiting)), 1) and len(
                    held.slots
                ) > len(running):
                    held.give_back(held.slots[-1])
        return attempts

    def _report(
        self,
        ti: Any,
        attempts: list[Attempt],
        skipped: list[tuple[Claim, str]],
        not_started: dict[str, NotStarted],
    ) -> None:
        """Log the chunk's summary and end the task by its worst outcome: retry, fail, or succeed."""
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from cdr_webhook.deliver.operator import RetryLater

        retry = [a for a in attempts if a.decision.verdict is Verdict.RETRY]
        failed = [
            a.claim.cdr_id for a in attempts if a.decision.verdict in (Verdict.FAIL_NOW, Verdict.EXHAUSTED)
        ]
        failed += [claim.cdr_id for claim, _ in skipped]
        # Failed for good on an earlier try of this task: the task's state keeps saying so.
        failed += [
            cdr_id for cdr_id, found in not_started.items() if found.this_run and found.status != "delivered"
        ]
        delivered = sum(1 for a in attempts if a.decision.verdict is Verdict.SUCCEED)
        elsewhere = sum(1 for found in not_started.values() if not found.this_run)
        self.log.info(
            "Chunk of %d CDR(s) to %s, try %d: %d delivered, %d to retry, %d failed for good, "
            "%d delivered by an earlier try, %d not this run's",
            len(self.cdr_ids),
            self.http_conn_id,
            ti.try_number,
            delivered,
            len(retry),
            len(failed),
            sum(1 for found in not_started.values() if found.this_run and found.status == "delivered"),
            elsewhere,
        )
        if retry:
            # The longest wait any receiver asked for: a shorter one would break that CDR's request.
            asked = [a.result.retry_after for a in retry if a.result.retry_after is not None]
            raise RetryLater(
                f"{len(retry)} CDR(s) of this chunk to retry ({_shown([a.claim.cdr_id for a in retry])})"
                + (f"; {len(failed)} failed for good ({_shown(failed)})" if failed else "")
                + "; Airflow will retry, sending only those still queued",
                retry_after=max(asked) if asked else None,
            )
        if failed:
            raise AirflowFailException(
                f"{len(failed)} CDR(s) of this chunk failed for good: {_shown(failed)}; its other CDRs "
                "went out regardless (the log has each outcome). Clearing this task sends its undelivered "
                "CDRs again"
            )
        if not attempts and elsewhere == len(self.cdr_ids):
            raise AirflowSkipException("every CDR of this chunk belongs to another run: nothing sent")


def _shown(cdr_ids: list[str], limit: int = 10) -> str:
    """The first ``limit`` CDR ids, and how many more."""
    shown = ", ".join(cdr_ids[:limit])
    return shown + (f" and {len(cdr_ids) - limit} more" if len(cdr_ids) > limit else "")
