"""The CPU a chunk task spends per CDR, next to a raw keep-alive POST loop's per POST, without Airflow.

    PYTHONPATH=plugins .venv/bin/python -m bench.profile_chunk [--cdrs 2000] [--in-flight 8] [--repeat 3]
        [--profile 25] [--endpoints 1] [--host localhost] [--delay-ms 50] [--dsn DSN]

One process plays the chunk task: ``CdrWebhookOperator.execute`` of a chunk of ``--cdrs`` CDRs (its
claim, bodies, slots, POSTs from its pool of senders, records and log lines) over a real PostgreSQL
ledger in a database of its own (dropped at the end), with the task process's logging (Airflow's
structlog set up as a task process's is, JSON lines to a file instead of the supervisor's socket).
The receiver (``demo/receiver.py``, answering at once) runs in a process of its own, so the CPU
counted here is the sender's only. Each measurement is ``time.process_time()`` (every thread of this
process) and the wall clock around the call, per CDR, the median over ``--repeat``; then the same
bodies and headers, built in advance, POSTed by one keep-alive ``requests.Session`` and by one
``http.client.HTTPConnection``. ``--profile N`` prints cProfile's N costliest functions of one more
chunk (cProfile sees the calling thread only; the senders' cost shows in a second table of one
sender's ``engine.post`` calls). ``--endpoints N`` spreads the CDRs over N endpoints (one task of
many endpoints, as a run of spread traffic maps: each endpoint its own connection, path and key on
the same receiver). CPU time does not grow with the load of other processes the way wall
time does; the load average is printed. On demand only: never part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import datetime as dt
import io
import multiprocessing
import os
import pstats
import shutil
import signal
import statistics
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

import psutil
import psycopg

from bench.scratch import scratch_database
from bench.sending import http_client_loop, requests_loop, signed_requests
from bench.stacks import SIGNING_SECRET
from bench.table import load_average
from cdr_webhook.ledger.schema import migrate
from demo.connections import http_conn, postgres_conn
from demo.dialer import Dialer, load_reference_schema
from demo.receiver import Receiver

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from multiprocessing.connection import Connection

ENDPOINT = "cdr_webhook_profile"
API_KEY = "bench-only-api-key"
RUN_ID = "manual__profile"


@dataclasses.dataclass
class TaskInstance:
    """What the operator reads of Airflow's RuntimeTaskInstance."""

    run_id: str = RUN_ID
    map_index: int = 0
    try_number: int = 1
    max_tries: int = 1
    dag_id: str = "cdr_webhook"


def _serve(pipe: Connection, delay_ms: float = 0) -> None:
    """The receiver's process: answer (after ``delay_ms``) until told to stop; say how many it received."""
    with Receiver(delay_ms=delay_ms) as receiver:
        pipe.send(receiver.url)
        pipe.recv()
        pipe.send(len(receiver.received()))


@contextlib.contextmanager
def receiver_process(delay_ms: float = 0) -> Iterator[Callable[[], str]]:
    """Yield the URL of a receiver in its own (spawned) process, answering after ``delay_ms``."""
    here, there = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(target=_serve, args=(there, delay_ms), daemon=True)
    process.start()
    url = here.recv()
    try:
        yield lambda: url
    finally:
        here.send("stop")
        here.recv()
        process.join(10)


def endpoint_of(index: int, endpoints: int) -> str:
    return ENDPOINT if endpoints == 1 else f"{ENDPOINT}_{index % endpoints}"


def make_cdrs(conn: psycopg.Connection[Any], n: int, endpoints: int = 1) -> list[str]:
    """``n`` CDRs in the source, each with a ledger row of its endpoint (dealt over ``endpoints``)."""
    dialer = Dialer(conn)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    with conn.transaction():
        ids = [dialer.cdr(created_at=start + dt.timedelta(milliseconds=i)) for i in range(n)]
    conn.execute(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status, dag_id, "
        "run_id, claimed_at) SELECT s.cdr_id::text, e.endpoint, s.client_id, s.created_at, 'queued', "
        "'cdr_webhook', %s, now() FROM cdr_webhook_source AS s "
        "JOIN unnest(%s::text[], %s::text[]) AS e(cdr_id, endpoint) ON e.cdr_id = s.cdr_id::text",
        (RUN_ID, ids, [endpoint_of(i, endpoints) for i in range(n)]),
    )
    return ids


def requeue(conn: psycopg.Connection[Any], ids: Sequence[str]) -> None:
    """Put the CDRs back as they were before their first try (and drop their attempt history)."""
    conn.execute("DELETE FROM cdr_webhook.delivery_attempt WHERE cdr_id = ANY(%s)", (list(ids),))
    conn.execute(
        "UPDATE cdr_webhook.delivery SET status = 'queued', attempts = 0, http_status = NULL, error = NULL, "
        "response_excerpt = NULL, latency_ms = NULL, delivered_at = NULL, last_attempt_at = NULL, "
        "run_id = %s, claimed_at = now() WHERE cdr_id = ANY(%s)",
        (RUN_ID, list(ids)),
    )
    conn.execute("UPDATE cdr_webhook.endpoint_state SET consecutive_failures = 0, paused = false")


