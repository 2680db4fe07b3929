"""A task of many CDRs: one ``post_cdr`` try sends the CDRs of one or many endpoints, each its own POST.

Each endpoint is a *lane*: its own in-flight slots (shared with its other tasks sending at once),
its own kept-alive sessions, its own failures. The lanes share one pool of sending threads, taken
in turn, so a slow or failing endpoint holds only its own slots' threads and never stalls the
others in the task. Each CDR keeps its own ledger row, attempts, ``webhook-id``, deadline and
outcome rules (the steps of :class:`~cdr_webhook.deliver.engine.DeliveryEngine`); what only a task of
many CDRs needs is here: the lanes, outcomes recorded as they are decided (by a
:class:`~cdr_webhook.deliver.recorder.Recorder`), claims kept alive, a lane that stops when its
endpoint fails every POST, and the task's ending by the worst outcome among its CDRs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowRescheduleException, AirflowSkipException

from cdr_webhook import ledger
from cdr_webhook.deliver.errors import task_exception
from cdr_webhook.deliver.rate import hand_back, pacer_for, wait_until
from cdr_webhook.deliver.recorder import Recorder
from cdr_webhook.deliver.slots import fair_shares, open_slots
from cdr_webhook.outcome import DeliveryStatus, Verdict

if TYPE_CHECKING:
    from collections.abc import Sequence

    from cdr_webhook.deliver.engine import DeliveryEngine
    from cdr_webhook.deliver.lane import Lane
    from cdr_webhook.ledger import Claim
    from cdr_webhook.outcome import Attempt, PostResult

#: How often a lane holding fewer slots than it could use asks for those that came free.
GROW_SECONDS = 0.1
#: The most POSTs one task has in flight at once, over all its lanes.
MAX_THREADS = 32


def send_lanes(
    engine: DeliveryEngine, lanes: list[Lane], bodies: dict[str, bytes]
) -> tuple[list[Attempt], list[Lane]]:
    """POST every lane's CDRs; return the attempts, and the lanes that could not send all of theirs."""
    total = sum(len(lane.waiting) for lane in lanes)
    engine.log.info(
        "Sending %d CDR(s) to %d endpoint(s) (try %d): %s",
        total,
        len(lanes),
        engine.ti.try_number,
        ", ".join(f"{lane.conn_id} {len(lane.waiting)} (up to {lane.limit} at once)" for lane in lanes[:20])
        + (f" and {len(lanes) - 20} more" if len(lanes) > 20 else ""),
    )
    with LaneSender(engine, lanes, bodies) as sender:
        return sender.run()


