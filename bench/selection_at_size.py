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
import contextlib
import datetime as dt
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from bench.harness import server_dsn
from cdr_webhook import ledger
from cdr_webhook.ledger import endpoints, schema
from cdr_webhook.selection import source
from cdr_webhook.selection.routing import Route, client_conn_id
from cdr_webhook.settings import Settings
from cdr_webhook.watch.state import newest_query
from cdr_webhook.window import Scan, Window
from demo.dialer import load_reference_schema
from tests.ledger_records import attempt

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

RELATION = "cdr_webhook_source"
DEFAULT_ENDPOINT = "cdr_webhook"
LIVE_RUN = "scheduled__live"
TAIL = dt.timedelta(minutes=2)  # the newest CDRs, not in the ledger yet: what the next scan queues
CLAIM_TIMEOUT = 3600


class RecordingCursor(psycopg.Cursor[Any]):
    """Remembers every statement it runs while its connection's ``recorded`` is a list."""

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        recorded = getattr(self.connection, "recorded", None)
        if recorded is not None:
            recorded.append((query, params))
        return super().execute(query, params, **kwargs)


def fill(conn: psycopg.Connection[Any], args: argparse.Namespace) -> None:
    """Create the reference schema and the ledger, and fill both with set-based SQL."""
    load_reference_schema(conn)
    schema.migrate(conn)
    end = dt.datetime.now(dt.UTC).replace(microsecond=0)
    params = {
        "n": args.cdrs,
        "clients": args.clients,
        "endpoints": args.endpoints,
        "start": end - dt.timedelta(days=args.days),
        "step": dt.timedelta(days=args.days) / args.cdrs,
        "tail": TAIL,
        "end": end,
        "queued": args.queued,
        "per_day": args.cdrs // args.days,
    }
    steps = [
        (
            "clients, campaigns, phonebooks, contacts",
            [
                "INSERT INTO dialer.gateway (id, name) VALUES (1, 'sofia/gateway/carrier-eu')",
                "INSERT INTO dialer.client (id, name) "
                "SELECT c, 'Client ' || c FROM generate_series(1, %(clients)s) c",
                "INSERT INTO dialer.campaign (id, client_id, name, callerid, gateway_id) "
                "SELECT c, c, 'Winter renewals ' || c, '+442071838750', 1 "
                "FROM generate_series(1, %(clients)s) c",
                "INSERT INTO dialer.phonebook (id, client_id, name) "
                "SELECT b, (b + 1) / 2, 'Book ' || b FROM generate_series(1, 2 * %(clients)s) b",
                "INSERT INTO dialer.contact (id, client_id, phone_number) "
                "SELECT k, (k - 1) %% %(clients)s + 1, "
                "'+3465' || lpad(k::text, 7, '0') FROM generate_series(1, 200 * %(clients)s) k",
                "INSERT INTO dialer.phonebook_contact (phonebook_id, contact_id) "
                "SELECT 2 * ((k - 1) %% %(clients)s + 1) - b, k "
                "FROM generate_series(1, 200 * %(clients)s) k, "
                "generate_series(0, 1) b WHERE b = 1 OR k %% 2 = 0",
            ],
        ),
        (
            "call requests",
            [
                # Client c's contacts are c, c + clients, c + 2 * clients, ...
                "INSERT INTO dialer.callrequest (id, campaign_id, contact_id, created_at) "
                "SELECT md5('cr' || i)::uuid, c, c + %(clients)s * (i %% 200), "
                "%(start)s + (i - 1) * %(step)s "
                "FROM generate_series(1, %(n)s::bigint) i, "
                "LATERAL (SELECT (i * 7919) %% %(clients)s + 1 AS c) x",
            ],
        ),
        (
            "CDRs",
            [
                "INSERT INTO dialer.cdr (id, callrequest_id, call_id, leg_type, phone_number, gateway_id, "
                "amd_status, hangup_cause_code, cost, billed_duration, incremental_duration, call_date, "
                "created_at) "
                "SELECT md5('cdr' || i)::uuid, md5('cr' || i)::uuid, md5('call' || i), 1 + i %% 2, "
                "'+3465' || lpad((i %% 1000000)::text, 7, '0'), 1, 1, 16, 0.0525, 42, 60, "
                "t - interval '90 s', t "
                "FROM generate_series(1, %(n)s::bigint) i, "
                "LATERAL (SELECT %(start)s + (i - 1) * %(step)s AS t) x",
            ],
        ),
        (
            "ledger",
            [
                # Every CDR but the newest (the next scan's) and a few late commits of the last day has a row:
                # mostly delivered, some failed or skipped, the newest --queued ones queued.
                "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status, "
                "attempts, http_status, dag_id, run_id, map_index, created_at, claimed_at, "
                "last_attempt_at, delivered_at, updated_at) "
                "SELECT md5('cdr' || i)::uuid::text, "
                "CASE WHEN c <= %(endpoints)s THEN 'cdr_webhook_client_' || c ELSE 'cdr_webhook' END, "
                "c, t, s, "
                "CASE WHEN s = 'queued' THEN 0 ELSE 1 END, "
                "CASE s WHEN 'delivered' THEN 200 WHEN 'failed' THEN 503 END, "
                "CASE WHEN s <> 'queued' THEN 'cdr_webhook' END, "
                "CASE WHEN s <> 'queued' THEN 'scheduled__' || (i / 60) END, "
                "CASE WHEN s <> 'queued' THEN i %% 60 END, t, t, t, CASE WHEN s = 'delivered' THEN t END, t "
                "FROM generate_series(1, %(n)s::bigint) i, "
                "LATERAL (SELECT (i * 7919) %% %(clients)s + 1 AS c, %(start)s + (i - 1) * %(step)s AS t) x, "
                "LATERAL (SELECT CASE WHEN t >= %(end)s - %(tail)s - %(step)s * %(queued)s THEN 'queued' "
                "  WHEN i %% 67 = 0 THEN 'failed' WHEN i %% 101 = 0 THEN 'skipped' "
                "  ELSE 'delivered' END AS s) y "
                "WHERE t < %(end)s - %(tail)s AND NOT (i > %(n)s - %(per_day)s AND i %% 500 = 7)",
                "INSERT INTO cdr_webhook.run_selection (dag_id, run_id, request, selected_at) "
                "SELECT 'cdr_webhook', 'scheduled__' || r, '{\"mode\": \"scan\"}', "
                "%(start)s + r * 60 * %(step)s "
                "FROM generate_series(0, %(n)s / 60) r",
                "INSERT INTO cdr_webhook.run_selection (dag_id, run_id, request) "
                "VALUES ('cdr_webhook', 'scheduled__live', '{\"mode\": \"scan\"}')",
                # A live run owns the oldest queued rows; three endpoints are failing (throttled), one paused.
                "UPDATE cdr_webhook.delivery SET dag_id = 'cdr_webhook', run_id = 'scheduled__live', "
                "claimed_at = now(), updated_at = now() WHERE status = 'queued' AND cdr_created_at < "
                "%(end)s - %(tail)s - %(step)s * (%(queued)s - 500)",
                "INSERT INTO cdr_webhook.endpoint_state (endpoint, paused, failed_attempts) "
                "SELECT DISTINCT endpoint, endpoint = 'cdr_webhook_client_4', "
                "CASE WHEN endpoint IN ('cdr_webhook_client_1', 'cdr_webhook_client_2', "
                "'cdr_webhook_client_3') THEN 5 ELSE 0 END FROM cdr_webhook.delivery WHERE status = 'queued'",
                "INSERT INTO cdr_webhook.watermark "
                "(source_relation, created_at, scanned_from, reconciled_at) "
                "VALUES ('cdr_webhook_source', %(end)s - %(tail)s, %(start)s, %(end)s - interval '5 min')",
            ],
        ),
    ]
    conn.execute("SET session_replication_role = replica")  # no per-row foreign key checks while loading
    conn.execute("SET maintenance_work_mem = '512MB'")  # this session's index builds sort in memory
    with _indexes_built_after(conn, BULK_TABLES):
        for name, statements in steps:
            began = time.monotonic()
            for statement in statements:
                conn.execute(statement, params)
            print(f"  {name}: {time.monotonic() - began:.1f} s", flush=True)
        conn.execute("SET session_replication_role = DEFAULT")
    began = time.monotonic()
    conn.execute("VACUUM ANALYZE")
    print(f"  vacuum analyze: {time.monotonic() - began:.1f} s", flush=True)


