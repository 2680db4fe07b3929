"""The Deliveries page's queries on a big ledger: each list filter, a deep page, the searches, completeness.

    PYTHONPATH=plugins .venv/bin/python -m bench.deliveries_page [--cdrs 1000000] [--repeat 20] \
        [--plans FILE] [--keep | --reuse NAME] [--dsn DSN]

Fills a scratch database with bench/selection_at_size.py's loader (N source CDRs over ``--days`` days
and ``--clients`` clients, a ledger row for nearly every one: mostly delivered, 1.5 % failed, 1 %
skipped), gives every failed delivery two recorded attempts, then times each query the page sends,
through the page's own functions, and prints p50/p95/max (``EXPLAIN (ANALYZE, BUFFERS)`` of each
goes to ``--plans``); then what step 6 adds to recording an attempt (``ledger.record_attempts`` with
and without its trigger and indexes). On demand only: never part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from typing import TYPE_CHECKING, Any

from bench.dataset import RELATION, dataset, dataset_arguments
from bench.query_timer import EachStatementTimer, QueryTimer
from bench.records import attempt, delivered_claims
from bench.stats import percentile
from cdr_webhook import ledger
from cdr_webhook.ledger import endpoints
from cdr_webhook.selection import source
from cdr_webhook.web import deliveries
from cdr_webhook.web.deliveries import Filters

if TYPE_CHECKING:
    import psycopg

PAGE = 50


def add_history(conn: psycopg.Connection[Any]) -> None:
    """Two recorded attempts (a 503, then the last one) for every failed delivery."""
    conn.execute(
        "INSERT INTO cdr_webhook.delivery_attempt (cdr_id, endpoint, attempt, status, http_status, error, "
        "run_id, map_index, at) "
        "SELECT cdr_id, endpoint, a, CASE a WHEN 1 THEN 'queued' ELSE status END, 503, 'HTTP 503', run_id, "
        "map_index, last_attempt_at FROM cdr_webhook.delivery, generate_series(1, 2) a "
        "WHERE status = 'failed' ON CONFLICT DO NOTHING"
    )
    conn.execute("ANALYZE cdr_webhook.delivery_attempt")


def measure(bench: QueryTimer) -> None:
    conn = bench.conn
    newest = conn.execute("SELECT max(cdr_created_at) FROM cdr_webhook.delivery").fetchone()[0]  # type: ignore[index]
    yesterday = dt.datetime.combine(newest.date() - dt.timedelta(days=1), dt.time(), dt.UTC)
    day = dt.timedelta(days=1)
    # A row 20,000 deep (the OFFSET here only finds where to start; the page itself never uses one).
    deep = conn.execute(
        "SELECT cdr_created_at, cdr_id, endpoint FROM cdr_webhook.delivery "
        "ORDER BY cdr_created_at DESC, cdr_id DESC, endpoint DESC OFFSET 20000 LIMIT 1"
    ).fetchone()
    assert deep is not None
    deep_cursor = deliveries.encode_cursor(*deep)
    failed = conn.execute(
        "SELECT cdr_id, endpoint FROM cdr_webhook.delivery WHERE status = 'failed' "
        "ORDER BY cdr_created_at DESC LIMIT 1"
    ).fetchone()
    assert failed is not None
    phone = conn.execute(
        "SELECT phone_number FROM cdr_webhook_source WHERE cdr_id = %s", (failed[0],)
    ).fetchone()[0]  # type: ignore[index]

    def page(filters: Filters, cursor: str | None = None) -> list[Any]:
        return deliveries.list_deliveries(conn, filters, cursor=cursor, limit=PAGE).rows

    bench.time("list: newest page, no filter", lambda: page(Filters()))
    bench.time("list: a page 20,000 rows deep (keyset)", lambda: page(Filters(), deep_cursor))
    bench.time("list: client 42", lambda: page(Filters(client_id=42)))
    bench.time("list: client 42, failed, yesterday", lambda: page(
        Filters(client_id=42, status="failed", start=yesterday, end=yesterday + day)))  # fmt: skip
    bench.time("list: failed", lambda: page(Filters(status="failed")))
    bench.time("list: delivered, yesterday", lambda: page(
        Filters(status="delivered", start=yesterday, end=yesterday + day)))  # fmt: skip
    bench.time("list: endpoint cdr_webhook_client_7", lambda: page(Filters(endpoint="cdr_webhook_client_7")))
    bench.time("list: endpoint cdr_webhook (250 clients)", lambda: page(Filters(endpoint="cdr_webhook")))
    bench.time("search: cdr_id", lambda: page(Filters(cdr_ids=(failed[0],))))
    bench.time(
        "search: phone number (source by phone, then ledger by key)",
        lambda: page(Filters(cdr_ids=(phone, *source.cdr_ids_by_phone(conn, RELATION, phone)))),
    )
    bench.time(
        "detail: the row and its attempts",
        lambda: [
            deliveries.get_delivery(conn, cdr_id=failed[0], endpoint=failed[1]),
            deliveries.attempts(conn, cdr_id=failed[0], endpoint=failed[1]),
        ],
    )
    today = newest.date()
    bench.time(
        "completeness: 7 days, every client",
        lambda: deliveries.completeness(
            conn, relation=RELATION, start=today - dt.timedelta(days=6), end=today + dt.timedelta(days=1)
        ),
        repeat=3,
    )
    bench.time(
        "completeness: 7 days, client 42",
        lambda: deliveries.completeness(
            conn, relation=RELATION, start=today - dt.timedelta(days=6), end=today + dt.timedelta(days=1),
            client_id=42,
        ),
    )  # fmt: skip
    bench.time("endpoints: state and backlog", lambda: endpoints.list_endpoints(conn))


_STEP_6_WRITE_PATH = (
    "DROP TRIGGER delivery_attempt_recorded ON cdr_webhook.delivery; "
    "DROP INDEX cdr_webhook.delivery_client_list_idx, cdr_webhook.delivery_endpoint_list_idx, "
    "cdr_webhook.delivery_status_list_idx"
)


def measure_writes(bench: QueryTimer, count: int = 500) -> None:
    """What step 6 adds to recording an attempt: ``count`` calls of ``ledger.record_attempts`` (one
    attempt each), with its trigger and indexes, then without them (dropped in the rolled-back
    transaction)."""
    conn = bench.conn
    claims = delivered_claims(conn, count)

    def record() -> int:
        for claim in claims:
            ledger.record_attempts(conn, [attempt(claim, "failed", 503, "HTTP 503", "busy", 7)])
        return len(claims)

    for label, before in (
        ("with step 6", None),
        ("without step 6's trigger and indexes", _STEP_6_WRITE_PATH),
    ):
        timings = []
        for _ in range(5):
            with conn.transaction(force_rollback=True):
                if before:
                    conn.execute(before)
                began = time.perf_counter()
                record()
                timings.append((time.perf_counter() - began) * 1000 / len(claims))
        bench.rows.append((f"write: one attempt recorded, {label}", timings, ""))
        print(
            f"  write: one attempt {label:<40} p50 {percentile(timings, 50):8.3f} ms per attempt", flush=True
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    dataset_arguments(parser, cdrs=1_000_000, repeat=20, plans="deliveries_page_plans.txt")
    args = parser.parse_args()

    with dataset(args) as (database, conn):
        add_history(conn)
        sizes = conn.execute(
            "SELECT (SELECT count(*) FROM dialer.cdr), (SELECT count(*) FROM cdr_webhook.delivery), "
            "(SELECT count(*) FROM cdr_webhook.delivery_attempt)"
        ).fetchone()
        assert sizes is not None
        print(f"{database}: source {sizes[0]} CDRs, ledger {sizes[1]} rows, {sizes[2]} attempt rows")
        bench = EachStatementTimer(conn, args.repeat, args.plans)
        measure(bench)
        measure_writes(bench)
        bench.table(f"N = {sizes[0]} source CDRs, {sizes[1]} ledger rows, pages of {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
