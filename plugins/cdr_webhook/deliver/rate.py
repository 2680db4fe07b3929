"""An endpoint's rate limit in a ``post_cdr`` try: wait for a shared send time before each POST.

The send times come from :mod:`cdr_webhook.ledger.rates` (one row per endpoint in the CDR database,
the same database the claims and in-flight slots live in), so every worker, task and run of an
endpoint draws from one pace. Only the task's calling thread reserves (it alone uses the database);
a sending thread sleeps until its POST's time. Waiting for the rate is not a failure: it uses no
retry, and what cannot be sent before the try's time is up goes back to the queue, unsent.
"""

from __future__ import annotations

import collections
import math
import time
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowRescheduleException

from cdr_webhook import ledger, pacing
from cdr_webhook.ledger import rates
from cdr_webhook.settings import DATABASE_ALLOWANCE_SECONDS

if TYPE_CHECKING:
    import datetime as dt

    import psycopg

    from cdr_webhook.deliver.engine import DeliveryEngine
    from cdr_webhook.deliver.lane import Lane
    from cdr_webhook.endpoint_config import EndpointConfig
    from cdr_webhook.outcome import Attempt
    from cdr_webhook.settings import Settings

#: With no ``execution_timeout``, a try reserves send times at most this far ahead.
MAX_AHEAD_SECONDS = 3600.0


def send_deadline(settings: Settings, time_limit: dt.timedelta | None) -> float | None:
    """
    The latest ``time.monotonic()`` at which this try may start a POST: its ``execution_timeout``
    from now, less one POST's deadline and the database allowance (recording what it sent).
    """
    if time_limit is None:
        return None
    left = time_limit.total_seconds() - settings.request_timeout_seconds - DATABASE_ALLOWANCE_SECONDS
    return time.monotonic() + max(left, 0.0)


class DatabaseClock:
    """
    The database's clock read on this process's ``time.monotonic()``, to within half the quickest
    round trip seen.

    Every worker's send times are reserved on the database's clock, one spacing apart. Placing them
    at the moment the reservation's reply came would move each batch later by however long that
    reply took (its commit waiting for the disk, the worker waiting for a core), a different amount
    for each worker, and so bring one worker's batch onto the next one's. A reading taken between
    ``asked`` and ``answered`` puts the database's clock at their middle, off by at most half the
    round trip; the quickest round trip wins, as NTP chooses its samples.
    """

    #: Readings taken before the first reservation: the quickest of them places the clock.
    SAMPLES = 3

    def __init__(self) -> None:
        self.offset = 0.0  # the database's epoch seconds less time.monotonic()
        self.error = math.inf  # half the round trip of the reading behind ``offset``

    def heard(self, read_at: float | None, asked: float, answered: float) -> None:
        """A reading of the database's clock, taken between monotonic ``asked`` and ``answered``."""
        if read_at is None or answered < asked:
            return
        error = (answered - asked) / 2
        if error < self.error:
            self.offset, self.error = read_at - (asked + answered) / 2, error

    def calibrate(self, conn: psycopg.Connection[Any]) -> None:
        for _ in range(self.SAMPLES):
            self.heard(*rates.clock(conn))

    def local(self, at: float) -> float:
        """The database's epoch seconds ``at`` as a ``time.monotonic()`` value."""
        return at - self.offset