def run_chunk(ids: Sequence[str], endpoints: int = 1) -> None:
    # Imported once main() has set AIRFLOW_HOME and its config: Airflow reads them at import.
    from cdr_webhook.deliver.operator import CdrWebhookOperator
    from cdr_webhook.settings import AUTO_SIZED

    groups: dict[str, list[str]] = {}
    for index, cdr_id in enumerate(ids):
        groups.setdefault(endpoint_of(index, endpoints), []).append(cdr_id)
    operator = CdrWebhookOperator(
        task_id="post_cdr",
        cdr_ids=[cdr_id for group in groups.values() for cdr_id in group],
        http_conn_id=next(iter(groups)),
        endpoints=[[endpoint, len(group)] for endpoint, group in groups.items()] if endpoints > 1 else None,
        cdrs_per_task=AUTO_SIZED,
        retries=0,
    )
    operator.execute({"ti": TaskInstance()})  # type: ignore[typeddict-item]


def server_cpu(conn: psycopg.Connection[Any]) -> Callable[[], float] | None:
    """
    A reading of the CDR database server's CPU seconds so far (every backend, the ones gone too, and
    its background writers), when the server runs on this machine and its processes can be read;
    else None. A backend that exits is counted in its postmaster's children times once reaped.
    """
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    try:
        postmaster = psutil.Process(row[0]).parent() if row else None
        if postmaster is None:
            return None
        postmaster.cpu_times()
    except psutil.Error:
        return None

    def seconds() -> float:
        own = postmaster.cpu_times()
        total = own.user + own.system + own.children_user + own.children_system
        for child in postmaster.children():
            with contextlib.suppress(psutil.Error):  # gone meanwhile: counted in children times
                times = child.cpu_times()
                total += times.user + times.system
        return total

    return seconds


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(CPU s, wall s) of ``fn()``: process_time counts every thread of this process."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def all_ok(statuses: Sequence[int]) -> None:
    """A raw loop counts only if the receiver took every POST."""
    bad = [status for status in statuses if status != 200]
    if bad:
        raise RuntimeError(f"the raw loop got {len(bad)} answers other than 200 (the first: HTTP {bad[0]})")


def profile_chunk(conn: psycopg.Connection[Any], ids: Sequence[str], top: int, endpoints: int = 1) -> str:
    """cProfile of one chunk: the calling thread's costs, then the senders' (``engine.post``)."""
    from cdr_webhook.deliver.engine import DeliveryEngine  # after AIRFLOW_HOME is set, as run_chunk's

    senders = cProfile.Profile()
    original = DeliveryEngine.post

    def post(self: Any, *args: Any, **kwargs: Any) -> Any:
        return senders.runcall(original, self, *args, **kwargs)

    requeue(conn, ids)
    caller = cProfile.Profile()
    DeliveryEngine.post = post  # type: ignore[method-assign]
    try:
        # One sender at a time: a cProfile.Profile is not to be shared by threads at once.
        with env({"AIRFLOW__CDR_WEBHOOK__MAX_IN_FLIGHT_PER_ENDPOINT": "1"}):
            caller.runcall(run_chunk, ids, endpoints)
    finally:
        DeliveryEngine.post = original  # type: ignore[method-assign]
    out = io.StringIO()
    for title, profile in (("calling thread", caller), ("sender (engine.post)", senders)):
        out.write(f"\n### {title}: top {top} by own time (cProfile, 1 sender)\n\n")
        stats = pstats.Stats(profile, stream=out)
        stats.sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


@contextlib.contextmanager
def env(values: dict[str, str]) -> Iterator[None]:
    from cdr_webhook.adapters import load_settings  # after AIRFLOW_HOME is set, as run_chunk's

    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    load_settings.cache_clear()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        load_settings.cache_clear()


def configure_task_logging(path: str) -> Any:
    """Airflow's logging as a task process sets it up (JSON lines out), to ``path``."""
    from airflow.sdk.log import configure_logging  # after AIRFLOW_HOME is set, as run_chunk's

    out = open(path, "wb")  # noqa: SIM115 - kept open for the process's life, as the task's socket is
    configure_logging(json_output=True, output=out, sending_to_supervisor=True)
    return out


