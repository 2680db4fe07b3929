"""scripts/demo-ui: the demo, live: Airflow's whole stack on the demo's run, its receiver, its dialer.

    python -m demo.ui [--dial-every SECONDS]      (scripts/demo-ui; run scripts/demo first)

On the demo's state (``.demo``, or ``CDR_DEMO_STATE``: the tests use one of their own) it starts the
demo's CDR database again (the embedded PostgreSQL in ``.demo/pgdata``, or ``CDR_DATABASE_URL`` as
the demo was given it), defines the Airflow connection ``cdr_db`` to it in the demo's metadata
database (so Admin → Connections shows it), starts the demo's receiver on its endpoint's address
(printing each POST it gets), and runs Airflow as the demo did: api-server on 127.0.0.1:8080
(``PORT``), scheduler, dag-processor and triggerer, LocalExecutor, on the default schedule (every
minute). With ``--dial-every`` a dialer commits a CDR that often, for the commit watcher to pick up.
Ctrl-C (or SIGTERM) stops all of it and the database, and says if anything outlived the stop.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import make_conninfo
from sqlalchemy.engine import make_url

from demo.connections import postgres_conn
from demo.dialer import ROOT, Dialer
from demo.embedded import embedded_server
from demo.receiver import Receiver, request_line
from demo.stack import AirflowStack

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

STATE = ROOT / ".demo"
DEMO_DBNAME = "cdr_demo"
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
#: The endpoints the demo defined, all at its one receiver.
ENDPOINT_CONNS = ("AIRFLOW_CONN_CDR_WEBHOOK", "AIRFLOW_CONN_CDR_WEBHOOK_CLIENT_3")


def read_ui_env(path: Path) -> dict[str, str]:
    """The ``export NAME=value`` lines the demo wrote (:func:`demo.__main__.write_ui_env`)."""
    values = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            values[name] = value
    return values


def cdr_database(state: Path, env: dict[str, str]) -> tuple[str, Callable[[], Any]]:
    """The demo's CDR database, started again if it is the embedded one; and what stops it."""
    given = env.get("CDR_DATABASE_URL")
    if given:
        return given, lambda: None
    pgdata = state / "pgdata"
    if not pgdata.is_dir():
        raise SystemExit(f"No demo CDR database in {pgdata}: run scripts/demo first.")
    server = embedded_server(pgdata)
    return make_conninfo(server.get_uri(), dbname=DEMO_DBNAME), server.cleanup


