"""A chunk's outcomes recorded as soon as they are decided, by a thread on a connection of its own.

A try killed after a POST's 2xx and before its record sends that CDR again on its next try (the
receiver deduplicates by ``webhook-id``); the shorter that moment, the fewer such duplicates. The
sending loop hands each decided attempt to :class:`Recorder` and goes on dispatching; the recorder
writes whatever has accumulated in one :meth:`~cdr_webhook.deliver.engine.DeliveryEngine.record`:
within milliseconds when outcomes are few, in batches when they come faster than a write.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

    from cdr_webhook.deliver.engine import DeliveryEngine
    from cdr_webhook.outcome import Attempt

#: The least time between two writes of one task's outcomes, in seconds: at a high rate of outcomes
#: it bounds the statements a task sends the CDR database (a batch per this interval at most); an
#: outcome decided after a quiet spell is written at once.
RECORD_GAP_SECONDS = 0.05


class Recorder:
    """
    Record a task's decided attempts in the ledger as they come, in a thread, on ``conn`` (its own).

    The sending thread :meth:`put`\\ s each attempt, reads the endpoints the records paused
    (:meth:`paused`) and the recorder's error (:meth:`check`: the try fails as if it had written
    them itself), and can :meth:`wait` for everything put so far to be written (a delivery that
    failed for good may pause its endpoint: the lane must know before it sends more). :meth:`close`
    writes what is left and raises a write's error not raised yet. Once a write fails the recorder
    writes no more: the CDRs not recorded stay queued for the next try.
    """

    def __init__(self, engine: DeliveryEngine, conn: psycopg.Connection[Any]) -> None:
        self.engine = engine
        self.conn = conn
        self._lock = threading.Condition()
        self._pending: list[Attempt] = []
        self._put = 0  # attempts handed over
        self._done = 0  # ...and written, or given up on after a failed write
        self._paused: set[str] = set()
        self._error: BaseException | None = None
        self._raised = False
        self._urgent = False
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="cdr-webhook-recorder", daemon=True)
        self._thread.start()

    def put(self, attempt: Attempt) -> None:
        """Hand over a decided attempt: it is written within moments."""
        with self._lock:
            self._pending.append(attempt)
            self._put += 1
            self._lock.notify_all()

    def wait(self) -> None:
        """Wait until every attempt handed over is written (or a write failed), without the gap."""
        with self._lock:
            self._urgent = True
            self._lock.notify_all()
            wanted = self._put
            self._lock.wait_for(lambda: self._done >= wanted or self._error is not None)

    def paused(self) -> set[str]:
        """The endpoints the records paused since the last call."""
        with self._lock:
            paused, self._paused = self._paused, set()
        return paused

    def check(self) -> None:
        """Raise, once, the error of a write that failed (the CDR database is down, say)."""
        with self._lock:
            if self._error is None or self._raised:
                return
            self._raised = True
            error = self._error
        raise error

    def close(self) -> None:
        """Write what is left, stop the thread and close its connection; raise a write's error."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join()
        self.conn.close()
        self.check()

    def _run(self) -> None:
        last_write = 0.0
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._pending or self._closing)
                if not self._pending:
                    return
                gap = last_write + RECORD_GAP_SECONDS - time.monotonic()
                if gap > 0:
                    self._lock.wait_for(lambda: self._closing or self._urgent, timeout=gap)
                batch, self._pending, self._urgent = self._pending, [], False
            last_write = time.monotonic()
            try:
                paused = self.engine.record(batch, conn=self.conn)
            except BaseException as err:  # handed to the sending thread, raised there
                with self._lock:
                    self._error = err
                    self._done = self._put
                    self._pending = []
                    self._lock.notify_all()
                return
            with self._lock:
                self._done += len(batch)
                self._paused |= paused
                self._lock.notify_all()