#: The tables filled with millions of rows: their keys and indexes are built once they are full.
BULK_TABLES = ("dialer.callrequest", "dialer.cdr", "cdr_webhook.delivery")


@contextlib.contextmanager
def _indexes_built_after(conn: psycopg.Connection[Any], tables: tuple[str, ...]) -> Iterator[None]:
    """
    Drop the tables' constraints and indexes, and make them again, from their own definitions, on exit.

    Millions of random uuid keys inserted into a btree one by one evict each other's pages (the 5M
    load ran over 8 minutes that way); one sorted build per index takes seconds. The database ends
    with the same constraints and indexes (foreign keys validated again), only built from sorted input.
    """
    oids = [conn.execute("SELECT %s::regclass::oid", (table,)).fetchone()[0] for table in tables]  # type: ignore[index]
    constraints = conn.execute(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), contype FROM pg_constraint "
        "WHERE (conrelid = ANY(%(oids)s) AND contype IN ('p', 'u', 'f')) "
        "OR (confrelid = ANY(%(oids)s) AND contype = 'f') "
        "ORDER BY contype = 'f' DESC",
        {"oids": oids},
    ).fetchall()
    indexes = conn.execute(
        "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index AS i "
        "WHERE i.indrelid = ANY(%s) "
        "AND NOT EXISTS (SELECT 1 FROM pg_constraint AS c WHERE c.conindid = i.indexrelid)",
        (oids,),
    ).fetchall()
    for table, name, _, _ in constraints:  # foreign keys first, then what they reference
        conn.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.SQL(table), sql.Identifier(name))
        )
    for name, _ in indexes:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(name)))
    yield
    began = time.monotonic()
    for table, name, definition, _ in reversed(constraints):  # keys first, then the foreign keys
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                sql.SQL(table), sql.Identifier(name), sql.SQL(definition)
            )
        )
    for _, definition in indexes:
        conn.execute(definition)
    print(f"  keys and indexes built: {time.monotonic() - began:.1f} s", flush=True)


