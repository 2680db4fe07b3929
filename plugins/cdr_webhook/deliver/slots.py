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
    from collections.abc import Iterator, Sequence


class NoSlot(RuntimeError):
    """Every in-flight slot of the endpoint stayed busy for the whole wait."""


def _key(endpoint: str, kind: str = "slot") -> int:
    """A stable signed 32-bit key per endpoint (the first half of the two-int advisory lock key)."""
    value = zlib.crc32(f"cdr_webhook.{kind}:".encode() + endpoint.encode())
    return value - 2**32 if value >= 2**31 else value


class HeldSlots:
    """
    The slots a block holds. A chunk takes more as they come free (:meth:`take_more`) and gives
    back those it no longer needs (:meth:`give_back`); chunks sending to one endpoint at once share
    its limit (:meth:`fair_share`).
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        key: int,
        limit: int,
        slots: list[int],
        sharers_key: int,
        *,
        shared: bool = False,
    ) -> None:
        self._conn = conn
        self._key = key
        self._limit = limit
        self._sharers_key = sharers_key
        self._shared = shared
        self.slots = slots

    def fair_share(self) -> int:
        """
        The slots this block may hold while the endpoint's other sharing blocks send too: the limit
        divided among them (rounded up, at least one).

        Chunks of one endpoint running in several task processes each send their share at once, so
        their sending (CPU-bound against a fast receiver) spreads over the workers' cores instead of
        one task holding every slot while the others wait for one.
        """
        return fair_shares(self._conn, [self])[0]

    def share_of(self, sharers: int) -> int:
        """The limit divided among ``sharers`` blocks (rounded up, at least one)."""
        return max(math.ceil(self._limit / max(sharers, 1)), 1)

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

    def close(self) -> None:
        """Give every slot back and stop counting among the endpoint's sharers."""
        self.release_all()
        if self._shared:
            self._shared = False
            with contextlib.suppress(psycopg.Error):
                self._conn.execute("SELECT pg_advisory_unlock_shared(%s, 0)", (self._sharers_key,))


def fair_shares(conn: psycopg.Connection[Any], helds: Sequence[HeldSlots]) -> list[int]:
    """Each block's :meth:`~HeldSlots.fair_share`, from one look at the locks (a task of many endpoints)."""
    keys = sorted({held._sharers_key & 0xFFFFFFFF for held in helds})
    sharers = dict(
        conn.execute(
            "SELECT classid::bigint, count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid = ANY(%s::bigint[]::oid[]) AND objid = 0 AND objsubid = 2 GROUP BY classid",
            (keys,),
        ).fetchall()
    )
    return [held.share_of(sharers.get(held._sharers_key & 0xFFFFFFFF, 1)) for held in helds]


def open_slots(
    conn: psycopg.Connection[Any], endpoint: str, *, limit: int, wanted: int, share: bool
) -> HeldSlots:
    """
    Take, without waiting, up to ``wanted`` of ``limit`` slots of ``endpoint`` (none when all are busy).

    ``share``: the holder counts among the endpoint's sharers (a shared advisory lock, until
    :meth:`HeldSlots.close`) and takes at first only its :meth:`~HeldSlots.fair_share`. The caller
    closes it; it takes more later with :meth:`~HeldSlots.take_more`.
    """
    key, sharers_key = _key(endpoint), _key(endpoint, "sharers")
    if share:
        conn.execute("SELECT pg_advisory_lock_shared(%s, 0)", (sharers_key,))
    held = HeldSlots(conn, key, limit, [], sharers_key, shared=share)
    held.take_more(min(wanted, held.fair_share()) if share else wanted)
    return held


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

    Takes every free slot up to ``wanted`` at once (see :func:`open_slots`); waits ``wait_seconds``
    at most for the first. A session holds each slot once (advisory locks are re-entrant per
    session: a slot number is never asked for twice while held).
    """
    deadline = time.monotonic() + wait_seconds
    held = open_slots(conn, endpoint, limit=limit, wanted=wanted, share=share)
    try:
        while not held.slots:
            if time.monotonic() >= deadline:
                raise NoSlot(
                    f"all {limit} in-flight slots of endpoint {endpoint!r} stayed busy for "
                    f"{wait_seconds:g} s (extra max_in_flight, or setting max_in_flight_per_endpoint)"
                )
            time.sleep(poll_seconds)
            held.take_more(min(wanted, held.fair_share()) if share else wanted)
        yield held
    finally:
        held.close()


def _try_lock(conn: psycopg.Connection[Any], key: int, slot: int) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (key, slot)).fetchone()
    return bool(row and row[0])


def _unlock(conn: psycopg.Connection[Any], key: int, slot: int) -> None:
    # A connection that broke mid-POST took its locks with it: nothing left to free.
    with contextlib.suppress(psycopg.Error):
        conn.execute("SELECT pg_advisory_unlock(%s, %s)", (key, slot))
