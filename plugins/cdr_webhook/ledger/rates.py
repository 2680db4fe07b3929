"""Each rate-limited endpoint's paced send times, shared by every worker, task and run: one row per endpoint.

``cdr_webhook.endpoint_pace.next_at`` is the earliest time, on the database's clock, at which the
endpoint's next POST may start. A task reserves a batch of send times in one transaction (the row
lock orders the reservations of every worker): the first at ``max(next_at, now)``, the next ones
one spacing apart, and ``next_at`` moves past the last. No two reserved times of an endpoint are ever
closer than the spacing, whoever reserved them, and time left idle earns no credit (the
``max(…, now)``): there is no burst. See :mod:`cdr_webhook.pacing` for the spacing.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from cdr_webhook.pacing import fitting

if TYPE_CHECKING:
    import psycopg

_LOCKED = (
    "SELECT GREATEST(next_at, clock_timestamp()), clock_timestamp() FROM cdr_webhook.endpoint_pace "
    "WHERE endpoint = %s FOR UPDATE"
)


class Reservation(NamedTuple):
    """
    Send times reserved in one transaction, and what places them on the caller's clock.

    ``read_at`` is the database's clock (epoch seconds) when the endpoint's row was read under its
    lock; it was read between ``asked`` and ``answered``, the caller's ``time.monotonic()`` just
    before that query went out and just after its reply came (not the transaction's commit, which
    may take much longer: see :class:`cdr_webhook.deliver.rate.DatabaseClock`).
    """

    offsets: list[float]  # each send time, in seconds after read_at, in order
    read_at: float | None  # None: nothing was asked of the database (nothing wanted)
    asked: float
    answered: float


def reserve(
    conn: psycopg.Connection[Any], endpoint: str, *, wanted: int, spacing: float, within: float
) -> Reservation:
    """
    Reserve up to ``wanted`` send times of ``endpoint``, ``spacing`` seconds apart and after every
    time reserved before, none more than ``within`` seconds from now; return each as seconds from
    the row's reading on the database's clock (0 or more, in order; none when none fits in ``within``).

    ``conn`` is in autocommit: the reservation commits at once (a reserved time that goes unused
    only slows the endpoint down, it never lets a POST too many through).
    """
    if wanted < 1 or within < 0:
        return Reservation([], None, 0.0, 0.0)
    with conn.transaction():
        asked = time.monotonic()
        row = conn.execute(_LOCKED, (endpoint,)).fetchone()
        if row is None:  # the endpoint's first reservation: its row, then its lock
            conn.execute(
                "INSERT INTO cdr_webhook.endpoint_pace (endpoint, next_at) VALUES (%s, clock_timestamp()) "
                "ON CONFLICT (endpoint) DO NOTHING",
                (endpoint,),
            )
            asked = time.monotonic()
            row = conn.execute(_LOCKED, (endpoint,)).fetchone()
            assert row is not None
        answered = time.monotonic()
        start, now = row
        first_in = max((start - now).total_seconds(), 0.0)
        count = fitting(wanted, first_in=first_in, spacing=spacing, within=within)
        if count:
            conn.execute(
                "UPDATE cdr_webhook.endpoint_pace SET next_at = %s, updated_at = now() WHERE endpoint = %s",
                (start + dt.timedelta(seconds=count * spacing), endpoint),
            )
    return Reservation([first_in + n * spacing for n in range(count)], now.timestamp(), asked, answered)


def clock(conn: psycopg.Connection[Any]) -> tuple[float, float, float]:
    """The database's clock (epoch seconds), with ``time.monotonic()`` just before asking and just after."""
    asked = time.monotonic()
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    answered = time.monotonic()
    assert row is not None
    return row[0].timestamp(), asked, answered


def hold(conn: psycopg.Connection[Any], endpoint: str, seconds: float) -> None:
    """
    Reserve nothing for ``seconds`` from now (a receiver's ``Retry-After``): every task's next send
    time to ``endpoint`` comes after it. Never brings a later ``next_at`` earlier.
    """
    conn.execute(
        "INSERT INTO cdr_webhook.endpoint_pace AS p (endpoint, next_at) "
        "VALUES (%(endpoint)s, clock_timestamp() + make_interval(secs => %(seconds)s)) "
        "ON CONFLICT (endpoint) DO UPDATE SET next_at = GREATEST(p.next_at, EXCLUDED.next_at), "
        "updated_at = now()",
        {"endpoint": endpoint, "seconds": seconds},
    )
