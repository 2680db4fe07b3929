"""The CPU a chunk task spends per CDR, next to a raw keep-alive POST loop's per POST, without Airflow.

    .venv/bin/python -m bench.profile_chunk [--cdrs 2000] [--in-flight 8] [--repeat 3] [--profile 25]
        [--host localhost] [--dsn DSN]

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
sender's ``engine.post`` calls). CPU time does not grow with the load of other processes the way wall
time does; the load average is printed. On demand only: never part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import datetime as dt
import http.client
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
import urllib.parse
import uuid
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.conninfo import make_conninfo

from demo.connections import http_conn, postgres_conn
from demo.dialer import ROOT, Dialer, load_reference_schema

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from multiprocessing.connection import Connection

ENDPOINT = "cdr_webhook_profile"
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a bench-only secret, not a real one
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


def _serve(pipe: Connection) -> None:
    """The receiver's process: answer at once until told to stop; send back how many it received."""
    from demo.receiver import Receiver

    with Receiver() as receiver:
        pipe.send(receiver.url)
        pipe.recv()
        pipe.send(len(receiver.received()))


@contextlib.contextmanager
def receiver_process() -> Iterator[Callable[[], str]]:
    """Yield the URL of a receiver in its own (spawned) process."""
    here, there = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(target=_serve, args=(there,), daemon=True)
    process.start()
    url = here.recv()
    try:
        yield lambda: url
    finally:
        here.send("stop")
        here.recv()
        process.join(10)


@contextlib.contextmanager
def scratch_database(server: str) -> Iterator[str]:
    name = f"cdr_webhook_profile_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(server, dbname=name)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_cdrs(conn: psycopg.Connection[Any], n: int) -> list[str]:
    """``n`` CDRs in the source, each with a ledger row of the endpoint."""
    dialer = Dialer(conn)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    with conn.transaction():
        ids = [dialer.cdr(created_at=start + dt.timedelta(milliseconds=i)) for i in range(n)]
    conn.execute(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status, dag_id, "
        "run_id, claimed_at) SELECT cdr_id::text, %s, client_id, created_at, 'queued', 'cdr_webhook', %s, "
        "now() FROM cdr_webhook_source WHERE cdr_id::text = ANY(%s)",
        (ENDPOINT, RUN_ID, ids),
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


def run_chunk(ids: Sequence[str]) -> None:
    from cdr_webhook.deliver.operator import CdrWebhookOperator

    operator = CdrWebhookOperator(
        task_id="post_cdr", cdr_ids=list(ids), http_conn_id=ENDPOINT, cdrs_per_task=len(ids), retries=0
    )
    operator.execute({"ti": TaskInstance()})  # type: ignore[typeddict-item]


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(CPU s, wall s) of ``fn()``: process_time counts every thread of this process."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def prepared(conn: psycopg.Connection[Any], ids: Sequence[str]) -> list[tuple[bytes, dict[str, str]]]:
    """The CDRs' bodies and signed headers, built as a chunk builds them."""
    from cdr_webhook.payload import build_body
    from cdr_webhook.selection.source import fetch_rows
    from cdr_webhook.signing import build_headers, webhook_id

    created = dict(conn.execute("SELECT cdr_id::text, created_at FROM cdr_webhook_source"))
    rows = fetch_rows(conn, "cdr_webhook_source", [(cdr_id, created[cdr_id]) for cdr_id in ids])
    out = []
    for cdr_id in ids:
        body = build_body(cdr_id, rows[cdr_id], "cdr_webhook_source")
        headers = build_headers(
            msg_id=webhook_id(cdr_id, ENDPOINT),
            timestamp=int(time.time()),
            body=body,
            api_key=API_KEY,
            signing_secrets=(SECRET,),
        )
        out.append((body, headers))
    return out


def requests_loop(url: str, requests_: Sequence[tuple[bytes, dict[str, str]]]) -> None:
    import requests

    with requests.Session() as session:
        session.trust_env = False
        for body, headers in requests_:
            session.post(url, data=body, headers=headers, timeout=30).raise_for_status()


def http_client_loop(url: str, requests_: Sequence[tuple[bytes, dict[str, str]]]) -> None:
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        for body, headers in requests_:
            conn.request("POST", parsed.path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
    finally:
        conn.close()


def profile_chunk(conn: psycopg.Connection[Any], ids: Sequence[str], top: int) -> str:
    """cProfile of one chunk: the calling thread's costs, then the senders' (``engine.post``)."""
    from cdr_webhook.deliver.engine import DeliveryEngine

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
            caller.runcall(run_chunk, ids)
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
    from cdr_webhook.settings import load_settings

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
    from airflow.sdk.log import configure_logging

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
    parser.add_argument("--in-flight", type=int, default=8, help="max_in_flight_per_endpoint (default 8)")
    parser.add_argument("--repeat", type=int, default=3)
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
    ids = make_cdrs(conn, args.cdrs)
    run_chunk(ids[:50])  # first-call imports and connections, not counted
    chunk = []
    for _ in range(args.repeat):
        requeue(conn, ids)
        chunk.append(timed(lambda: run_chunk(ids)))
    delivered = conn.execute(
        "SELECT count(*) FROM cdr_webhook.delivery WHERE status = 'delivered' AND cdr_id = ANY(%s)", (ids,)
    ).fetchone()
    bodies = prepared(conn, ids)
    raw: dict[str, list[tuple[float, float]]] = {"requests.Session": [], "http.client": []}
    for _ in range(args.repeat):
        raw["requests.Session"].append(timed(lambda: requests_loop(url, bodies)))
        raw["http.client"].append(timed(lambda: http_client_loop(url, bodies)))
    load = "/".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"\n{args.cdrs} CDRs to {args.host}, in-flight limit {args.in_flight}, median of {args.repeat}, load "
        f"{load} (after); the chunk delivered {delivered[0] if delivered else 0} in its last try.\n"
    )
    print("| what | CPU ms per CDR | wall ms per CDR |\n| --- | ---: | ---: |")
    cpu, wall = median_per_item(chunk, args.cdrs)
    print(f"| chunk task (`CdrWebhookOperator.execute`) | {cpu:.3f} | {wall:.3f} |")
    for name, samples in raw.items():
        cpu, wall = median_per_item(samples, args.cdrs)
        print(f"| raw keep-alive loop, `{name}` (bodies built in advance) | {cpu:.3f} | {wall:.3f} |")
    if args.profile:
        print(profile_chunk(conn, ids, args.profile))


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
    sys.path.insert(0, str(ROOT / "plugins"))
    from cdr_webhook.ledger.schema import migrate

    log_file = configure_task_logging(os.path.join(home, "task.log"))
    try:
        with scratch_database(args.dsn) as dsn, receiver_process() as url:
            with psycopg.connect(dsn, autocommit=True) as conn:
                load_reference_schema(conn)
                migrate(conn)
                os.environ["AIRFLOW_CONN_CDR_DB"] = postgres_conn(dsn)
                address = url().replace("127.0.0.1", args.host, 1)
                endpoint = http_conn(address, api_key=API_KEY, signing_secret=SECRET)
                os.environ[f"AIRFLOW_CONN_{ENDPOINT.upper()}"] = endpoint
                measure(args, conn, url())
    finally:
        log_file.close()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
