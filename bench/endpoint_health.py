"""The Endpoints page's queries, and an endpoint's health page, on a big ledger with a week of health rollup.

    PYTHONPATH=plugins .venv/bin/python -m bench.endpoint_health [--cdrs 5000000] [--endpoints 50] \
        [--repeat 20] [--plans FILE] [--keep | --reuse NAME] [--dsn DSN]

Fills a scratch database with bench/selection_at_size.py's loader (N source CDRs and a ledger row for
nearly every one, ``--endpoints`` clients with an endpoint of their own, the rest on ``cdr_webhook``),
then a full week of the health rollup for every endpoint of the ledger (a row per 5 minutes, as busy
endpoints leave it), and times what the pages send, through their own functions: the Endpoints page
(the state and backlog list, and the 24-hour trends), and one endpoint's detail (its series over an
hour, a day and a week, its backlog, its last events). Then what the rollup adds to recording an
attempt. Prints p50/p95/max; ``EXPLAIN (ANALYZE, BUFFERS)`` of each query goes to ``--plans``.
On demand only: never part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from typing import TYPE_CHECKING, Any

from bench.dataset import dataset, dataset_arguments
from bench.query_timer import EachStatementTimer
from bench.records import attempt, delivered_claims
from bench.stats import percentile
from cdr_webhook import ledger
from cdr_webhook.ledger import backlog, endpoints, events, health

if TYPE_CHECKING:
    import psycopg


def fill_rollup(conn: psycopg.Connection[Any]) -> int:
    """A week of 5-minute rollup rows for every endpoint of the ledger; return how many rows."""
    conn.execute("TRUNCATE cdr_webhook.endpoint_health")
    conn.execute(
        "INSERT INTO cdr_webhook.endpoint_health (endpoint, bucket, attempts, delivered, retried, failed, "
        "latency_hist, pickup_hist) "
        "SELECT e.endpoint, b, 60, 57, 2, 1, "
        "  array_fill(2, ARRAY[%(bins)s]), array_fill(1, ARRAY[%(bins)s]) "
        "FROM (SELECT DISTINCT endpoint FROM cdr_webhook.delivery) AS e, "
        "generate_series(date_bin('5 minutes', now() - interval '7 days', 'epoch'::timestamptz), now(), "
        "  interval '5 minutes') AS b",
        {"bins": health.BINS},
    )
    conn.execute("ANALYZE cdr_webhook.endpoint_health")
    row = conn.execute("SELECT count(*) FROM cdr_webhook.endpoint_health").fetchone()
    assert row is not None
    return row[0]


def measure(bench: EachStatementTimer) -> None:
    conn = bench.conn
    now = dt.datetime.now(dt.UTC)
    endpoint = "cdr_webhook_client_7"
    for _ in range(20):
        endpoints.pause(conn, endpoint, reason="bench", actor="bench")
        endpoints.resume(conn, endpoint, actor="bench")
    day = health.PERIODS["day"]

    def endpoints_page() -> list[Any]:
        return [endpoints.list_endpoints(conn), health.trends(conn, day, now=now)]

    bench.time("endpoints page: state and backlog (list_endpoints)", lambda: endpoints.list_endpoints(conn))
    bench.time("endpoints page: 24 h trends of every endpoint", lambda: health.trends(conn, day, now=now))
    bench.time("endpoints page: both (the page's queries)", endpoints_page)
    for name, period in health.PERIODS.items():
        bench.time(
            f"detail: {endpoint}'s series, last {name}",
            lambda period=period: health.series(conn, endpoint, period, now=now).points,
        )
    bench.time("detail: the endpoint's row", lambda: endpoints.list_endpoints(conn, endpoint=endpoint))
    bench.time("detail: backlog (queued, taken, retrying)", lambda: backlog.backlog(conn, endpoint))
    bench.time("detail: last 20 events", lambda: events.recent_events(conn, endpoint))
    bench.time("detail: backlog of cdr_webhook (250 clients)", lambda: backlog.backlog(conn, "cdr_webhook"))


def measure_writes(bench: EachStatementTimer, count: int = 500) -> None:
    """
    ``ledger.record_attempts`` with the rollup and without it (no rollup rows), each call committed as
    the operator's are: one attempt a call (a task of one CDR), and 50 a call (a chunk's batch).
    Last: it adds attempts to ``count`` ledger rows of the scratch database.
    """
    conn = bench.conn
    claims = delivered_claims(conn, count, endpoint="cdr_webhook_client_7")
    made = [attempt(claim, "delivered", 200, None, "ok", 7) for claim in claims]
    original = health.rollups
    for batch in (1, 50):
        calls = [made[i : i + batch] for i in range(0, len(made), batch)]
        timings: dict[str, list[float]] = {"with the health rollup": [], "without it": []}
        for _ in range(5):  # interleaved: the machine's load moves both alike
            for label in timings:
                if label == "without it":
                    health.rollups = lambda attempts: []  # type: ignore[assignment]
                try:
                    began = time.perf_counter()
                    for call in calls:
                        ledger.record_attempts(conn, call)
                    timings[label].append((time.perf_counter() - began) * 1000 / len(made))
                finally:
                    health.rollups = original  # type: ignore[assignment]
        for label, values in timings.items():
            name = f"write: {batch} attempt(s) a call, {label}"
            bench.rows.append((f"{name} (ms per attempt)", values, ""))
            print(f"  {name:<56} p50 {percentile(values, 50):8.3f} ms per attempt", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    dataset_arguments(parser, cdrs=5_000_000, repeat=20, plans="endpoint_health_plans.txt")
    args = parser.parse_args()

    with dataset(args) as (database, conn):
        began = time.perf_counter()
        rollup = fill_rollup(conn)
        print(f"rollup: {rollup} rows in {time.perf_counter() - began:.1f} s")
        sizes = conn.execute(
            "SELECT (SELECT count(*) FROM cdr_webhook.delivery), "
            "(SELECT count(DISTINCT endpoint) FROM cdr_webhook.delivery)"
        ).fetchone()
        assert sizes is not None
        print(f"{database}: ledger {sizes[0]} rows, {sizes[1]} endpoints, rollup {rollup} rows")
        bench = EachStatementTimer(conn, args.repeat, args.plans)
        measure(bench)
        measure_writes(bench)
        bench.table(f"{sizes[0]} ledger rows, {sizes[1]} endpoints, a week of rollup ({rollup} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
