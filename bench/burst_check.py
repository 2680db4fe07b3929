"""A burst through Airflow against a plain keep-alive loop, measured as a user would, on two receivers.

    PYTHONPATH=plugins .venv/bin/python -m bench.burst_check [--cdrs 5000] [--receivers nginx python]
        [--repeat 2] [--delay-ms 0] [--dsn DSN] [--out FILE]

The second measurement beside ``bench.harness``, written apart from it: no harness receiver, no
harness loop. For each receiver in turn:

* **nginx**: a real nginx on 127.0.0.1 answering 200 to every POST (``apt-get install nginx``; the
  receiver is left out, saying so, when there is none); with ``--delay-ms`` it is left out (nginx
  does not delay an answer);
* **python**: a small threaded ``http.server`` in a process of its own, answering 200 (after
  ``--delay-ms``).

One Airflow (demo/stack.py: LocalExecutor, parallelism 8, PostgreSQL metadata, the repository's DAG
at its default settings; no triggerer and no schedule in the way, so the run asked for takes every
CDR), its ``cdr_webhook`` endpoint at the receiver. Each repeat commits ``--cdrs`` CDRs in one
transaction, triggers one run with the Params of their window, and times it from the REST API
(``start_date`` → ``end_date``, and ``queued_at`` → ``end_date``); right after it, the reference: one
process of its own POSTs as many bodies of the same size (a real CDR's signed body) through one
keep-alive ``requests.Session``, first request to last answer. The receiver counts what it got, so
every row says each CDR arrived. Prints a markdown table; on demand only, never in the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.server
import multiprocessing
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import psycopg
import requests

from bench.cli import add_report_arguments, publish
from bench.rest import run_dag, run_seconds
from bench.scratch import scratch_database, server_dsn
from bench.sending import signed_requests
from bench.stacks import SIGNING_SECRET, deployment_env, stop_stack
from bench.table import load_average, machine
from cdr_webhook.settings import Settings
from demo.dialer import Dialer, load_reference_schema
from demo.stack import AirflowStack, free_port

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from multiprocessing.sharedctypes import Synchronized

NGINX_CONF = """
worker_processes 1;
pid {home}/nginx.pid;
error_log {home}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log {home}/access.log;
    client_body_temp_path {home}/body;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok"; }}
    }}
}}
"""


class Receiver(Protocol):
    """A receiver in a process of its own: its ``url``, the requests it got so far, ``stop()``."""

    url: str

    def received(self) -> int: ...

    def stop(self) -> None: ...


class Nginx:
    def __init__(self, home: Path) -> None:
        self.home = home
        home.mkdir()
        port = free_port()
        (home / "nginx.conf").write_text(NGINX_CONF.format(home=home, port=port))
        self.process = subprocess.Popen(
            [shutil.which("nginx") or "nginx", "-c", str(home / "nginx.conf"), "-g", "daemon off;"],
            stderr=subprocess.PIPE,
        )
        self.url = f"http://127.0.0.1:{port}/hook"
        wait_listening(self.url, self.process)

    def received(self) -> int:
        path = self.home / "access.log"
        return sum(1 for line in path.open() if '"POST ' in line) if path.exists() else 0

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The headers and the body go out in two writes: without TCP_NODELAY the second waits for the
    # client's delayed ACK (about 40 ms a request on a kept-alive connection).
    disable_nagle_algorithm = True
    delay = 0.0
    count: Synchronized[int]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.delay:
            time.sleep(self.delay)
        with self.count.get_lock():
            self.count.value += 1
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def _serve(port: int, delay: float, count: Synchronized[int]) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # stopped by terminate(), quietly
    handler = type("Handler", (_Handler,), {"delay": delay, "count": count})
    _Server(("127.0.0.1", port), handler).serve_forever()


class PythonServer:
    def __init__(self, delay: float) -> None:
        port = free_port()
        self.count: Synchronized[int] = multiprocessing.Value("q", 0)  # type: ignore[assignment]
        self.process = multiprocessing.Process(target=_serve, args=(port, delay, self.count), daemon=True)
        self.process.start()
        self.url = f"http://127.0.0.1:{port}/hook"
        wait_listening(self.url, None)
        self.count.value = 0

    def received(self) -> int:
        return int(self.count.value)

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(timeout=30)


def wait_listening(url: str, process: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the receiver exited: {process.stderr.read() if process.stderr else ''}")
        try:
            requests.post(url, data=b"{}", timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens at {url}")


def keep_alive_loop(url: str, bodies: Sequence[tuple[bytes, dict[str, str]]]) -> tuple[float, int]:
    """POST each body in turn on one keep-alive session; return the seconds and the non-200 answers."""
    bad = 0
    with requests.Session() as session:
        began = time.perf_counter()
        for body, headers in bodies:
            bad += session.post(url, data=body, headers=headers, timeout=30).status_code != 200
        return time.perf_counter() - began, bad


def measure(
    stack: AirflowStack, conn: psycopg.Connection[Any], receiver: Receiver, n: int, delay: float = 0.0
) -> str:
    """
    One repeat: the Airflow run over ``n`` fresh CDRs, then its reference, a table row. The reference
    is the keep-alive loop; against a receiver that answers after ``delay``, the in-flight bound
    (the endpoint's in-flight limit ÷ the delay), which no sender of that many at once can pass.
    """
    dialer = Dialer(conn)
    start = dt.datetime.now(dt.UTC)
    with conn.transaction():
        ids = [dialer.cdr() for _ in range(n)]
    end = dt.datetime.now(dt.UTC) + dt.timedelta(microseconds=1)
    load = load_average()
    before = receiver.received()
    run = run_dag(stack, "cdr_webhook", {"window_start": start.isoformat(), "window_end": end.isoformat()})
    got = receiver.received() - before
    run_s, queued_s = run_seconds(run, "start_date"), run_seconds(run, "queued_at")
    if run_s is None or queued_s is None:
        raise RuntimeError(f"the run has no start or end: {run}")
    if delay:
        limit = Settings().max_in_flight_per_endpoint
        loop = limit / delay
        reference = f"bound {loop:,.0f}/s ({limit} in flight ÷ {delay * 1000:g} ms)"
    else:
        # Bodies as large as the CDRs' own (the first CDR's, signed), POSTed from a process of its own.
        bodies = signed_requests(conn, ids[:1], endpoint="cdr_webhook", secret=SIGNING_SECRET) * n
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            loop_s, bad = pool.apply(keep_alive_loop, (receiver.url, bodies))
        loop = n / loop_s
        reference = f"{loop_s:.2f} s, {loop:,.0f}/s ({bad} non-200)"
    airflow, queued = n / run_s, n / queued_s
    return (
        f"| {type(receiver).__name__.lower()} | {n:,} | {load} | run {run['state']}, {got:,} POSTs "
        f"| {run_s:.2f} s, {airflow:,.0f}/s | {queued_s:.2f} s, {queued:,.0f}/s "
        f"| {reference} | **{airflow / loop:.2f}×** ({queued / loop:.2f}×) |"
    )


def receivers(names: Sequence[str], home: Path, delay: float) -> Iterator[Receiver]:
    for name in names:
        if name == "nginx" and (delay or not shutil.which("nginx")):
            why = "it does not delay an answer" if delay else "no nginx on PATH (apt-get install nginx)"
            print(f"nginx left out: {why}", file=sys.stderr, flush=True)
            continue
        yield Nginx(home / "nginx") if name == "nginx" else PythonServer(delay)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.burst_check", description=__doc__.splitlines()[0])
    parser.add_argument("--cdrs", type=int, default=5000, help="CDRs a burst (default 5000)")
    parser.add_argument("--receivers", nargs="+", choices=("nginx", "python"), default=["nginx", "python"])
    parser.add_argument("--repeat", type=int, default=2, help="bursts per receiver (default 2)")
    parser.add_argument("--delay-ms", type=float, default=0, help="the Python receiver's delay per answer")
    add_report_arguments(parser)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cdr-webhook-burst-", ignore_cleanup_errors=True) as name:
        scratch = Path(name)
        admin = server_dsn(args.dsn, scratch)
        for receiver in receivers(args.receivers, scratch, args.delay_ms / 1000):
            stack = None
            try:
                with (
                    scratch_database(admin, "cdr_webhook_burst") as dsn,
                    psycopg.connect(dsn, autocommit=True) as conn,
                ):
                    load_reference_schema(conn)
                    env = deployment_env(dsn, receiver.url) | {
                        "AIRFLOW__CDR_WEBHOOK__SCHEDULE": "0 0 1 1 *",  # no scheduled run in the way
                        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "1.0",  # Airflow's default
                    }
                    home = scratch / f"airflow-{type(receiver).__name__.lower()}"
                    home.mkdir()
                    stack = AirflowStack(home, admin, env, triggerer=False).start()
                    stack.unpause()
                    measure(stack, conn, receiver, 200)  # a first run pays one-off costs: not counted
                    for _ in range(args.repeat):
                        rows.append(measure(stack, conn, receiver, args.cdrs, args.delay_ms / 1000))
                        print(rows[-1], flush=True)
            finally:
                stop_stack(stack)
                receiver.stop()
    head = (
        "| receiver | CDRs | load (1/5/15 min) | run | Airflow start→end | queued→end "
        "| reference: keep-alive loop, or in-flight bound | ratio (queued→end) |\n"
        "| --- | ---: | --- | --- | --- | --- | --- | --- |"
    )
    publish(
        f"{machine()}; `python -m bench.burst_check {' '.join(sys.argv[1:])}`\n\n{head}\n" + "\n".join(rows),
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