class Pacer:
    """
    One endpoint's send times for one try: reserved a batch at a time, each used by one POST.

    :param ends: The latest monotonic time a POST may start (:func:`send_deadline`); None: no end.
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        endpoint: str,
        rate: float,
        *,
        ends: float | None,
        max_hold: float = MAX_AHEAD_SECONDS,
    ) -> None:
        self.conn = conn
        self.endpoint = endpoint
        self.rate = rate
        self.spacing = pacing.spacing(rate)
        self.batch = pacing.batch(rate)
        self.ends = ends
        self.max_hold = max_hold  # the longest Retry-After honoured (max_retry_delay_seconds)
        self.times: collections.deque[float] = collections.deque()  # reserved, monotonic, in order
        self.given_up = 0  # reserved times passed unused (a thread busy, a hold)
        self.clock = DatabaseClock()

    def next_time(self, waiting: int = 1) -> float | None:
        """
        The monotonic time the next POST may start, reserving up to a batch (no more than the
        ``waiting`` CDRs) when none is left; None when no send time fits before :attr:`ends`.
        """
        now = time.monotonic()
        while self.times and self.times[0] < now - pacing.LATE_SECONDS:
            self.times.popleft()
            self.given_up += 1
        if not self.times:
            if math.isinf(self.clock.error):
                self.clock.calibrate(self.conn)
            within = (self.ends - now) if self.ends is not None else MAX_AHEAD_SECONDS
            reserved = rates.reserve(
                self.conn, self.endpoint, wanted=min(max(waiting, 1), self.batch), spacing=self.spacing,
                within=within,
            )  # fmt: skip
            self.clock.heard(reserved.read_at, reserved.asked, reserved.answered)
            if reserved.read_at is not None:
                base = self.clock.local(reserved.read_at)
                self.times.extend(base + offset for offset in reserved.offsets)
        return self.times.popleft() if self.times else None

    def heard(self, attempt: Attempt) -> None:
        """A receiver's ``Retry-After`` holds every task's POSTs to it for that long (capped as a retry's)."""
        asked = attempt.result.retry_after
        if asked is not None and asked > 0:
            rates.hold(self.conn, self.endpoint, min(asked, self.max_hold))
            self.given_up += len(self.times)
            self.times.clear()


def pacer_for(engine: DeliveryEngine, endpoint: EndpointConfig) -> Pacer | None:
    """The endpoint's pacer in this try, or None when it has no rate limit."""
    rate = endpoint.rate_limit(engine.settings.rate_limit_per_second)
    if rate is None:
        return None
    return Pacer(
        engine.conn,
        endpoint.conn_id,
        rate,
        ends=engine.ends,
        max_hold=engine.settings.max_retry_delay_seconds,
    )


def wait_until(at: float) -> bool:
    """Sleep until monotonic ``at``; return whether it is still the time to send (not too late)."""
    delay = at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    return time.monotonic() - at <= pacing.LATE_SECONDS


def hand_back(engine: DeliveryEngine, lane: Lane) -> None:
    """Give a lane's CDRs not sent yet back to the queue: no send time fits in this try's time."""
    assert lane.pacer is not None
    reason = (
        f"waiting for endpoint {lane.conn_id}'s rate limit ({lane.pacer.rate:g}/s): back in the queue "
        "for the next run"
    )
    ledger.release_many(engine.conn, list(lane.waiting), reason=reason)
    engine.log.info(
        "Endpoint %s: no send time under its rate limit of %g/s fits before this try's end; its %d CDR(s) "
        "not sent yet go back to the queue, unsent and without using a retry, for the next run",
        lane.conn_id,
        lane.pacer.rate,
        len(lane.waiting),
    )
    lane.waiting.clear()


def pace_one(engine: DeliveryEngine, endpoint: EndpointConfig) -> Pacer | None:
    """
    A task of one CDR: wait for the endpoint's next send time (None: no limit). When none fits in
    the try's time, the try gives its worker back and starts again later, without using a retry.
    """
    pacer = pacer_for(engine, endpoint)
    if pacer is not None and pacer.ends is None:  # no execution_timeout: as long as it waits for a slot
        pacer.ends = time.monotonic() + engine.settings.slot_wait_seconds
    while pacer is not None:
        at = pacer.next_time()
        if at is None:
            wake = engine.later()
            engine.log.info(
                "Endpoint %s: no send time under its rate limit of %g/s fits in this try; trying again "
                "at %s, without using a retry",
                endpoint.conn_id,
                pacer.rate,
                wake.isoformat(),
            )
            raise AirflowRescheduleException(reschedule_date=wake)
        if wait_until(at):
            break
    return pacer
