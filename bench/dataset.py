"""The loaded dataset the query benchmarks measure: millions of source CDRs and ledger rows, made with
set-based SQL in a scratch database (or ``--reuse``'s), at the latest schema."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from bench.scratch import create_database, drop_database, server_dsn
from cdr_webhook.ledger import schema
from demo.dialer import load_reference_schema

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator

RELATION = "cdr_webhook_source"
TAIL = dt.timedelta(minutes=2)  # the newest CDRs, not in the ledger yet: what the next scan queues


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
    with indexes_built_after(conn, BULK_TABLES):
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
def indexes_built_after(conn: psycopg.Connection[Any], tables: tuple[str, ...]) -> Iterator[None]:
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


def dataset_arguments(parser: argparse.ArgumentParser, *, cdrs: int, repeat: int, plans: str) -> None:
    """The options of the benchmarks over a loaded dataset (selection_at_size, deliveries_page, ...)."""
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
    database = args.reuse or create_database(admin_dsn, "cdr_webhook_bench")
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
            drop_database(admin_dsn, database)
