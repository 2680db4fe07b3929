"""Selection at size: the select step's and the POST task's queries over millions of CDRs and ledger rows.

    PYTHONPATH=plugins .venv/bin/python -m bench.selection_at_size [--cdrs 5000000] [--repeat 30] \
        [--plans FILE] [--without-index] [--keep | --reuse NAME] [--dsn DSN]

Creates a scratch database with the reference dialer schema, fills it with set-based SQL (N source
CDRs over ``--days`` days and ``--clients`` clients, a ledger row for nearly every one of them), then
times every query a run makes, through the project's own functions, and prints p50/p95/max per query.
``EXPLAIN (ANALYZE, BUFFERS)`` of the SQL each function sent goes to ``--plans``. Writes run in
transactions that are rolled back, so every repetition measures the same thing. The tables' keys and
indexes are built once they are full (5,000,000 CDRs and ledger rows load in about 2 minutes).
``--keep`` keeps the database and ``--reuse NAME`` measures an existing one again (the schema is
migrated first, so a new index step is measured on the same data, and the ledger is vacuumed:
earlier runs leave dead rows). On demand only: never part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from typing import Any

from bench.dataset import RELATION, TAIL, dataset, dataset_arguments
from bench.query_timer import QueryTimer
from bench.records import attempt
from cdr_webhook import ledger
from cdr_webhook.ledger import endpoints, schema
from cdr_webhook.routing import Route, client_conn_id
from cdr_webhook.selection import source
from cdr_webhook.settings import Settings
from cdr_webhook.watch.state import newest_query
from cdr_webhook.window import Scan, Window

DEFAULT_ENDPOINT = "cdr_webhook"
LIVE_RUN = "scheduled__live"
CLAIM_TIMEOUT = 3600


def measure(bench: QueryTimer, args: argparse.Namespace) -> None:
    conn = bench.conn
    conn.execute(
        "UPDATE cdr_webhook.delivery SET updated_at = now() WHERE run_id = %s AND status = 'queued'",
        (LIVE_RUN,),
    )  # the live run's claims are fresh whenever this runs
    row = conn.execute("SELECT max(created_at), min(created_at), count(*) FROM dialer.cdr").fetchone()
    assert row is not None, "no CDRs: run without --reuse first"
    assert row[0] is not None, "no CDRs: run without --reuse first"
    end = row[0] + dt.timedelta(microseconds=1)
    span, cdrs = row[0] - row[1], row[2]  # of the database measured (--reuse: not the options')
    clients = [r[0] for r in conn.execute("SELECT id FROM dialer.client")]
    routes = {c: Route(client_conn_id(c) if c <= args.endpoints else DEFAULT_ENDPOINT) for c in clients}
    paused = sorted(endpoints.paused_endpoints(conn))
    throttled = {endpoint: 8 for endpoint in endpoints.failing_endpoints(conn)}
    scan = Scan(start=end - TAIL, end=end - TAIL + dt.timedelta(minutes=1))
    reconcile_start, reconcile_end = end - dt.timedelta(hours=24), end - TAIL
    hour = Window(start=end - dt.timedelta(hours=3), end=end - dt.timedelta(hours=2), policy="failed")
    queued = conn.execute(
        "SELECT cdr_id, endpoint, cdr_created_at FROM cdr_webhook.delivery "
        "WHERE status = 'queued' AND run_id IS NULL ORDER BY cdr_created_at DESC LIMIT 1"
    ).fetchone()
    assert queued is not None
    one_cdr = [(queued[0], queued[2])]
    oldest = conn.execute("SELECT min(cdr_created_at) FROM cdr_webhook.delivery").fetchone()[0]  # type: ignore[index]
    claim_args = {"dag_id": "cdr_webhook", "run_id": "scheduled__bench", "limit": 500}

    print(f"\nTimings ({bench.repeat} repetitions each, writes rolled back)\n", flush=True)
    bench.time(
        "scan: source.distinct_clients (1 min)",
        lambda: source.distinct_clients(conn, RELATION, start=scan.start, end=scan.end),
    )
    bench.time(
        "scan: ledger.enqueue_new (1 min)",
        lambda: ledger.enqueue_new(conn, relation=RELATION, routes=routes, start=scan.start, end=scan.end),
    )

    def time_claims(label: str) -> None:
        """The claim of 500, without throttles and with the failing endpoints throttled."""
        for name, throttles in (("no throttles", {}), (f"{len(throttled)} throttled", throttled)):
            bench.time(
                f"{label}: ledger.assign 500, {name}",
                lambda throttles=throttles: ledger.assign(
                    conn,
                    **claim_args,
                    claim_timeout_seconds=CLAIM_TIMEOUT,
                    paused_endpoints=paused,
                    throttled=throttles,
                ),
            )

    time_claims("claim")
    bench.time(
        "claim: ledger.assign 500, window of 1 h",
        lambda: ledger.assign(
            conn,
            **claim_args,
            claim_timeout_seconds=CLAIM_TIMEOUT,
            paused_endpoints=paused,
            window=Window(start=end - dt.timedelta(hours=1), end=end),
        ),
    )
    # A reconciliation checks one slice of the window (the first of a sweep here: the cursor is unset).
    per_run = Settings().reconcile_cdrs_per_run
    piece = bench.time(
        "reconcile: ledger.reconcile_slice (next slice)",
        lambda: ledger.reconcile_slice(
            conn, RELATION, start=reconcile_start, before=reconcile_end, max_cdrs=per_run
        ),
    )
    assert piece is not None
    in_slice = conn.execute(
        "SELECT (SELECT count(*) FROM cdr_webhook.delivery WHERE cdr_created_at >= %(low)s "
        "AND cdr_created_at < %(high)s), (SELECT count(*) FROM dialer.cdr WHERE created_at >= %(low)s "
        "AND created_at < %(high)s)",
        {"low": piece[0], "high": piece[1]},
    ).fetchone()
    assert in_slice is not None
    print(
        f"  (the slice: [{piece[0]}, {piece[1]}), {piece[1] - piece[0]} of the window's 24 h, "
        f"{in_slice[0]} ledger rows, {in_slice[1]} source CDRs)",
        flush=True,
    )
    bench.time(
        f"reconcile: ledger.late_clients (slice of {per_run:,})",
        lambda: ledger.late_clients(conn, relation=RELATION, start=piece[0], end=piece[1]),
    )
    bench.time(
        f"reconcile: ledger.enqueue_new (slice of {per_run:,})",
        lambda: ledger.enqueue_new(
            conn, relation=RELATION, routes=routes, start=piece[0], end=piece[1], parallel=False
        ),
    )
    bench.time(
        "window: ledger.finished_endpoints (failed, 1 h)",
        lambda: ledger.finished_endpoints(conn, window=hour, statuses=("failed",)),
    )
    bench.time(
        "window: ledger.requeue (failed, 1 h)",
        lambda: ledger.requeue(conn, window=hour, statuses=("failed",)),
    )
    bench.time(
        "clear: ledger.owned_claims", lambda: ledger.owned_claims(conn, dag_id="cdr_webhook", run_id=LIVE_RUN)
    )
    bench.time(
        "watch: newest created_at, nothing newer",
        lambda: conn.execute(newest_query(RELATION, True), {"covered": end}).fetchone(),
    )
    bench.time(
        "watch: newest created_at, new CDRs waiting",
        lambda: conn.execute(newest_query(RELATION, True), {"covered": end - TAIL}).fetchone(),
    )
    bench.time("log: ledger.queued_backlog", lambda: ledger.queued_backlog(conn))
    bench.time("post: source.fetch_rows (1 CDR)", lambda: source.fetch_rows(conn, RELATION, one_cdr))

    def start_one() -> Any:
        return ledger.start_attempts(
            conn,
            cdr_ids=[queued[0]],
            endpoint=queued[1],
            dag_id="cdr_webhook",
            run_id="scheduled__bench",
            map_index=0,
            claim_timeout_seconds=CLAIM_TIMEOUT,
        )

    def start_and_record() -> None:
        [claim], _ = start_one()
        ledger.record_attempts(conn, [attempt(claim, "delivered", 200, None, "ok", 12)])

    bench.time("post: ledger.start_attempts (1 CDR)", start_one)
    bench.time("post: start_attempts + record_attempts", start_and_record)
    bench.time("cli: endpoints.list_endpoints", lambda: endpoints.list_endpoints(conn))
    bench.time(
        "retention: ledger.prune (10 min of CDRs)",
        lambda: ledger.prune(conn, before=oldest + dt.timedelta(minutes=10)),
    )
    bench.time("retention: ledger.prune (nothing due)", lambda: ledger.prune(conn, before=oldest))

    if args.backlog:
        # The case: a big backlog across every endpoint. Made in a transaction rolled back after.
        with conn.transaction(force_rollback=True):
            moved = conn.execute(
                "UPDATE cdr_webhook.delivery SET status = 'queued', dag_id = NULL, run_id = NULL "
                "WHERE cdr_created_at >= %s AND status = 'delivered'",
                (end - TAIL - span * args.backlog / cdrs,),
            ).rowcount
            conn.execute("ANALYZE cdr_webhook.delivery")
            n = conn.execute("SELECT count(*) FROM cdr_webhook.delivery WHERE status = 'queued'").fetchone()
            print(
                f"\nWith a backlog: {moved} rows made queued, {n[0] if n else 0} queued in all\n", flush=True
            )
            time_claims("claim (backlog)")
            bench.time("log (backlog): ledger.queued_backlog", lambda: ledger.queued_backlog(conn))
            bench.time("cli (backlog): endpoints.list_endpoints", lambda: endpoints.list_endpoints(conn))

    if args.without_index:
        with conn.transaction(force_rollback=True):
            conn.execute("DROP INDEX dialer.cdr_created_at_idx")
            print("\nWithout the source's created_at index (dropped in a transaction rolled back)\n")
            bench.time(
                "no index: source.distinct_clients (1 min)",
                lambda: source.distinct_clients(conn, RELATION, start=scan.start, end=scan.end),
                repeat=3,
            )
            bench.time(
                "no index: ledger.enqueue_new (1 min)",
                lambda: ledger.enqueue_new(
                    conn, relation=RELATION, routes=routes, start=scan.start, end=scan.end
                ),
                repeat=3,
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    dataset_arguments(parser, cdrs=5_000_000, repeat=30, plans="selection_at_size_plans.txt")
    parser.add_argument("--backlog", type=int, default=100_000, help="then measure the claim with this many")
    parser.add_argument("--without-index", action="store_true", help="also time the scan without it")
    args = parser.parse_args()

    with dataset(args) as (database, conn):
        if args.reuse:  # the dead rows of earlier runs' rolled-back writes gone, as after a fresh load
            began = time.monotonic()
            conn.execute("VACUUM ANALYZE cdr_webhook.delivery")
            print(f"  vacuum analyze of the ledger: {time.monotonic() - began:.1f} s", flush=True)
        sizes = conn.execute(
            "SELECT (SELECT count(*) FROM dialer.cdr), (SELECT count(*) FROM cdr_webhook.delivery), "
            "(SELECT count(*) FROM cdr_webhook.delivery WHERE status = 'queued'), "
            "(SELECT count(DISTINCT endpoint) FROM cdr_webhook.delivery)"
        ).fetchone()
        assert sizes is not None
        print(
            f"{database}: source {sizes[0]} CDRs, ledger {sizes[1]} rows, {sizes[2]} queued, "
            f"{sizes[3]} endpoints; schema version {schema.current_version(conn)}"
        )
        bench = QueryTimer(conn, args.repeat, args.plans)
        measure(bench, args)
        bench.table(f"N = {sizes[0]} source CDRs, {sizes[1]} ledger rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
