"""Chunk mode: one ``post_cdr`` try sends up to ``cdrs_per_task`` CDRs of one endpoint, each its own POST.

Each CDR keeps its own ledger row, attempts, ``webhook-id``, deadline and outcome rules (the steps of
:class:`~cdr_webhook.deliver.engine.DeliveryEngine`); what only a chunk needs is here: a pool of
sending threads over kept-alive connections, batched records, claims kept alive, its share of the
endpoint's slots, and its ending by the worst outcome among its CDRs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import time
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowSkipException

from cdr_webhook import ledger
from cdr_webhook.deliver.engine import task_exception
from cdr_webhook.outcome import DeliveryStatus, Verdict
from cdr_webhook.signing import webhook_id

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from requests import Session

    from cdr_webhook.config import EndpointConfig
    from cdr_webhook.deliver.engine import DeliveryEngine
    from cdr_webhook.deliver.slots import HeldSlots
    from cdr_webhook.ledger import Claim
    from cdr_webhook.outcome import Attempt, PostResult

#: Outcomes recorded at once: a worker lost mid-chunk re-sends at most these (at-least-once).
RECORD_EVERY = 50
#: ...or this often, in seconds, whichever comes first.
RECORD_SECONDS = 2.0
#: How often a chunk holding fewer slots than it could use asks for those that came free.
GROW_SECONDS = 0.1


def send_chunk(
    engine: DeliveryEngine, endpoint: EndpointConfig, claims: list[Claim], bodies: dict[str, bytes]
) -> list[Attempt]:
    """POST the chunk's claims, up to the endpoint's in-flight limit at once (fewer for fewer CDRs)."""
    limit = engine.in_flight_limit(endpoint)
    wanted = min(limit, len(claims))
    engine.log.info(
        "Sending %d CDR(s) to endpoint %s, up to %d at once (try %d)",
        len(claims),
        endpoint.conn_id,
        limit,
        engine.ti.try_number,
    )
    with engine.slots(endpoint, wanted=wanted) as held, ChunkSender(engine, endpoint, held, wanted) as sender:
        return sender.run(claims, bodies)


class ChunkSender:
    """
    Send a chunk's CDRs as many at once as slots are held, each sending thread with its kept-alive
    session; decide, log and record the outcomes as they come, a batch at a time.

    Only the calling thread touches the database: the pool's threads only send. While CDRs wait, the
    chunk takes the endpoint's slots that come free (another task finished) up to its fair share
    (the limit divided among the endpoint's chunks sending at once); once fewer CDRs are left than
    slots held, or more chunks share the endpoint, it gives the spare ones back.
    """

    def __init__(
        self, engine: DeliveryEngine, endpoint: EndpointConfig, held: HeldSlots, wanted: int
    ) -> None:
        self.engine = engine
        self.endpoint = endpoint
        self.held = held
        self.wanted = wanted  # the most slots it may use: the endpoint's limit, or fewer when fewer CDRs
        self.share = len(held.slots)
        self.waiting: collections.deque[Claim] = collections.deque()
        self.running: dict[concurrent.futures.Future[PostResult], Claim] = {}
        self.attempts: list[Attempt] = []
        self.recorded = 0  # how many of them are in the ledger
        self.last_write = self.last_grow = self.last_alive = time.monotonic()
        self._bodies: dict[str, bytes] = {}
        self._msg_ids: dict[str, str] = {}
        self._session: Callable[[], Session | None] = lambda: None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> ChunkSender:
        try:
            self._session = self._stack.enter_context(self.engine.hook.sessions())
        except ValueError:  # a malformed TLS extra: each POST reports the refusal itself
            pass
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.wanted, thread_name_prefix="cdr-webhook"
        )
        self._stack.callback(self._pool.shutdown, wait=True, cancel_futures=True)
        # At the end, and when the try is cut short (its execution_timeout): what was sent is recorded.
        self._stack.callback(self.record_new)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stack.__exit__(*exc_info)

    def run(self, claims: Sequence[Claim], bodies: dict[str, bytes]) -> list[Attempt]:
        """POST every claim; return the attempts, oldest outcome first."""
        self._bodies = bodies
        self._msg_ids = {claim.cdr_id: webhook_id(claim.cdr_id, self.endpoint.conn_id) for claim in claims}
        self.waiting.extend(claims)
        while self.waiting or self.running:
            self.dispatch()
            self.collect()
            now = time.monotonic()
            if self.record_due(now):
                self.flush(now)
            self.grow(now)
            self.shrink()
        return self.attempts

    def dispatch(self) -> None:
        """Start a waiting CDR's POST on every held slot no POST uses."""
        while self.waiting and len(self.running) < len(self.held.slots):
            claim = self.waiting.popleft()
            self.running[self._pool.submit(self._post, claim)] = claim

    def _post(self, claim: Claim) -> PostResult:
        return self.engine.post(
            self.endpoint, self._bodies[claim.cdr_id], self._msg_ids[claim.cdr_id], self._session()
        )

    def collect(self) -> None:
        """Wait a moment for POSTs to finish; decide and report each one that did."""
        finished, _ = concurrent.futures.wait(
            self.running, timeout=GROW_SECONDS, return_when=concurrent.futures.FIRST_COMPLETED
        )
        for future in finished:
            claim = self.running.pop(future)
            attempt = self.engine.decide(claim, future.result(), self._msg_ids[claim.cdr_id])
            self.engine.report(attempt)
            self.attempts.append(attempt)

    def record_due(self, now: float) -> bool:
        """Whether the outcomes not recorded yet are to be recorded now."""
        new = self.attempts[self.recorded :]
        # A delivery that failed for good may pause the endpoint: it is recorded at once.
        ended_badly = any(attempt.decision.status is DeliveryStatus.FAILED for attempt in new)
        return ended_badly or len(new) >= RECORD_EVERY or now - self.last_write >= RECORD_SECONDS

    def record_new(self) -> bool:
        """Record the outcomes not recorded yet; return whether they paused the endpoint."""
        paused = self.engine.record(self.attempts[self.recorded :])
        self.recorded = len(self.attempts)
        return paused

    def flush(self, now: float) -> None:
        """Record the new outcomes, keep the run's claims alive and, if the endpoint got paused, stop."""
        paused = self.record_new()
        self.last_write = now
        self.keep_claims_alive(now)
        if paused:
            self.release_waiting()

    def keep_claims_alive(self, now: float) -> None:
        """Refresh the run's queued claims, so that none goes stale while this chunk still sends."""
        timeout = self.engine.settings.claim_timeout_seconds
        # A claim is refreshed once a quarter of the timeout old: asking more often only rereads the
        # run's claims.
        if now - self.last_alive < timeout / 8:
            return
        ti = self.engine.ti
        ledger.keep_claims_alive(
            self.engine.conn, dag_id=ti.dag_id, run_id=ti.run_id, claim_timeout_seconds=timeout
        )
        self.last_alive = now

    def release_waiting(self) -> None:
        """Give the CDRs not sent yet back to the queue: the endpoint was paused."""
        if not self.waiting:
            return
        ledger.release_many(self.engine.conn, list(self.waiting))
        self.engine.log.warning(
            "Endpoint %s was paused: the %d CDR(s) of this chunk not sent yet stay queued and go out, in "
            "order, once it is resumed",
            self.endpoint.conn_id,
            len(self.waiting),
        )
        self.waiting.clear()

    def grow(self, now: float) -> None:
        """Every so often, learn the chunk's fair share and take the free slots up to it while CDRs wait."""
        if now - self.last_grow < GROW_SECONDS:
            return
        self.share = min(self.wanted, self.held.fair_share())
        if self.waiting and len(self.held.slots) < self.share:
            self.held.take_more(self.share)
        self.last_grow = now

    def shrink(self) -> None:
        """
        Give back the slots no POST will use: beyond what is left to send, or beyond this chunk's
        share now that more chunks of the endpoint send (never one a POST is using, never the last).
        """
        keep = max(min(self.share, len(self.running) + len(self.waiting)), 1)
        while len(self.held.slots) > max(keep, len(self.running)):
            self.held.give_back(self.held.slots[-1])


def end_chunk(engine: DeliveryEngine, cdr_ids: Sequence[str], attempts: list[Attempt]) -> None:
    """
    Log the chunk's summary and end the task by its worst outcome: some CDRs to retry, it retries
    (sending only those); some failed for good, it fails, naming them; else it succeeds.
    """
    retry = [a for a in attempts if a.decision.verdict is Verdict.RETRY]
    failed = [a.claim.cdr_id for a in attempts if a.decision.status is DeliveryStatus.FAILED]
    failed += [claim.cdr_id for claim, _ in engine.skipped]
    earlier = {cdr_id: found for cdr_id, found in engine.not_started.items() if found.this_run}
    # Failed for good on an earlier try of this task: the task's state keeps saying so.
    failed += [cdr_id for cdr_id, found in earlier.items() if found.status != DeliveryStatus.DELIVERED]
    elsewhere = len(engine.not_started) - len(earlier)
    engine.log.info(
        "Chunk of %d CDR(s) to %s, try %d: %d delivered, %d to retry, %d failed for good, "
        "%d delivered by an earlier try, %d not this run's",
        len(cdr_ids),
        engine.endpoint_id,
        engine.ti.try_number,
        sum(1 for a in attempts if a.decision.verdict is Verdict.DELIVERED),
        len(retry),
        len(failed),
        sum(1 for found in earlier.values() if found.status == DeliveryStatus.DELIVERED),
        elsewhere,
    )
    if retry:
        # The longest wait any receiver asked for: a shorter one would break that CDR's request.
        asked = [a.result.retry_after for a in retry if a.result.retry_after is not None]
        raise task_exception(
            Verdict.RETRY,
            f"{len(retry)} CDR(s) of this chunk to retry ({_shown([a.claim.cdr_id for a in retry])})"
            + (f"; {len(failed)} failed for good ({_shown(failed)})" if failed else "")
            + "; Airflow will retry, sending only those still queued",
            retry_after=max(asked) if asked else None,
        )
    if failed:
        raise task_exception(
            Verdict.FAIL_NOW,
            f"{len(failed)} CDR(s) of this chunk failed for good: {_shown(failed)}; its other CDRs went out "
            "regardless (the log has each outcome). Clearing this task sends its undelivered CDRs again",
        )
    if not attempts and elsewhere == len(cdr_ids):
        raise AirflowSkipException("every CDR of this chunk belongs to another run: nothing sent")


def _shown(cdr_ids: list[str], limit: int = 10) -> str:
    """The first ``limit`` CDR ids, and how many more."""
    shown = ", ".join(cdr_ids[:limit])
    return shown + (f" and {len(cdr_ids) - limit} more" if len(cdr_ids) > limit else "")