def median_per_item(samples: Sequence[tuple[float, float]], n: int) -> tuple[float, float]:
    return (
        statistics.median(cpu for cpu, _ in samples) / n * 1000,
        statistics.median(wall for _, wall in samples) / n * 1000,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile_chunk", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--cdrs", type=int, default=2000)
    parser.add_argument("--endpoints", type=int, default=1, help="spread the CDRs over this many endpoints")
    parser.add_argument("--in-flight", type=int, default=8, help="max_in_flight_per_endpoint (default 8)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=0,
        help="the receiver answers each POST after this many ms; the chunk's rate is then also given "
        "against the bound (in-flight limit / delay)",
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print cProfile's top N")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="the endpoint URL's host: a name (localhost) makes every POST resolve it (default 127.0.0.1)",
    )
    parser.add_argument("--dsn", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, conn: psycopg.Connection[Any], url: str) -> None:
    """The chunk's and the raw loops' CPU and wall time per CDR (to the receiver's ``url``), as a table."""
    ids = make_cdrs(conn, args.cdrs, args.endpoints)
    run_chunk(ids[:50], args.endpoints)  # first-call imports and connections, not counted
    chunk, database = [], []
    server = server_cpu(conn)
    for _ in range(args.repeat):
        requeue(conn, ids)
        before = server() if server else 0.0
        chunk.append(timed(lambda: run_chunk(ids, args.endpoints)))
        database.append(server() - before if server else float("nan"))
    delivered = conn.execute(
        "SELECT count(*) FROM cdr_webhook.delivery WHERE status = 'delivered' AND cdr_id = ANY(%s)", (ids,)
    ).fetchone()
    raw: dict[str, list[tuple[float, float]]] = {}
    if not args.delay_ms:  # with a delay, the reference is the bound, not a loop
        bodies = signed_requests(conn, ids, endpoint=ENDPOINT, secret=SIGNING_SECRET, api_key=API_KEY)
        raw = {"requests.Session": [], "http.client": []}
        for _ in range(args.repeat):
            raw["requests.Session"].append(timed(lambda: all_ok(requests_loop(url, bodies))))
            raw["http.client"].append(timed(lambda: all_ok(http_client_loop(url, bodies))))
    load = load_average()
    print(
        f"\n{args.cdrs} CDRs to {args.host} ({args.endpoints} endpoint(s)), "
        f"in-flight limit {args.in_flight}, median of {args.repeat}, load "
        f"{load} (after); the chunk delivered {delivered[0] if delivered else 0} in its last try.\n"
    )
    print("| what | CPU ms per CDR | wall ms per CDR |\n| --- | ---: | ---: |")
    cpu, wall_chunk = median_per_item(chunk, args.cdrs)
    print(f"| chunk task (`CdrWebhookOperator.execute`) | {cpu:.3f} | {wall_chunk:.3f} |")
    db_ms = statistics.median(database) / args.cdrs * 1000
    print(f"| the CDR database server during the chunk (every PostgreSQL process) | {db_ms:.3f} | |")
    for name, samples in raw.items():
        cpu, wall = median_per_item(samples, args.cdrs)
        print(f"| raw keep-alive loop, `{name}` (bodies built in advance) | {cpu:.3f} | {wall:.3f} |")
    if args.delay_ms:
        bound = args.in_flight / (args.delay_ms / 1000)
        rate = 1000 / wall_chunk
        print(
            f"\nReceiver answering in {args.delay_ms:g} ms: the chunk sent {rate:.1f} CDR/s, "
            f"{rate / bound:.3f}x the bound ({args.in_flight} in flight / {args.delay_ms:g} ms = "
            f"{bound:.1f}/s)."
        )
    if args.profile:
        print(profile_chunk(conn, ids, args.profile, args.endpoints))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill: the scratch database is dropped too
    home = tempfile.mkdtemp(prefix="cdr-webhook-profile-chunk-")
    os.environ.update(
        {
            "AIRFLOW_HOME": home,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AIRFLOW__CDR_WEBHOOK__ALLOWED_NETWORKS": "127.0.0.1/32",
            "AIRFLOW__CDR_WEBHOOK__MAX_IN_FLIGHT_PER_ENDPOINT": str(args.in_flight),
        }
    )
    log_file = configure_task_logging(os.path.join(home, "task.log"))
    try:
        with scratch_database(args.dsn, "cdr_webhook_profile") as dsn, receiver_process(args.delay_ms) as url:
            with psycopg.connect(dsn, autocommit=True) as conn:
                load_reference_schema(conn)
                migrate(conn)
                os.environ["AIRFLOW_CONN_CDR_DB"] = postgres_conn(dsn)
                address = url().replace("127.0.0.1", args.host, 1)
                for index in range(args.endpoints):
                    name = endpoint_of(index, args.endpoints)
                    endpoint = http_conn(f"{address}/{name}", api_key=API_KEY, signing_secret=SIGNING_SECRET)
                    os.environ[f"AIRFLOW_CONN_{name.upper()}"] = endpoint
                measure(args, conn, url())
    finally:
        log_file.close()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
