"""Each endpoint's health: a rollup of its attempts per 5 minutes, kept as they are recorded, and its reads.

``cdr_webhook.endpoint_health`` (schema step 12) holds, per endpoint and 5-minute bucket of the POSTs'
start, the attempts, how they ended (delivered, to be retried, failed for good), and two latency
histograms: the POST's own, and commit→POST (a CDR's ``created_at`` to its first POST). The rows are
written by :func:`cdr_webhook.ledger.records.record_attempts` in the statement that records the
attempts, so the charts never read the ledger itself: a week of one endpoint is 2,016 rows at most,
however many CDRs it had. Percentiles come from the histograms: each is the upper edge of its bin.

Its backlog over time is :mod:`cdr_webhook.ledger.backlog`'s.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import operator
from typing import TYPE_CHECKING, Any

from cdr_webhook.db import without_jit

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    import psycopg

    from cdr_webhook.outcome import Attempt

#: The rollup's bucket: every attempt counts in the 5 minutes its POST began in (UTC, from the epoch).
BUCKET = dt.timedelta(minutes=5)
#: The latency histograms' bin edges, milliseconds: bin i holds values up to EDGES_MS[i] (the last
#: bin, beyond 1 h, has no edge). Roughly 1-1.5-2-3-5-7 per decade: a percentile is within ~40 %.
EDGES_MS: tuple[int, ...] = (
    1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500, 700,
    1_000, 1_500, 2_000, 3_000, 5_000, 7_000, 10_000, 15_000, 20_000, 30_000, 60_000,
    120_000, 300_000, 600_000, 1_800_000, 3_600_000,
)  # fmt: skip
BINS = len(EDGES_MS) + 1
#: How long the rollup keeps its rows: the longest period the charts show, and a day.
KEEP = dt.timedelta(days=8)


def bucket_of(moment: float) -> dt.datetime:
    """The 5-minute bucket (its start, UTC) of a time in seconds since the epoch."""
    seconds = int(moment // BUCKET.total_seconds() * BUCKET.total_seconds())
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def latency_bin(ms: float) -> int:
    """The histogram bin of a latency in milliseconds."""
    return bisect.bisect_left(EDGES_MS, ms)


@dataclasses.dataclass
class Rollup:
    """The attempts of one endpoint in one bucket, as one upsert adds them."""

    endpoint: str
    bucket: dt.datetime
    attempts: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    latency: list[int] = dataclasses.field(default_factory=lambda: [0] * BINS)
    pickup: list[int] = dataclasses.field(default_factory=lambda: [0] * BINS)


def rollups(attempts: Iterable[Attempt]) -> list[Rollup]:
    """The rollup rows of some attempts: by endpoint and the bucket each POST began in."""
    found: dict[tuple[str, dt.datetime], Rollup] = {}
    for attempt in attempts:
        key = (attempt.claim.endpoint, bucket_of(attempt.result.sent_at))
        row = found.setdefault(key, Rollup(*key))
        row.attempts += 1
        status = attempt.decision.status
        if status == "delivered":
            row.delivered += 1
        elif status == "queued":
            row.retried += 1
        else:
            row.failed += 1
        row.latency[latency_bin(attempt.result.latency_ms)] += 1
        if attempt.number == 1:  # commit→POST is the first POST's: a retry's wait is the schedule's
            row.pickup[latency_bin(max(0.0, attempt.pickup_seconds) * 1000)] += 1
    return list(found.values())


# A bucket's row grows by what each call adds (the histograms bin by bin). It follows the UPDATE that
# records the attempts, in its statement (a data-modifying WITH): one round trip for both. Each row's
# histograms are slices of one flat array. Concurrent chunks of one endpoint queue on its row for the
# moment of their statement, as they do on endpoint_state's; rows go in one order: no deadlock.
ADD_ROWS = (
    "INSERT INTO cdr_webhook.endpoint_health AS h "
    "(endpoint, bucket, attempts, delivered, retried, failed, latency_hist, pickup_hist) "
    "SELECT r.endpoint, r.bucket, r.attempts, r.delivered, r.retried, r.failed, "
    "  (%(h_latency)s::int[])[(r.n - 1) * %(h_bins)s + 1 : r.n * %(h_bins)s], "
    "  (%(h_pickup)s::int[])[(r.n - 1) * %(h_bins)s + 1 : r.n * %(h_bins)s] "
    "FROM unnest(%(h_endpoints)s::text[], %(h_buckets)s::timestamptz[], %(h_attempts)s::int[], "
    "  %(h_delivered)s::int[], %(h_retried)s::int[], %(h_failed)s::int[]) WITH ORDINALITY "
    "  AS r(endpoint, bucket, attempts, delivered, retried, failed, n) "
    "ORDER BY r.endpoint, r.bucket "
    "ON CONFLICT (endpoint, bucket) DO UPDATE SET attempts = h.attempts + EXCLUDED.attempts, "
    "delivered = h.delivered + EXCLUDED.delivered, retried = h.retried + EXCLUDED.retried, "
    "failed = h.failed + EXCLUDED.failed, "
    "latency_hist = cdr_webhook.histogram_add(h.latency_hist, EXCLUDED.latency_hist), "
    "pickup_hist = cdr_webhook.histogram_add(h.pickup_hist, EXCLUDED.pickup_hist)"
)


def add_params(rows: Sequence[Rollup]) -> dict[str, Any]:
    """The parameters of :data:`ADD_ROWS` for ``rows`` (one per endpoint and bucket)."""
    return {
        "h_bins": BINS,
        "h_endpoints": [r.endpoint for r in rows],
        "h_buckets": [r.bucket for r in rows],
        "h_attempts": [r.attempts for r in rows],
        "h_delivered": [r.delivered for r in rows],
        "h_retried": [r.retried for r in rows],
        "h_failed": [r.failed for r in rows],
        "h_latency": [count for r in rows for count in r.latency],
        "h_pickup": [count for r in rows for count in r.pickup],
    }


# -- reads -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Period:
    """A chart's span: ``points`` steps of ``step`` each, ending with the one now is in."""

    name: str
    step: dt.timedelta
    points: int

    def start(self, now: dt.datetime) -> dt.datetime:
        """The first step's start: the current step's (aligned on the epoch), ``points - 1`` steps back."""
        current = bucket_start(now, self.step)
        return current - (self.points - 1) * self.step


