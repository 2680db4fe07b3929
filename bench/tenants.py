"""Many customers at once: steady traffic spread over hundreds of endpoints, through a real Airflow.

    PYTHONPATH=plugins .venv/bin/python -m bench.tenants [--customers 200] [--rate 20] [--seconds 120]
        [--delay-ms 0] [--slow-ms 0] [--celery WORKERS] [--env NAME=VALUE ...] [--dsn DSN] [--out FILE]

One Airflow (demo/stack.py: LocalExecutor, api-server, scheduler, dag-processor and triggerer on
127.0.0.1) at the default settings, a receiver in this process, and ``--customers`` customers, each
with its own endpoint connection (``cdr_webhook_client_<n>``: its own path on the receiver and its
own ``x-api-key``). After the first scheduled run, CDRs are committed at ``--rate`` a second for
``--seconds``, each its own transaction, each for a customer drawn at random. ``--delay-ms`` is every
receiver's answer time; ``--slow-ms`` makes customer 1's endpoint answer that slowly (the others'
figures are then reported apart). ``--celery N`` runs the same load on CeleryExecutor with N
workers (demo/celery_stack.py; Redis at ``--redis``, 127.0.0.1:6379 by default).

It prints: delivered per second, commit→POST p50/p95/max (all, and without the slow customer), the
last POST after the traffic's end, each CDR POSTed once at its own customer's path with its own key,
the runs and the task shapes, and the backlog (committed − delivered) every 10 s. On demand only;
never part of the test suite, never asserted.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import platform
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from bench.cli import add_env_argument, add_report_arguments, publish
from bench.scratch import scratch_database, server_dsn
from bench.stacks import SIGNING_SECRET, deployment_env, extra_env, start_watching, stop_stack
from bench.stats import num, percentile
from demo.celery_stack import CeleryStack
from demo.connections import http_conn
from demo.dialer import Dialer, load_reference_schema
from demo.receiver import Receiver
from demo.stack import AirflowStack

if TYPE_CHECKING:
    from collections.abc import Sequence

SLOW_CUSTOMER = 1


def api_key(customer: int) -> str:
    return f"bench-key-{customer:04d}"


def endpoints_env(customers: int, fast: Receiver, slow: Receiver | None) -> dict[str, str]:
    env = {}
    for customer in range(1, customers + 1):
        receiver = slow if slow is not None and customer == SLOW_CUSTOMER else fast
        url = f"{receiver.url}/c{customer}"
        env[f"AIRFLOW_CONN_CDR_WEBHOOK_CLIENT_{customer}"] = http_conn(
            url, api_key=api_key(customer), signing_secret=SIGNING_SECRET
        )
    return env


def play(
    conn: psycopg.Connection[Any],
    customers: int,
    rate: float,
    seconds: float,
    committed: dict[str, tuple[int, float]],
) -> None:
    """Commit CDRs at ``rate`` a second for ``seconds``, customers at random, into ``committed``."""
    dialer = Dialer(conn)
    began = time.monotonic()
    n = 0
    while (elapsed := time.monotonic() - began) < seconds:
        due = began + n / rate
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        customer = random.randint(1, customers)
        cdr = dialer.cdr(client_id=customer)  # autocommit: each CDR its own transaction
        committed[cdr] = (customer, time.time())
        n += 1
    del elapsed


def sample_backlog(
    receivers: list[Receiver],
    committed: dict[str, tuple[int, float]],
    stop: threading.Event,
    out: list[tuple[float, int, int]],
    began: float,
) -> None:
    while not stop.wait(10):
        delivered = delivered_ids(receivers)
        keys = set(committed)
        out.append((time.time() - began, len(keys), len(keys - delivered)))


def report(
    args: argparse.Namespace,
    stack: AirflowStack,
    conn: psycopg.Connection[Any],
    receivers: list[Receiver],
    committed: dict[str, tuple[int, float]],
    traffic_end: float,
    backlog: list[tuple[float, int, int]],
) -> str:
    posts: dict[str, list[Any]] = collections.defaultdict(list)
    for receiver in receivers:
        for post in receiver.received():
            if post.cdr_id in committed:
                posts[post.cdr_id].append(post)
    delivered = [c for c in committed if any(200 <= p.answered < 300 for p in posts[c])]
    once = sum(1 for c in committed if len(posts[c]) == 1)
    own = sum(
        1
        for c, (customer, _) in committed.items()
        if posts[c]
        and all(
            p.path.endswith(f"/c{customer}") and p.headers.get("x-api-key") == api_key(customer)
            for p in posts[c]
        )
    )
    signed = sum(1 for c in committed if posts[c] and all(p.signature_ok for p in posts[c]))
    latency = {c: min(p.at for p in posts[c]) - at for c, (_, at) in committed.items() if posts[c]}
    others = [v for c, v in latency.items() if committed[c][0] != SLOW_CUSTOMER]
    last = max((min(p.at for p in posts[c]) for c in delivered), default=traffic_end)
    first_commit = min(at for _, at in committed.values())
    shapes = conn.execute(
        "SELECT count(*) FILTER (WHERE n = 1), count(*), max(n), max(e) FROM (SELECT count(*) AS n, "
        "count(DISTINCT endpoint) AS e FROM cdr_webhook.delivery WHERE cdr_id = ANY(%s) "
        "GROUP BY run_id, map_index) AS t",
        (list(committed),),
    ).fetchone()
    runs = collections.Counter(
        r["run_type"]
        for r in stack.runs(order_by="-run_after")
        if (r.get("queued_at") or "") >= time.strftime("%Y-%m-%dT%H:%M", time.gmtime(first_commit - 60))
    )

    def s(value: float | None) -> str:
        return num(value, ".1f")

    lines = [
        f"Machine: {platform.node()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} "
        f"(1 min) at the end; Airflow "
        + (f"CeleryExecutor, {args.celery} workers of {args.concurrency}" if args.celery else "LocalExecutor")
        + ", defaults"
        + (f"; {', '.join(args.env)}" if args.env else ""),
        "",
        "| customers | rate /s | s | CDRs | delivered | POSTed once | own endpoint & key | signed | "
        "delivered/s | commit→POST p50 s | p95 s | max s | p95 without the slow one s "
        "| last POST after traffic s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {args.customers} | {args.rate:g} | {args.seconds:g} | {len(committed)} | {len(delivered)} "
        f"| {once} | "
        f"{own} | {signed} | {len(delivered) / max(last - first_commit, 1e-9):.1f} | "
        f"{s(percentile(list(latency.values()), 50))} | {s(percentile(list(latency.values()), 95))} | "
        f"{s(max(latency.values(), default=None))} | "
        f"{s(percentile(others, 95)) if args.slow_ms else '-'} | {last - traffic_end:.1f} |",
        "",
        f"Tasks: {shapes[1]} ({shapes[0]} of one CDR; the largest {shapes[2]} CDRs, to at most {shapes[3]} "
        f"endpoints); runs started: {', '.join(f'{k} {v}' for k, v in sorted(runs.items()))}",
        "",
        "| s since the first commit | committed | not yet delivered |",
        "| --- | --- | --- |",
        *(f"| {t:.0f} | {sent} | {waiting} |" for t, sent, waiting in backlog),
    ]
    return "\n".join(lines)


def make_stack(args: argparse.Namespace, home: Path, admin_dsn: str, env: dict[str, str]) -> AirflowStack:
    if args.celery:
        return CeleryStack(
            home, admin_dsn, env, broker_url=args.redis, workers=args.celery, concurrency=args.concurrency
        )
    return AirflowStack(home, admin_dsn, env)


def delivered_ids(receivers: list[Receiver]) -> set[str]:
    """The CDRs some receiver answered with a 2xx."""
    return {r.cdr_id for receiver in receivers for r in receiver.received() if 200 <= r.answered < 300}


def drive(
    args: argparse.Namespace, stack: AirflowStack, conn: psycopg.Connection[Any], receivers: list[Receiver]
) -> str:
    """The traffic, the wait for its delivery (at most ``--drain`` s), and the report."""
    stop = threading.Event()
    backlog: list[tuple[float, int, int]] = []
    committed: dict[str, tuple[int, float]] = {}
    sampler = threading.Thread(
        target=sample_backlog, args=(receivers, committed, stop, backlog, time.time()), daemon=True
    )
    sampler.start()
    play(conn, args.customers, args.rate, args.seconds, committed)
    traffic_end = time.time()
    deadline = time.monotonic() + args.drain
    while time.monotonic() < deadline and not set(committed) <= delivered_ids(receivers):
        time.sleep(1)
    stop.set()
    return report(args, stack, conn, receivers, committed, traffic_end, backlog)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tenants", description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20, help="CDRs committed a second (default 20)")
    parser.add_argument("--seconds", type=float, default=120, help="how long the traffic lasts (default 120)")
    parser.add_argument("--delay-ms", type=float, default=0, help="every receiver's answer time")
    parser.add_argument("--slow-ms", type=float, default=0, help="customer 1's endpoint answers this slowly")
    parser.add_argument("--drain", type=float, default=600, help="most seconds to wait after the traffic")
    parser.add_argument("--celery", type=int, default=0, help="CeleryExecutor with this many workers")
    parser.add_argument("--concurrency", type=int, default=4, help="each Celery worker's task slots")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="the Celery broker")
    add_env_argument(parser)
    add_report_arguments(parser)
    args = parser.parse_args(argv)
    env_extra = extra_env(args.env)  # a malformed pair stops here, before anything starts
    with contextlib.ExitStack() as cleanup:
        scratch = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-tenants-")))
        admin_dsn = server_dsn(args.dsn, scratch)
        dsn = cleanup.enter_context(scratch_database(admin_dsn, "cdr_webhook_tenants"))
        conn = cleanup.enter_context(psycopg.connect(dsn, autocommit=True))
        fast = cleanup.enter_context(Receiver(secret=SIGNING_SECRET, delay_ms=args.delay_ms))
        slow = (
            cleanup.enter_context(Receiver(secret=SIGNING_SECRET, delay_ms=args.slow_ms))
            if args.slow_ms
            else None
        )
        receivers = [fast, *([slow] if slow else [])]
        load_reference_schema(conn)
        env = {
            **deployment_env(dsn, fast.url, page_limit=1000),
            **endpoints_env(args.customers, fast, slow),
            **env_extra,
        }
        (scratch / "airflow").mkdir()
        stack = None
        try:
            stack = start_watching(make_stack(args, scratch / "airflow", admin_dsn, env))
            print("Airflow up; traffic starts", flush=True)
            text = drive(args, stack, conn, receivers)
        finally:
            stop_stack(stack)
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
