"""A per-endpoint limit on POSTs in flight, shared by every worker: PostgreSQL advisory locks.

Airflow pools cannot do this here: a mapped task's pool is fixed on ``.partial()``, so all CDRs of a
run share one pool whatever their endpoint. Session-level advisory locks in the CDR database are
held only while a POST is in flight and vanish with a worker that dies.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from typing import TYPE_CHECKING, Any

import psycopg

if TYPE_CHECKING:
    from collections.abc import Iterator


class NoSlot(RuntimeError):
    """Every in-flight slot of the endpoint stayed busy for the whole wait."""


def _key(endpoint: str) -> int:
    """A stable signed 32-bit key per endpoint (the first half of the two-int advisory lock key)."""
    value = zlib.crc32(b"cdr_webhook.slot:" + endpoint.encode())
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
    key = _key(endpoint)
    deadline = time.monotonic() + wait_seconds
    while True:
        for slot in range(limit):
            row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (key, slot)).fetchone()
            if row and row[0]:
                try:
                    yield slot
                finally:
                    # A connection that broke mid-POST took its locks with it: nothing left to free.
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("SELECT pg_advisory_unlock(%s, %s)", (key, slot))
                return
        if time.monotonic() >= deadline:
            raise NoSlot(
                f"all {limit} in-flight slots of endpoint {endpoint!r} stayed busy for {wait_seconds:g} s "
                "(extra max_in_flight, or setting max_in_flight_per_endpoint)"
            )
        time.sleep(poll_seconds)
