"""Each endpoint's backlog: its queued rows now, and a snapshot of them per 5 minutes for its chart.

``cdr_webhook.endpoint_backlog`` (schema step 14) holds each endpoint's backlog per 5-minute bucket,
taken by the first select step of the bucket (:func:`snapshot_backlog`); the chart's periods and
buckets are the health rollup's (:mod:`cdr_webhook.ledger.health`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from cdr_webhook.db import without_jit
from cdr_webhook.ledger.health import KEEP, bucket_of

if TYPE_CHECKING:
    import datetime as dt

    import psycopg

    from cdr_webhook.ledger.health import Period


@dataclasses.dataclass(frozen=True)
class Backlog:
    """An endpoint's CDRs still to deliver, now: waiting their turn, taken by a run, waiting for a retry."""

    queued: int
    in_flight: int
    retrying: int


# Its queued ledger rows, by state: never tried and no run's yet (queued), taken by a run and not tried
# yet (in flight), tried and to be tried again (retrying). The page's numbers now and the snapshots read
# it alike: the queued rows' partial index (delivery_queued_endpoint_idx), and each row's run_id and
# attempts from the table.
BACKLOG_COUNTS = (
    "count(*) FILTER (WHERE attempts = 0 AND run_id IS NULL)::int, "
    "count(*) FILTER (WHERE attempts = 0 AND run_id IS NOT NULL)::int, "
    "count(*) FILTER (WHERE attempts > 0)::int "
    "FROM cdr_webhook.delivery WHERE status = 'queued'"
)


def backlog(conn: psycopg.Connection[Any], endpoint: str) -> Backlog:
    """Its queued ledger rows now, by state (:data:`BACKLOG_COUNTS`): one index range."""
    with without_jit(conn):
        row = conn.execute(f"SELECT {BACKLOG_COUNTS} AND endpoint = %s", (endpoint,)).fetchone()
    assert row is not None
    return Backlog(*row)


def snapshot_backlog(conn: psycopg.Connection[Any], *, now: dt.datetime) -> bool:
    """
    Record every endpoint's backlog in the bucket of ``now``, unless a run did already; return whether
    this call did. One row per endpoint with queued rows (none for an endpoint with nothing queued).

    Most calls read the one row of ``backlog_snapshot`` and stop. The first of a bucket takes it with a
    conditional upsert, which a concurrent call waits on and then finds taken, and counts the queued
    rows (:data:`BACKLOG_COUNTS`: all of them, once per 5 minutes) in the same transaction, where it also
    deletes the snapshots older than :data:`KEEP`: a failed count leaves the bucket to the next run.
    """
    bucket = bucket_of(now.timestamp())
    row = conn.execute("SELECT bucket FROM cdr_webhook.backlog_snapshot").fetchone()
    if row is not None and row[0] >= bucket:
        return False
    with conn.transaction(), without_jit(conn):
        taken = conn.execute(
            "INSERT INTO cdr_webhook.backlog_snapshot AS s (bucket) VALUES (%s) "
            "ON CONFLICT (singleton) DO UPDATE SET bucket = EXCLUDED.bucket WHERE s.bucket < EXCLUDED.bucket "
            "RETURNING bucket",
            (bucket,),
        ).fetchone()
        if taken is None:
            return False
        conn.execute(
            "INSERT INTO cdr_webhook.endpoint_backlog (endpoint, bucket, queued, in_flight, retrying) "
            f"SELECT endpoint, %s::timestamptz, {BACKLOG_COUNTS} GROUP BY endpoint ON CONFLICT DO NOTHING",
            (bucket,),
        )
        # Its own span, whatever retention_days: once per bucket, a few rows by the bucket index.
        conn.execute("DELETE FROM cdr_webhook.endpoint_backlog WHERE bucket < %s", (bucket - KEEP,))
    return True


@dataclasses.dataclass
class BacklogPoint:
    """One step of the backlog chart: the step's biggest snapshot (its bucket ``seen``), or none."""

    at: dt.datetime
    queued: int = 0
    in_flight: int = 0
    retrying: int = 0
    seen: dt.datetime | None = None

    @property
    def total(self) -> int:
        return self.queued + self.in_flight + self.retrying


@dataclasses.dataclass
class BacklogSeries:
    """An endpoint's backlog over a period, oldest first."""

    endpoint: str
    period: Period
    points: list[BacklogPoint]

    @property
    def peak(self) -> int:
        return max((p.total for p in self.points), default=0)


def backlog_series(
    conn: psycopg.Connection[Any], endpoint: str, period: Period, *, now: dt.datetime
) -> BacklogSeries:
    """
    One endpoint's backlog snapshots over ``period``: per step, the snapshot with the most rows (the
    latest of equals), so a step of an hour or 6 hours shows its peak, not whichever 5 minutes came last.
    """
    start = period.start(now)
    result = BacklogSeries(
        endpoint, period, [BacklogPoint(start + i * period.step) for i in range(period.points)]
    )
    with without_jit(conn):
        rows = conn.execute(
            "SELECT bucket, queued, in_flight, retrying FROM cdr_webhook.endpoint_backlog "
            "WHERE endpoint = %s AND bucket >= %s ORDER BY bucket",
            (endpoint, start),
        ).fetchall()
    for bucket, queued, in_flight, retrying in rows:
        index = int((bucket - start) / period.step)
        if not 0 <= index < period.points:
            continue
        point = result.points[index]
        if point.seen is None or queued + in_flight + retrying >= point.total:
            point.queued, point.in_flight, point.retrying, point.seen = queued, in_flight, retrying, bucket
    return result