class Bench:
    def __init__(self, conn: psycopg.Connection[Any], repeat: int, plans: Path) -> None:
        self.conn = conn
        self.repeat = repeat
        self.plans = plans.open("w")
        self.rows: list[tuple[str, list[float], str]] = []

    def time(self, name: str, call: Callable[[], Any], *, repeat: int | None = None) -> Any:
        """Run ``call`` (rolled back) ``repeat`` times; record the timings and the plans of its SQL."""
        timings = []
        result = None
        for _ in range(repeat or self.repeat):
            with self.conn.transaction(force_rollback=True):
                began = time.perf_counter()
                result = call()
                timings.append((time.perf_counter() - began) * 1000)
        with self.recording() as recorded, self.conn.transaction(force_rollback=True):
            call()
        self.explain(name, recorded)
        size = len(result) if isinstance(result, list | dict) else result
        self.rows.append((name, timings, "" if size is None or not isinstance(size, int) else str(size)))
        p50, p95 = _percentile(timings, 50), _percentile(timings, 95)
        print(f"  {name:<58} p50 {p50:8.1f}  p95 {p95:8.1f}  max {max(timings):8.1f} ms", flush=True)
        return result

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[tuple[Any, Any]]]:
        recorded: list[tuple[Any, Any]] = []
        self.conn.recorded = recorded  # type: ignore[attr-defined]
        try:
            yield recorded
        finally:
            self.conn.recorded = None  # type: ignore[attr-defined]

    def explain(self, name: str, statements: list[tuple[Any, Any]]) -> None:
        """EXPLAIN ANALYZE the statements in one rolled-back transaction (a set_config is run as is)."""
        self.plans.write(f"\n===== {name} =====\n")
        with self.conn.transaction(force_rollback=True):
            for query, params in statements:
                text = query if isinstance(query, str) else query.as_string(self.conn)
                words = text.lstrip().upper()
                if words.startswith(("SELECT PG_ADVISORY", "SAVEPOINT", "RELEASE", "ROLLBACK")):
                    continue
                if "SET_CONFIG(" in words:  # without_jit: what the statements after it ran under
                    self.conn.execute(query, params)
                    self.plans.write(f"\n-- (run) {' '.join(text.split())}\n")
                    continue
                self.plans.write(f"\n-- {' '.join(text.split())[:400]}\n")
                explain = sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + sql.SQL(text)  # type: ignore[arg-type]
                for (line,) in self.conn.execute(explain, params).fetchall():
                    self.plans.write(line + "\n")
        self.plans.flush()

    def table(self, title: str) -> None:
        print(f"\n{title}\n")
        print("| query | p50 ms | p95 ms | max ms | rows |\n| --- | ---: | ---: | ---: | ---: |")
        for name, timings, size in self.rows:
            p50, p95 = _percentile(timings, 50), _percentile(timings, 95)
            print(f"| {name} | {p50:.1f} | {p95:.1f} | {max(timings):.1f} | {size} |")


