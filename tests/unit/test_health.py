"""The health rollup's pure parts: bins, buckets, percentiles and what one call of record_attempts adds."""

from __future__ import annotations

import dataclasses
import datetime as dt

from bench.records import attempt
from cdr_webhook import ledger
from cdr_webhook.ledger import health

T = dt.datetime(2026, 12, 6, 20, 57, 31, tzinfo=dt.UTC)


def test_bins_hold_values_up_to_their_edge_and_the_last_holds_the_rest():
    assert health.latency_bin(0) == 0
    assert health.latency_bin(1) == 0
    assert health.latency_bin(1.5) == 1
    assert health.latency_bin(300) == health.EDGES_MS.index(300)
    assert health.latency_bin(301) == health.EDGES_MS.index(500)
    assert health.latency_bin(10**9) == health.BINS - 1


def test_a_percentile_is_its_nearest_rank_bin_edge_and_beyond_an_hour_says_so():
    histogram = [0] * health.BINS
    histogram[health.latency_bin(40)] = 90
    histogram[health.latency_bin(2500)] = 10
    assert health.percentile_of(histogram, 50) == 50
    assert health.percentile_of(histogram, 90) == 50
    assert health.percentile_of(histogram, 95) == 3000
    assert health.percentile_of([0] * health.BINS, 50) is None
    histogram[-1] = 1000
    assert health.percentile_of(histogram, 95) == health.BEYOND_MS
    assert health.describe_latency(health.BEYOND_MS) == "> 1 h"
    assert health.describe_latency(300) == "≤ 300 ms"
    assert health.describe_latency(None) == "–"


def test_rollups_count_by_endpoint_and_the_5_minutes_the_post_began_in():
    created = T - dt.timedelta(seconds=2)
    first = ledger.Claim("a", "ep", 1, created, "queued", 0)
    retry = ledger.Claim("b", "ep", 1, created - dt.timedelta(hours=1), "queued", 1)
    other = ledger.Claim("c", "ep2", 1, created, "queued", 0)
    made = [
        attempt(first, "delivered", 200, latency_ms=40),
        attempt(retry, "queued", 503, latency_ms=120),
        attempt(other, "failed", 400, latency_ms=7),
    ]
    made = [dataclasses.replace(a, result=dataclasses.replace(a.result, sent_at=T.timestamp())) for a in made]

    rows = {r.endpoint: r for r in health.rollups(made)}

    ep = rows["ep"]
    assert ep.bucket == dt.datetime(2026, 12, 6, 20, 55, tzinfo=dt.UTC)
    assert (ep.attempts, ep.delivered, ep.retried, ep.failed) == (2, 1, 1, 0)
    assert ep.latency[health.latency_bin(40)] == 1
    assert ep.latency[health.latency_bin(120)] == 1
    # Only a first attempt has a commit→POST latency: the retry's hour in the queue is the schedule's.
    assert sum(ep.pickup) == 1
    assert ep.pickup[health.latency_bin(2000)] == 1
    assert (rows["ep2"].failed, rows["ep2"].attempts) == (1, 1)


def test_periods_end_with_the_step_now_is_in():
    day = health.PERIODS["day"]
    assert day.start(T) == dt.datetime(2026, 12, 5, 21, 0, tzinfo=dt.UTC)
    week = health.PERIODS["week"]
    # The current 6 hours start at 18:00; 27 steps of 6 hours before them.
    assert week.start(T) == dt.datetime(2026, 11, 30, 0, 0, tzinfo=dt.UTC)


def test_a_latency_charts_scale_is_short():
    from cdr_webhook.web.charts import _duration

    assert _duration(300) == "300 ms"
    assert _duration(15_000) == "15 s"
    assert _duration(health.BEYOND_MS) == "> 1 h"