PERIODS = {
    "hour": Period("hour", dt.timedelta(minutes=5), 12),
    "day": Period("day", dt.timedelta(hours=1), 24),
    "week": Period("week", dt.timedelta(hours=6), 28),
}


def bucket_start(moment: dt.datetime, step: dt.timedelta) -> dt.datetime:
    seconds = step.total_seconds()
    return dt.datetime.fromtimestamp(moment.timestamp() // seconds * seconds, dt.UTC)


@dataclasses.dataclass
class Point:
    """One step of a chart: its start, its attempts by outcome, and its latency histograms."""

    at: dt.datetime
    attempts: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    latency: list[int] | None = None
    pickup: list[int] | None = None

    @property
    def failures(self) -> int:
        """Attempts that did not deliver (a retry follows, or the delivery failed for good)."""
        return self.retried + self.failed


@dataclasses.dataclass
class Series:
    """An endpoint's chart over a period: its points, oldest first, and their sums."""

    endpoint: str
    period: Period
    points: list[Point]

    @property
    def attempts(self) -> int:
        return sum(p.attempts for p in self.points)

    @property
    def delivered(self) -> int:
        return sum(p.delivered for p in self.points)

    @property
    def failures(self) -> int:
        return sum(p.failures for p in self.points)

    @property
    def failed(self) -> int:
        return sum(p.failed for p in self.points)

    @property
    def success_rate(self) -> float | None:
        """Delivered attempts among all attempts (None: no attempt in the period)."""
        return self.delivered / self.attempts if self.attempts else None

    def latency(self, percentile: float, *, pickup: bool = False) -> int | None:
        """The period's POST (or commit→POST) latency percentile, ms: its bin's upper edge."""
        total = [0] * BINS
        for point in self.points:
            for i, count in enumerate((point.pickup if pickup else point.latency) or ()):
                total[i] += count
        return percentile_of(total, percentile)


#: What :func:`percentile_of` says for a value in the last bin, beyond every edge (over an hour).
BEYOND_MS = EDGES_MS[-1] + 1


def percentile_of(histogram: Sequence[int], percentile: float) -> int | None:
    """The upper edge (ms) of the bin holding the ``percentile``-th value (nearest rank); None for no
    value; :data:`BEYOND_MS` for a value beyond the last edge."""
    count = sum(histogram)
    if not count:
        return None
    rank = percentile / 100 * count
    seen = 0
    for i, found in enumerate(histogram):
        seen += found
        if found and seen >= rank:
            return EDGES_MS[i] if i < len(EDGES_MS) else BEYOND_MS
    return BEYOND_MS


def describe_latency(ms: int | None) -> str:
    """A percentile as the pages say it: ``≤ 300 ms``, ``> 1 h``, or ``–`` for none."""
    if ms is None:
        return "–"
    return f"> {EDGES_MS[-1] // 3_600_000} h" if ms > EDGES_MS[-1] else f"≤ {ms} ms"


def _empty(period: Period, start: dt.datetime, endpoint: str) -> Series:
    return Series(endpoint, period, [Point(start + i * period.step) for i in range(period.points)])


def trends(conn: psycopg.Connection[Any], period: Period, *, now: dt.datetime) -> dict[str, Series]:
    """Every endpoint's counts over ``period`` (no histograms: the Endpoints page's small charts)."""
    start = period.start(now)
    with without_jit(conn):
        rows = conn.execute(
            "SELECT endpoint, date_bin(%s, bucket, 'epoch'::timestamptz) AS step, sum(attempts)::int, "
            "sum(delivered)::int, sum(retried)::int, sum(failed)::int FROM cdr_webhook.endpoint_health "
            "WHERE bucket >= %s GROUP BY 1, 2",
            (period.step, start),
        ).fetchall()
    found: dict[str, Series] = {}
    for endpoint, step, attempts, delivered, retried, failed in rows:
        index = int((step - start) / period.step)
        if not 0 <= index < period.points:
            continue  # a bucket in the future (a clock ahead): not in this chart
        series = found.setdefault(endpoint, _empty(period, start, endpoint))
        point = series.points[index]
        point.attempts, point.delivered, point.retried, point.failed = attempts, delivered, retried, failed
    return found


def series(conn: psycopg.Connection[Any], endpoint: str, period: Period, *, now: dt.datetime) -> Series:
    """One endpoint's counts and latency histograms over ``period`` (its detail page)."""
    start = period.start(now)
    result = _empty(period, start, endpoint)
    # Binary: a week is 2,016 rows of two arrays, which the text format would parse digit by digit.
    with without_jit(conn), conn.cursor(binary=True) as cur:
        rows = cur.execute(
            "SELECT bucket, attempts, delivered, retried, failed, latency_hist, pickup_hist "
            "FROM cdr_webhook.endpoint_health WHERE endpoint = %s AND bucket >= %s",
            (endpoint, start),
        ).fetchall()
    for bucket, attempts, delivered, retried, failed, latency, pickup in rows:
        index = int((bucket - start) / period.step)
        if not 0 <= index < period.points:
            continue
        point = result.points[index]
        point.attempts += attempts
        point.delivered += delivered
        point.retried += retried
        point.failed += failed
        point.latency = _added(point.latency, latency)
        point.pickup = _added(point.pickup, pickup)
    return result


def _added(total: list[int] | None, more: Sequence[int]) -> list[int]:
    if total is None:
        return list(more)
    return list(map(operator.add, total, more))