def _percentile(values: list[float], pct: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def measure(bench: Bench, args: argparse.Namespace) -> None:
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

    def start_and_record() -> None:
        claim = ledger.start_attempt(
            conn,
            cdr_id=queued[0],
            endpoint=queued[1],
            dag_id="cdr_webhook",
            run_id="scheduled__bench",
            map_index=0,
            claim_timeout_seconds=CLAIM_TIMEOUT,
        )
        ledger.record_attempts(conn, [attempt(claim, "delivered", 200, None, "ok", 12)])

    bench.time(
        "post: ledger.start_attempt",
        lambda: ledger.start_attempt(
            conn,
            cdr_id=queued[0],
            endpoint=queued[1],
            dag_id="cdr_webhook",
            run_id="scheduled__bench",
            map_index=0,
            claim_timeout_seconds=CLAIM_TIMEOUT,
        ),
    )
    bench.time("post: start_attempt + record_attempts", start_and_record)
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


def dataset_arguments(parser: argparse.ArgumentParser, *, cdrs: int, repeat: int, plans: str) -> None:
    """The options of a benchmark over a loaded dataset (this one's, and bench/deliveries_page.py's)."""
    parser.add_argument("--cdrs", type=int, default=cdrs)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--endpoints", type=int, default=50, help="clients with an endpoint of their own")
    parser.add_argument("--queued", type=int, default=5000, help="the newest ledger rows, queued")
    parser.add_argument("--repeat", type=int, default=repeat)
    parser.add_argument("--plans", type=Path, default=Path(plans))
    parser.add_argument("--keep", action="store_true", help="keep the database (prints its name)")
    parser.add_argument("--reuse", help="measure this database (made by --keep) instead of a new one")
    parser.add_argument("--dsn", help="a PostgreSQL server to create the benchmark's database on")


@contextlib.contextmanager
def dataset(args: argparse.Namespace) -> Iterator[tuple[str, psycopg.Connection[Any]]]:
    """
    Yield a database filled by :func:`fill` (or ``--reuse``'s) at the latest schema, and a connection
    to it that records its statements; drop it afterwards unless ``--keep`` or ``--reuse``.
    """
    admin_dsn = server_dsn(args.dsn, Path("/nonexistent"))
    database = args.reuse or f"cdr_webhook_bench_{uuid.uuid4().hex[:8]}"
    if not args.reuse:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{database}"')
    try:
        # A run's connection sends each query once: no prepared statements (and no generic plans).
        with psycopg.connect(
            make_conninfo(admin_dsn, dbname=database),
            autocommit=True,
            cursor_factory=RecordingCursor,
            prepare_threshold=None,
        ) as conn:
            if not args.reuse:
                print(f"Filling {database}: {args.cdrs} CDRs over {args.days} days, {args.clients} clients")
                fill(conn, args)
            schema.migrate(conn)
            yield database, conn
    finally:
        if args.keep or args.reuse:
            print(f"Kept database {database}")
        else:
            with psycopg.connect(admin_dsn, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


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
        bench = Bench(conn, args.repeat, args.plans)
        measure(bench, args)
        bench.table(f"N = {sizes[0]} source CDRs, {sizes[1]} ledger rows")
        print(f"\nPlans: {args.plans}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