def define_cdr_db(state: Path, env: dict[str, str], dsn: str) -> None:
    """Write ``cdr_db`` into the demo's metadata database (its address changes with each start)."""
    path = state / "ui-connections.json"
    path.write_text(json.dumps({"cdr_db": json.loads(postgres_conn(dsn))}))
    try:
        subprocess.run(
            [AIRFLOW, "connections", "import", "--overwrite", str(path)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"Could not define the connection cdr_db:\n{err.stdout}{err.stderr}") from None
    finally:
        path.unlink(missing_ok=True)  # it holds the database's password


def start_receiver(env: dict[str, str]) -> tuple[Receiver, dict[str, str]]:
    """
    Start the demo's receiver with the endpoint's key and signing secret, on the endpoint's address.

    The demo's receiver had a port of its own choosing; when another program holds it now, the
    receiver takes a free one and the endpoints' connections (for this run only) point there.
    Returns the receiver and the connection variables to run Airflow with.
    """
    conn = json.loads(env["AIRFLOW_CONN_CDR_WEBHOOK"])
    url = urlsplit(conn["host"])
    secret, api_key = conn["extra"].get("signing_secret"), conn.get("password")
    try:
        receiver = Receiver(secret=secret, api_key=api_key, port=url.port or 80)
    except OSError as err:
        print(f"   (port {url.port} is taken, {err.strerror}: the receiver listens on a free one instead)")
        receiver = Receiver(secret=secret, api_key=api_key)
    new = urlsplit(receiver.url)
    moved = {}
    for name in ENDPOINT_CONNS:
        if name in env:
            endpoint = json.loads(env[name])
            endpoint["host"] = urlunsplit(urlsplit(endpoint["host"])._replace(netloc=new.netloc))
            moved[name] = json.dumps(endpoint)
    return receiver.start(), moved


def print_requests(receiver: Receiver, stopped: threading.Event) -> None:
    """Print each request the receiver gets, as ``python -m demo.receiver`` does, until stopped."""
    shown = 0
    while not stopped.wait(0.5):
        received = receiver.received()
        for request in received[shown:]:
            print(f"receiver: {request_line(request)}", flush=True)
        shown = len(received)


def dial(dsn: str, every: float, stopped: threading.Event) -> None:
    """Commit one CDR (client 1, answered) every ``every`` seconds until stopped."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        dialer = Dialer(conn)
        while not stopped.wait(every):
            print(f"dialer: committed CDR {dialer.cdr()}", flush=True)


def demo_minutes(dsn: str) -> tuple[str, str] | None:
    """The first and last minute (UTC, ISO 8601) in which the demo's CDRs were created, or None."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT date_trunc('minute', min(cdr_created_at)), date_trunc('minute', max(cdr_created_at)) "
            "FROM cdr_webhook.delivery"
        ).fetchone()
    if row is None or row[0] is None:
        return None
    return row[0].astimezone(dt.UTC).isoformat(), row[1].astimezone(dt.UTC).isoformat()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a SIGTERM stops everything as Ctrl-C does


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo-ui", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dial-every",
        type=float,
        default=0,
        metavar="SECONDS",
        help="commit a new CDR this often, for the commit watcher to pick up (default: no dialer)",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    # Ctrl-C stops it even when it was started where SIGINT is ignored (a shell's background job, a
    # CI runner's nohup): Python installs its handler only when SIGINT was not ignored at start.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    state = Path(os.environ.get("CDR_DEMO_STATE", STATE))
    if not (state / "ui.env").is_file():
        print("No demo data yet: run scripts/demo first.", file=sys.stderr)
        return 1
    port = int(os.environ.get("PORT", "8080"))
    env = read_ui_env(state / "ui.env")
    stopped = threading.Event()
    threads: list[threading.Thread] = []
    receiver = stack = None
    print("CDR webhook delivery: the live demo (Ctrl-C stops all of it)\n", flush=True)
    dsn, stop_database = cdr_database(state, env)
    try:
        embedded = f"embedded PostgreSQL in {state / 'pgdata'}"
        print(f"CDR database: {'CDR_DATABASE_URL' if env.get('CDR_DATABASE_URL') else embedded}", flush=True)
        define_cdr_db(state, os.environ | env, dsn)
        receiver, endpoints = start_receiver(env)
        print(
            f"Receiver:     {receiver.url} (endpoints cdr_webhook and cdr_webhook_client_3; checks x-api-key "
            "and verifies each signature; answers 200 to every CDR; prints each POST below)",
            flush=True,
        )
        threads.append(threading.Thread(target=print_requests, args=(receiver, stopped), daemon=True))
        threads[-1].start()
        home = Path(env["AIRFLOW_HOME"])
        # The UI and the Deliveries page call Airflow's REST API at this address.
        metadata = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]  # the demo's (demo/__main__.py)
        stack = AirflowStack(home, None, env | endpoints, port=port, metadata=metadata)
        started = time.monotonic()
        print("Airflow:      starting (api-server, scheduler, dag-processor, triggerer) ...", flush=True)
        stack.start()
        stack.unpause()
        took = time.monotonic() - started
        database = make_url(metadata).database
        print(f"Airflow 3.3 up in {took:.0f} s, LocalExecutor, metadata database {database}, logs in {home}:")
        print(f"  api-server     {stack.base}   log {home / 'api-server.log'}")
        schedule = env.get("AIRFLOW__CDR_WEBHOOK__SCHEDULE", "* * * * *")  # the default (settings.py)
        print(f"  scheduler      runs cdr_webhook, schedule {schedule!r}   log {home / 'scheduler.log'}")
        print(f"  dag-processor  parses dags/   log {home / 'dag-processor.log'}")
        print(f"  triggerer      the commit watcher   log {home / 'triggerer.log'}")
        print(f"\nAirflow UI:      {stack.base}/dags/cdr_webhook")
        print(f"Deliveries page: {stack.base}/plugin/cdr-deliveries (Browse → CDR deliveries)")
        minutes = demo_minutes(dsn)
        if minutes:
            print(
                f"Backfill the minutes of its CDRs so far: source {state / 'ui.env'}, then\n"
                "  airflow backfill create --dag-id cdr_webhook \\\n"
                f"    --from-date {minutes[0]} --to-date {minutes[1]} \\\n"
                """    --reprocess-behavior completed --dag-run-conf '{"policy": "all"}'"""
            )
        if args.dial_every > 0:
            threads.append(threading.Thread(target=dial, args=(dsn, args.dial_every, stopped), daemon=True))
            threads[-1].start()
            print(f"Dialer:          commits a CDR every {args.dial_every:g} s")
        print("The three workflows to try: docs/demo.md#try-the-three-workflows\n", flush=True)
        while True:
            for name, process in stack.processes.items():
                if process.poll() is not None:
                    print(f"airflow {name} exited ({process.returncode}): {stack.log_tail(name, 1500)}")
                    return 1
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nStopping ...", flush=True)
        return 0
    finally:
        stopped.set()
        for thread in threads:
            thread.join(timeout=5)
        if stack is not None:
            leftovers = stack.stop()
            if leftovers:
                print(f"warning: Airflow processes outlived the stop and were killed: {leftovers}")
        if receiver is not None:
            receiver.stop()
        stop_database()
        print("Stopped: Airflow, the receiver and the CDR database.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
