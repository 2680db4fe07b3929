"""A per-endpoint limit on POSTs in flight, shared by every worker: PostgreSQL advisory locks.

Airflow pools cannot do this here: a mapped task's pool is fixed on ``.partial()``, so all CDRs of a
run share one pool whatever their endpoint. Session-level advisory locks in the CDR database are
held only while a POST is in flight and vanish with a worker that dies.
"""

from __future__ import annotations

import contextlib
import math
import time
import zlib
from typing import TYPE_CHECKING, Any

import psycopg

if TYPE_CHECKING:
    from collections.abc import Iterator


class NoSlot(RuntimeError):
    """Every in-flight slot of the endpoint stayed busy for the whole wait."""


def _key(endpoint: str, kind: str = "slot") -> int:
    """A stable signed 32-bit key per endpoint (the first half of the two-int advisory lock key)."""
    value = zlib.crc32(f"cdr_webhook.{kind}:".encode() + endpoint.encode())
    return value - 2**32 if value >= 2**31 else value


@contextlib.contextmanager
def endpoint_slot(
    conn: psycopg.Connection[Any],
    endpoint: str,
    *,
    limit: int,
    wait_seconds: float,
    poll_seconds: float = 0.1,
) -> Iterator[int]:
    """Hold one of ``limit`` slots of ``endpoint`` for the duration of the block; yield its number."""
    with endpoint_slots(
        conn, endpoint, limit=limit, wanted=1, wait_seconds=wait_seconds, poll_seconds=poll_seconds
    ) as held:
        yield held.slots[0]


class HeldSlots:
    """
    The slots a block holds. A chunk takes more as they come free (:meth:`take_more`) and gives
    back those it no longer needs (:meth:`give_back`); chunks sending to one endpoint at once share
    its limit (:meth:`fair_share`).
    """

    def __init__(
        self, conn: psycopg.Connection[Any], key: int, limit: int, slots: list[int], sharers_key: int
    ) -> None:
        self._conn = conn
        self._key = key
        self._limit = limit
        self._sharers_key = sharers_key
        self.slots = slots

    def fair_share(self) -> int:
        """
        The slots this block may hold while the endpoint's other sharing blocks send too: the limit
        divided among them (rounded up, at least one).

        Chunks of one endpoint running in several task processes each send their share at once, so
        their sending (CPU-bound against a fast receiver) spreads over the workers' cores instead of
        one task holding every slot while the others wait for one.
        """
        row = self._conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid = (%s::bigint & 4294967295)::oid AND objid = 0 AND objsubid = 2",
            (self._sharers_key,),
        ).fetchone()
        sharers = max(int(row[0]) if row else 1, 1)
        return max(math.ceil(self._limit / sharers), 1)

    def take_more(self, wanted: int) -> None:
        """Take free slots until ``wanted`` are held (or none is free); never one held already."""
        for slot in range(self._limit):
            if len(self.slots) >= wanted:
                return
            if slot not in self.slots and _try_lock(self._conn, self._key, slot):
                self.slots.append(slot)

    def give_back(self, slot: int) -> None:
        if slot in self.slots:
            self.slots.remove(slot)
            _unlock(self._conn, self._key, slot)

    def release_all(self) -> None:
        for slot in list(self.slots):
            self.give_back(slot)


@contextlib.contextmanager
def endpoint_slots(
    conn: psycopg.Connection[Any],
    endpoint: str,
    *,
    limit: int,
    wanted: int,
    wait_seconds: float,
    poll_seconds: float = 0.1,
    share: bool = False,
) -> Iterator[HeldSlots]:
    """
    Hold up to ``wanted`` of ``limit`` slots of ``endpoint`` (at least one) for the block.

    Takes every free slot up to ``wanted`` at once; waits ``wait_seconds`` at most for the first.
    A session holds each slot once (advisory locks are re-entrant per session: a slot number is never
    asked for twice while held). ``share``: the block counts among the endpoint's sharers (a shared
    advisory lock, from before its first slot to its end), and takes at first only its
    :meth:`~HeldSlots.fair_share`.
    """
    key, sharers_key = _key(endpoint), _key(endpoint, "sharers")
    deadline = time.monotonic() + wait_seconds
    if share:
        conn.execute("SELECT pg_advisory_lock_shared(%s, 0)", (sharers_key,))
    try:
        while True:
            held = HeldSlots(conn, key, limit, [], sharers_key)
            held.take_more(min(wanted, held.fair_share()) if share else wanted)
            if held.slots:
                try:
                    yield held
                finally:
                    held.release_all()
                return
            if time.monotonic() >= deadline:
                raise NoSlot(
                    f"all {limit} in-flight slots of endpoint {endpoint!r} stayed busy for "
                    f"{wait_seconds:g} s (extra max_in_flight, or setting max_in_flight_per_endpoint)"
                )
            time.sleep(poll_seconds)
    finally:
        if share:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock_shared(%s, 0)", (sharers_key,))


def _try_lock(conn: psycopg.Connection[Any], key: int, slot: int) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (key, slot)).fetchone()
    return bool(row and row[0])


def _unlock(conn: psycopg.Connection[Any], key: int, slot: int) -> None:
    # A connection that broke mid-POST took its locks with it: nothing left to free.
    with contextlib.suppress(psycopg.Error):
        conn.execute("SELECT pg_advisory_unlock(%s, %s)", (key, slot))