class LaneSender:
    """
    Send the lanes' CDRs as many at once as their slots allow, on one pool of threads, each thread
    with a kept-alive session per endpoint; decide, log and record the outcomes as they come.

    The pool's threads send. A thread whose POST was delivered takes its lane's next CDR itself,
    so a slot does not wait for the calling thread's turn between two POSTs, as long as its lane
    stays within its share, has no rate limit, and no other lane waits for a thread. The calling
    thread decides what the outcomes mean, holds the slots and keeps the claims alive on the task's
    connection; the recorder writes the outcomes on a connection of its own, so a POST's 2xx is in
    the ledger within moments and the sending never waits for it, except after a delivery failed
    for good (its endpoint may be paused: the lane learns it before it sends more; a thread goes on
    only after a delivery). A lane that gets no slot for ``slot_wait_seconds`` (its endpoint's other
    tasks hold them all) stops, its CDRs kept.
    """

    def __init__(self, engine: DeliveryEngine, lanes: list[Lane], bodies: dict[str, bytes]) -> None:
        self.engine = engine
        self.lanes = lanes
        self.bodies = bodies
        #: Each POST's outcome as a sending thread hands it over: (lane, claim, its attempt, or None
        #: when its send time passed, or the error the thread raised; whether the thread ended).
        self.results: queue.SimpleQueue[tuple[Lane, Claim, Attempt | BaseException | None, bool]] = (
            queue.SimpleQueue()
        )
        self.sending = 0  # threads sending (each holds one of its lane's slots)
        #: Guards the lanes' ``waiting`` and ``running``, and ``sending``: the sending threads take
        #: their lane's next CDR themselves.
        self.lock = threading.Lock()
        self.closing = False  # the try ends: no thread takes another CDR
        self.attempts: list[Attempt] = []
        self.recorder: Recorder | None = None
        self.last_grow = self.last_alive = time.monotonic()
        self.slot_deadline = self.last_grow + engine.settings.slot_wait_seconds
        self.turn = 0
        self.threads = min(sum(lane.wanted for lane in lanes), MAX_THREADS)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> LaneSender:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _start(self) -> None:
        conn = self.engine.conn
        if self.engine.connect is None:
            raise TypeError("a task of many CDRs records on a connection of its own: give the engine connect")
        self.recorder = Recorder(self.engine, self.engine.connect())
        # Last out: at the end, and when the try is cut short (its execution_timeout), what was
        # decided is recorded.
        self._stack.callback(self.recorder.close)
        for lane in self.lanes:
            try:
                lane.sessions = self._stack.enter_context(lane.hook.session_pool())
            except ValueError:  # a malformed TLS extra: each POST reports the refusal itself
                pass
            # A few slots each at first when many lanes share the threads: more as they come free.
            first = max(min(lane.wanted, self.threads // len(self.lanes)), 1)
            lane.held = open_slots(conn, lane.conn_id, limit=lane.limit, wanted=first, share=True)
            lane.share = len(lane.held.slots)
            self._stack.callback(lane.held.close)
            lane.pacer = pacer_for(self.engine, lane.endpoint)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(self.threads, 1), thread_name_prefix="cdr-webhook"
        )
        self._stack.callback(self._pool.shutdown, wait=True, cancel_futures=True)
        self._stack.callback(self._close)  # first out: the threads take no more CDRs

    def _close(self) -> None:
        with self.lock:
            self.closing = True

    def __exit__(self, *exc_info: Any) -> None:
        self._stack.__exit__(*exc_info)

    def run(self) -> tuple[list[Attempt], list[Lane]]:
        """POST every lane's claims; return the attempts (oldest outcome first) and the stopped lanes."""
        while any(lane.busy for lane in self.lanes):
            self.dispatch()
            self.collect()
            now = time.monotonic()
            self.follow_records(now)
            self.grow(now)
            self.stop_starved(now)
            with self.lock:
                for lane in self.lanes:
                    lane.shrink()
        return self.attempts, [lane for lane in self.lanes if lane.stopped]

    def dispatch(self) -> None:
        """Start waiting CDRs on free slots, a lane at a time in turn, up to the pool's threads."""
        out_of_time: list[Lane] = []
        with self.lock:
            while self.sending < self.threads:
                ready = [lane for lane in self.lanes if self._ready(lane) and lane not in out_of_time]
                if not ready:
                    break
                for lane in ready[self.turn % len(ready) :] + ready[: self.turn % len(ready)]:
                    if self.sending >= self.threads:
                        break
                    if (at := lane.pacer.next_time(len(lane.waiting)) if lane.pacer else 0.0) is None:
                        out_of_time.append(lane)
                        continue
                    claim = lane.waiting.popleft()
                    lane.running += 1
                    self.sending += 1
                    self._pool.submit(self._send, lane, claim, at)
                self.turn += 1
        for lane in out_of_time:  # no send time fits in this try (a paced lane: no thread takes its CDRs)
            hand_back(self.engine, lane)

    @staticmethod
    def _ready(lane: Lane) -> bool:
        return bool(lane.waiting) and not lane.stopped and lane.free_slots() > 0

    def _send(self, lane: Lane, claim: Claim, at: float) -> None:
        """
        In a sending thread: POST the claim, hand its attempt over, and go on with the lane's next
        CDR while :meth:`_goes_on` says so; the thread's slot is the lane's until then.
        """
        while True:
            try:
                result = self._post(lane, claim, at)
                attempt = (
                    None
                    if result is None
                    else self.engine.attempt_of(claim, result, lane.msg_ids[claim.cdr_id])
                )
            except BaseException as err:  # raised by the calling thread: the try fails as before
                self.results.put((lane, claim, err, True))
                return
            with self.lock:
                following = lane.waiting.popleft() if self._goes_on(lane, attempt) else None
            self.results.put((lane, claim, attempt, following is None))
            if following is None:
                return
            claim, at = following, 0.0

    def _goes_on(self, lane: Lane, attempt: Attempt | None) -> bool:
        """
        Whether a thread that sent ``attempt`` takes its lane's next CDR itself (under the lock): only
        after a delivery (any other outcome is for the calling thread to weigh first), not on a
        paced lane, not beyond the lane's share of slots (it gives them back), and not while
        another lane waits for a thread.
        """
        if (
            self.closing
            or attempt is None
            or attempt.decision.verdict is not Verdict.DELIVERED
            or lane.pacer is not None
            or lane.stopped
            or not lane.waiting
            or lane.held is None
            or lane.running > min(len(lane.held.slots), max(lane.share, 1))
        ):
            return False
        return self.sending < self.threads or not any(
            other is not lane and self._ready(other) for other in self.lanes
        )

    def _post(self, lane: Lane, claim: Claim, at: float) -> PostResult | None:
        """POST a claim at its send time ``at`` (0: now); None: that time passed before the thread had it."""
        if at and not wait_until(at):
            return None
        body, msg_id = self.bodies[claim.cdr_id], lane.msg_ids[claim.cdr_id]
        if lane.sessions is None:
            return self.engine.post(lane.endpoint, body, msg_id)
        session = lane.sessions.take()
        try:
            return self.engine.post(lane.endpoint, body, msg_id, session)
        finally:
            lane.sessions.give(session)

    def collect(self) -> None:
        """Wait a moment for POSTs to finish; record and report each one that did, and weigh it."""
        if not self.sending:
            time.sleep(GROW_SECONDS)  # every lane waits for a slot
            return
        try:
            finished = [self.results.get(timeout=GROW_SECONDS)]
        except queue.Empty:
            return
        with contextlib.suppress(queue.Empty):
            while True:
                finished.append(self.results.get_nowait())
        assert self.recorder is not None
        failed = False
        for lane, claim, attempt, ended in finished:
            with self.lock:
                if ended:
                    lane.running -= 1
                    self.sending -= 1
                if attempt is None:  # its send time passed: it takes the next one
                    lane.waiting.appendleft(claim)
            if isinstance(attempt, BaseException):
                raise attempt
            if attempt is None:
                continue
            if lane.pacer is not None:
                lane.pacer.heard(attempt)
            self.recorder.put(attempt)
            self.engine.report(attempt)
            self.attempts.append(attempt)
            failed = failed or attempt.decision.status is DeliveryStatus.FAILED
            lane.counted(attempt)
            with self.lock:  # a stopped lane's thread goes on no more: what waits is the retry's
                left = len(lane.waiting) if lane.stopped else 0
                if left:
                    lane.waiting.clear()
            if left:
                self.engine.log.warning(
                    "Endpoint %s: %s; its %d other CDR(s) of this chunk are not sent in this try and "
                    "wait for its retry",
                    lane.conn_id,
                    lane.stopped,
                    left,
                )
        if failed:  # a delivery that failed for good may pause its endpoint: recorded before more go
            self.recorder.wait()

    def follow_records(self, now: float) -> None:
        """
        Raise the recorder's error (the try fails as if it had failed to write itself), keep the
        run's claims alive and stop the lanes of the endpoints the records paused.
        """
        assert self.recorder is not None
        self.recorder.check()
        paused = self.recorder.paused()
        self.keep_claims_alive(now)
        for lane in self.lanes:
            if lane.conn_id in paused:
                self.release_waiting(lane)

    def keep_claims_alive(self, now: float) -> None:
        """Refresh the run's queued claims, so that none goes stale while this task still sends."""
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

    def release_waiting(self, lane: Lane) -> None:
        """Give a lane's CDRs not sent yet back to the queue: its endpoint was paused."""
        with self.lock:  # taken from the lane at once: no sending thread takes one of them after
            waiting = list(lane.waiting)
            lane.waiting.clear()
        if not waiting:
            return
        ledger.release_many(self.engine.conn, waiting)
        self.engine.log.warning(
            "Endpoint %s was paused: the %d CDR(s) of this chunk not sent yet stay queued and go out, in "
            "order, once it is resumed",
            lane.conn_id,
            len(waiting),
        )

    def grow(self, now: float) -> None:
        """
        Every so often, let each lane take the slots that came free, up to its fair share, and no
        more in all than the task has threads to use them.
        """
        if now - self.last_grow < GROW_SECONDS:
            return
        # One look at the locks for every lane whose share matters (not one query per lane).
        sharing = [lane for lane in self.lanes if lane.sharing()]
        helds = [lane.held for lane in sharing if lane.held is not None]
        spare = self.threads - sum(len(lane.held.slots) for lane in self.lanes if lane.held is not None)
        for lane, share in zip(sharing, fair_shares(self.engine.conn, helds) if helds else [], strict=True):
            spare -= lane.grow(share, spare)
        self.last_grow = now

    def stop_starved(self, now: float) -> None:
        """Stop the lanes that have waited ``slot_wait_seconds`` for a first slot: their CDRs wait."""
        if now < self.slot_deadline:
            return
        for lane in self.lanes:
            if lane.waiting and not lane.stopped and lane.held is not None and not lane.held.slots:
                lane.stopped = (
                    f"all {lane.limit} in-flight slots of endpoint {lane.conn_id!r} stayed busy for "
                    f"{self.engine.settings.slot_wait_seconds} s"
                )
                self.engine.log.info(
                    "%s; its %d CDR(s) wait for a later try", lane.stopped, len(lane.waiting)
                )
                lane.waiting.clear()


def end_lanes(
    engine: DeliveryEngine, cdr_ids: Sequence[str], attempts: list[Attempt], stopped: list[Lane]
) -> None:
    """
    Log the task's summary and end it by its worst outcome: some CDRs to retry (or not sent because
    their endpoint was down or busy), it retries, sending only those; some failed for good, it
    fails, naming them; else it succeeds. A CDR whose row cannot become a body (or that its
    endpoint's filters leave out) is skipped, as the select step skips one: recorded with its reason
    and logged, not a failure of the chunk.
    """
    retry = [a for a in attempts if a.decision.verdict is Verdict.RETRY]
    failed = [a.claim.cdr_id for a in attempts if a.decision.status is DeliveryStatus.FAILED]
    earlier = {cdr_id: found for cdr_id, found in engine.not_started.items() if found.this_run}
    # Failed for good on an earlier try of this task: the task's state keeps saying so.
    failed += [cdr_id for cdr_id, found in earlier.items() if found.status != DeliveryStatus.DELIVERED]
    elsewhere = len(engine.not_started) - len(earlier)
    engine.log.info(
        "Chunk of %d CDR(s) to %s, try %d: %d delivered, %d to retry, %d failed for good, %d skipped, "
        "%d delivered by an earlier try, %d not this run's%s",
        len(cdr_ids),
        engine.endpoint_ids[0] if len(engine.endpoint_ids) == 1 else f"{len(engine.endpoint_ids)} endpoints",
        engine.ti.try_number,
        sum(1 for a in attempts if a.decision.verdict is Verdict.DELIVERED),
        len(retry),
        len(failed),
        len(engine.skipped),
        sum(1 for found in earlier.values() if found.status == DeliveryStatus.DELIVERED),
        elsewhere,
        "".join(
            f", {n} endpoint(s) {what}"
            for what, n in (
                ("held", len(engine.held)),
                ("paused", len(engine.paused)),
                ("stopped", len(stopped)),
            )
            if n
        ),
    )
    busy_only = [lane for lane in stopped if lane.held is not None and not lane.held.slots]
    if not attempts and busy_only and len(busy_only) == len(stopped):
        # Nothing was sent: the busy slots are the endpoints' congestion, not the CDRs' failure. The
        # try gives its worker back and starts again later, without using one of its retries.
        wake = engine.later()
        engine.log.info("Every endpoint's slots stayed busy; trying again at %s, without using a retry", wake)
        raise AirflowRescheduleException(reschedule_date=wake)
    if retry or stopped:
        # The longest wait any receiver asked for: a shorter one would break that CDR's request.
        asked = [a.result.retry_after for a in retry if a.result.retry_after is not None]
        raise task_exception(
            Verdict.RETRY,
            (
                f"{len(retry)} CDR(s) of this chunk to retry ({_shown([a.claim.cdr_id for a in retry])})"
                if retry
                else ""
            )
            + ("; " if retry and stopped else "")
            + (
                f"endpoint(s) not sent to in this try: {_shown([lane.conn_id for lane in stopped])}"
                if stopped
                else ""
            )
            + (f"; {len(failed)} failed for good ({_shown(failed)})" if failed else "")
            + "; Airflow will retry, sending only those still queued",
            retry_after=max(asked) if asked else None,
        )
    if failed or engine.held:
        raise task_exception(
            Verdict.FAIL_NOW,
            (f"{len(failed)} CDR(s) of this chunk failed for good: {_shown(failed)}; " if failed else "")
            + (f"endpoint(s) held, their CDRs queued: {'; '.join(engine.held)}; " if engine.held else "")
            + "its other CDRs went out regardless (the log has each outcome). Clearing this chunk sends "
            "its undelivered CDRs again",
        )
    if not attempts and elsewhere == len(cdr_ids):
        raise AirflowSkipException("every CDR of this chunk belongs to another run: nothing sent")


def _shown(items: list[str], limit: int = 10) -> str:
    """The first ``limit`` ids, and how many more."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
