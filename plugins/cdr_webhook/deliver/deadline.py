"""One wall-clock deadline per HTTP exchange: a watchdog shuts the exchange's sockets when it passes.

Socket timeouts bound each read, not the exchange: a receiver sending its reply a byte at a time
would hold a POST for minutes. Airflow owns SIGALRM (``execution_timeout``), so no signals here.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, TypeVar

from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from urllib3.response import HTTPResponse

T = TypeVar("T")

#: Name (prefix) of the watchdog threads: one while any exchange runs (or a :func:`watchdog_kept`
#: block), gone when the last one ends.
WATCHDOG_THREAD = "cdr-webhook-deadline"

_current = threading.local()


class Deadline:
    """
    A deadline ``seconds`` from now for the exchange run inside ``with Deadline(seconds):``.

    While the block runs, every socket that :class:`WatchedHTTPConnection` (and its https sibling)
    opens in this thread is registered; when the deadline passes, a watchdog thread shuts each one
    down (``SHUT_RDWR`` on a duplicate of its descriptor, which works under TLS too), so whatever
    recv or send is blocked on it returns at once, with an error or an end of file.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ends = time.monotonic() + seconds
        self.connected = False  # a socket was opened: the wait was the receiver's, not DNS or connect
        self._expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._outer: Deadline | None = None

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.ends - time.monotonic())

    @property
    def expired(self) -> bool:
        """Whether the watchdog has shut (or is shutting) the sockets."""
        return self._expired

    @property
    def passed(self) -> bool:
        """Whether the deadline has passed (the watchdog may not have woken up yet)."""
        return self._expired or time.monotonic() >= self.ends

    def watch(self, sock: socket.socket, *, owned: bool = False) -> None:
        """
        Shut ``sock`` down when the deadline passes (at once, when it already has).

        ``owned``: ``sock`` is the deadline's to close (a duplicate made for it), not the caller's.
        """
        # TLS wrapping detaches the original socket object; a duplicate stays.
        duplicate = sock if owned else sock.dup()
        with self._lock:
            self.connected = True
            if not self._expired:
                self._sockets.append(duplicate)
                return
        _shut(duplicate)
        duplicate.close()

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """
        Return ``function(*args)``, or raise :class:`TimeoutError` when it outlasts the deadline.

        It runs in a daemon thread that is abandoned at the deadline: for calls that cannot be
        interrupted, such as :func:`socket.getaddrinfo`. Inside a :func:`watchdog_kept` block the
        thread serves the block's next calls once this one has returned.
        """
        done = threading.Event()
        outcome: list[Any] = []

        def run() -> None:
            try:
                outcome.append((True, function(*args)))
            except BaseException as err:  # handed to the caller's thread
                outcome.append((False, err))
            finally:
                done.set()

        _WATCHDOG.run_call(run)
        if not done.wait(self.remaining()):
            raise TimeoutError(f"no answer within the {self.seconds:g} s deadline")
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def __enter__(self) -> Deadline:
        self._outer = getattr(_current, "deadline", None)
        _current.deadline = self
        _WATCHDOG.watch(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _WATCHDOG.forget(self)  # after this no shutdown can race the closing below
        _current.deadline = self._outer
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for duplicate in sockets:
            duplicate.close()

    def _expire(self) -> None:
        with self._lock:
            self._expired = True
            sockets = list(self._sockets)
        for duplicate in sockets:
            _shut(duplicate)


class _Watchdog:
    """
    The thread that expires deadlines when their time comes: one for every exchange of the process
    (a chunk's threads each run one), started by the first, ended when the last one is forgotten,
    unless a :meth:`kept` block still runs (many exchanges one after the other: starting and joining
    the thread for each cost a fifth of a kept-alive POST's CPU).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active: set[Deadline] = set()
        self._keepers = 0  # kept() blocks running
        self._idle_callers: list[queue.SimpleQueue[Callable[[], None] | None]] = []
        self._thread: threading.Thread | None = None
        #: When the thread wakes up next by itself (None: only when notified).
        self._wakes_at: float | None = None

    def watch(self, deadline: Deadline) -> None:
        with self._cond:
            self._active.add(deadline)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=WATCHDOG_THREAD, daemon=True)
                self._thread.start()
            # Deadlines of one length come in order: the thread needs waking only for an earlier one
            # (waking it for every POST of a chunk cost a tenth of the chunk's CPU).
            if self._wakes_at is None or deadline.ends < self._wakes_at:
                self._cond.notify()

    def forget(self, deadline: Deadline) -> None:
        """Stop watching; once this returns, the deadline is not being expired and never will be."""
        with self._cond:
            self._active.discard(deadline)
        self._end_if_idle()

    @contextlib.contextmanager
    def kept(self) -> Iterator[None]:
        """Keep the thread, once started, between the block's exchanges; end it with the block if idle."""
        with self._cond:
            self._keepers += 1
        try:
            yield
        finally:
            with self._cond:
                self._keepers -= 1
                idle = [] if self._keepers else self._idle_callers
                if not self._keepers:
                    self._idle_callers = []
            for inbox in idle:
                inbox.put(None)  # the caller thread ends
            self._end_if_idle()

    def run_call(self, job: Callable[[], None]) -> None:
        """
        Run ``job`` in a daemon thread: one a :meth:`kept` block keeps idle, else a new one (a
        thread started for each POST's name lookup cost a tenth of the POST's CPU).
        """
        with self._cond:
            inbox = self._idle_callers.pop() if self._idle_callers else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            name = f"{WATCHDOG_THREAD}-call"
            threading.Thread(target=self._serve_calls, args=(inbox,), name=name, daemon=True).start()
        inbox.put(job)

    def _serve_calls(self, inbox: queue.SimpleQueue[Callable[[], None] | None]) -> None:
        """Run the jobs put in ``inbox``; after each, wait for the next only while a block keeps it."""
        while (job := inbox.get()) is not None:
            job()
            with self._cond:
                if not self._keepers:
                    return
                self._idle_callers.append(inbox)

    def _end_if_idle(self) -> None:
        """End the thread when no deadline is watched and no :meth:`kept` block runs."""
        with self._cond:
            if self._active or self._keepers or self._thread is None:
                return
            thread, self._thread = self._thread, None
            self._cond.notify()
        thread.join()

    def _run(self) -> None:
        me = threading.current_thread()
        with self._cond:
            while self._thread is me:
                now = time.monotonic()
                for deadline in [d for d in self._active if d.ends <= now]:
                    self._active.discard(deadline)
                    deadline._expire()  # under the lock: forget() waits for it
                self._wakes_at = min((d.ends for d in self._active), default=None)
                self._cond.wait(None if self._wakes_at is None else self._wakes_at - now)


_WATCHDOG = _Watchdog()


def watchdog_kept() -> contextlib.AbstractContextManager[None]:
    """A block of many exchanges (a chunk's): the watchdog thread stays between them, not longer."""
    return _WATCHDOG.kept()


def current_deadline() -> Deadline | None:
    """The deadline this thread is running under, if any."""
    return getattr(_current, "deadline", None)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the other side, or never connected


class WatchedHTTPConnection(HTTPConnection):
    """
    An urllib3 connection that connects within the current deadline and registers its socket.

    A reply whose status line and headers were still arriving when the watchdog shut the socket
    is refused: http.client reads the end of file as the end of the headers, so a reply cut off after
    ``HTTP/1.1 200 OK`` would otherwise pass for a complete 200.
    """

    def _new_conn(self) -> socket.socket:
        deadline = current_deadline()
        if deadline is None:
            return super()._new_conn()
        remaining = deadline.remaining()
        if remaining <= 0:
            raise ConnectTimeoutError(self, f"Connection to {self.host} not tried: the deadline passed")
        timeout = self.timeout if isinstance(self.timeout, int | float) else math.inf
        self.timeout = min(timeout, remaining)
        sock = super()._new_conn()
        deadline.watch(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        """Send a request; a kept-alive socket (connected under an earlier deadline) joins this one."""
        deadline = current_deadline()
        if deadline is not None and self.sock is not None:
            # A TLS socket cannot be duplicated as such: its descriptor can.
            deadline.watch(socket.socket(fileno=os.dup(self.sock.fileno())), owned=True)
        super().request(*args, **kwargs)

    def getresponse(self) -> HTTPResponse:
        response = super().getresponse()
        deadline = current_deadline()
        # The watchdog sets ``expired`` before it shuts anything: still False now means the headers
        # were read whole.
        if deadline is not None and deadline.expired:
            response.close()
            raise TimeoutError(f"the reply's headers were cut off by the {deadline.seconds:g} s deadline")
        return response


class WatchedHTTPSConnection(WatchedHTTPConnection, HTTPSConnection):
    """The https sibling: the raw socket is registered before the TLS handshake starts."""


class WatchedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = WatchedHTTPConnection


class WatchedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = WatchedHTTPSConnection


#: For ``PoolManager.pool_classes_by_scheme``.
WATCHED_POOLS = {"http": WatchedHTTPConnectionPool, "https": WatchedHTTPSConnectionPool}
