"""The demo: real PostgreSQL, real Airflow, a real receiver; prints what happened to every CDR.

    python -m demo        (scripts/demo does the set-up first)

Uses ``CDR_DATABASE_URL`` when set, else starts an embedded PostgreSQL under ``.demo/``. Exits 0 when
every demo CDR had its designed outcome.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from sqlalchemy.engine import make_url

from demo.connections import http_conn, postgres_conn
from demo.dialer import ROOT, Dialer, load_reference_schema
from demo.embedded import embedded_server
from demo.receiver import Receiver
from demo.stack import AirflowStack, metadata_dbname, sqlalchemy_url

#: The demo's state: its embedded PostgreSQL (the CDR and metadata databases), Airflow's logs,
#: ui.env (``CDR_DEMO_STATE``: the tests use one of their own).
STATE = Path(os.environ.get("CDR_DEMO_STATE", ROOT / ".demo"))
AIRFLOW_HOME = STATE / "airflow"
API_KEY = "demo-api-key-4c1f9e"
SIGNING_SECRET = "whsec_" + base64.b64encode(b"cdr-webhook-demo-signing-secret!").decode()


@dataclasses.dataclass(frozen=True)
class Expected:
    label: str
    status: str
    attempts: int
    script: tuple[int, ...] = ()


def main() -> int:
    started = time.monotonic()
    print("CDR webhook delivery: demo\n")
    if STATE.exists():
        shutil.rmtree(STATE)
    STATE.mkdir()
    dsn, stop_database = cdr_database()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            load_reference_schema(conn)
            window_start = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            expected = make_cdrs(Dialer(conn))
            print(f"2. Loaded the reference schema and {len(expected)} demo CDRs (sql/reference_schema.sql)")
            install_notify(dsn)
            with Receiver(secret=SIGNING_SECRET, api_key=API_KEY) as receiver:
                for cdr_id, want in expected.items():
                    if want.script:
                        receiver.script(cdr_id, want.script)
                print(f"3. Receiver listening at {receiver.url} (checks x-api-key and webhook-signature)")
                env = airflow_env(dsn, receiver.url)
                state = run_in_airflow(env, metadata_database(dsn), window_start, dt.datetime.now(dt.UTC))
                rows = ledger_rows(conn, list(expected))
                received = receiver.received()
        # With one CDR refused by the receiver, the run ends failed: that is the design.
        ok = report(expected, rows, received) and state == "failed"
    finally:
        stop_database()
    verdict = "as designed" if ok else "NOT as designed"
    print(f"\nDemo finished in {time.monotonic() - started:.0f} s: {verdict}.")
    print("\nTo try it live in the Airflow UI (the run, its logs, clear, backfill, the Deliveries page):")
    print("    scripts/demo-ui        then open http://127.0.0.1:8080/dags/cdr_webhook (docs/demo.md)")
    return 0 if ok else 1


def cdr_database() -> tuple[str, Any]:
    """Return the CDR database's conninfo and a function that stops what was started for it."""
    given = os.environ.get("CDR_DATABASE_URL")
    if given:
        print("1. CDR database: CDR_DATABASE_URL")
        return given, lambda: None
    server = embedded_server(STATE / "pgdata")
    with psycopg.connect(server.get_uri(), autocommit=True) as admin:
        version = admin.execute("SHOW server_version").fetchone()[0]
        admin.execute("CREATE DATABASE cdr_demo")
    print(f"1. CDR database: embedded PostgreSQL {version} in .demo/pgdata (no CDR_DATABASE_URL given)")
    return make_conninfo(server.get_uri(), dbname="cdr_demo"), server.cleanup


def install_notify(dsn: str) -> None:
    """Install the commit watcher's NOTIFY trigger on dialer.cdr with the package's CLI, as operators do."""
    command = ["-m", "cdr_webhook", "source", "install-notify", "dialer.cdr"]
    env = os.environ | {"PYTHONPATH": str(ROOT / "plugins"), "CDR_DATABASE_URL": dsn}
    done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"python {shlex.join(command)} failed:\n{done.stdout}{done.stderr}")
    print(f"   python {shlex.join(command)}: {done.stdout.strip()}")


def metadata_database(dsn: str) -> str:
    """
    Create Airflow's metadata database for the demo, fresh, beside the CDR database; return its URL.

    It is the CDR database's name with ``_airflow`` appended, on the same server and as the same user
    (who needs CREATEDB). A PostgreSQL one, as in production: the scheduler, the triggerer, the
    api-server, each task and the CLI's clears and backfills write to it at once.
    """
    name = metadata_dbname(dsn)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return sqlalchemy_url(make_conninfo(dsn, dbname=name))


def make_cdrs(dialer: Dialer) -> dict[str, Expected]:
    """Insert the demo CDRs, each built for one outcome; return what each should end as."""
    dialer.campaign(2, "Campaña de renovación – 電話")
    cdrs = {
        dialer.cdr(): Expected("answered call", "delivered", 1),
        dialer.cdr(callerid="{{ 7 * 7 }}"): Expected("Jinja-like caller id, sent verbatim", "delivered", 1),
        dialer.cdr(client_id=2, phone_number="+33612345678", phonebooks=("Clients Lyon",)): Expected(
            "client 2, unicode campaign name", "delivered", 1
        ),
        dialer.cdr(hangup_cause=None, hangup_cause_code=17, billed_duration=0, cost=Decimal("0")): Expected(
            "busy: hangup_cause filled from Q.850 17", "delivered", 1
        ),
        dialer.cdr(leg_type=2, amd_status=2): Expected("B-leg, answering machine", "delivered", 1),
        dialer.cdr(): Expected("receiver down once (503), retried", "delivered", 2, (503,)),
        dialer.cdr(): Expected("throttled once (429), retried", "delivered", 2, (429,)),
        dialer.cdr(): Expected("receiver rejects it (400): fails at once", "failed", 1, (400,)),
        dialer.cdr(cost=Decimal("NaN")): Expected("cost is NaN: cannot be mapped", "skipped", 0),
        infinite_date(dialer): Expected("call_date is 'infinity': only this CDR is skipped", "skipped", 0),
        dialer.cdr(client_id=3): Expected(
            "client 3's connection is malformed: its endpoint is held, the others deliver", "queued", 0
        ),
    }
    return cdrs


def infinite_date(dialer: Dialer) -> str:
    """A CDR whose call_date the database driver cannot load (a dialer bug); return its cdr_id."""
    cdr_id = dialer.cdr()
    dialer.conn.execute("UPDATE dialer.cdr SET call_date = 'infinity' WHERE id = %s::uuid", (cdr_id,))
    return cdr_id


def airflow_env(dsn: str, url: str) -> dict[str, str]:
    return os.environ | {
        # Scheduled runs stay out of the demo's way: the demo triggers one run over its own window.
        "AIRFLOW__CDR_WEBHOOK__SCHEDULE": "0 0 1 1 *",
        "AIRFLOW__CDR_WEBHOOK__RETRY_DELAY_SECONDS": "2",
        "AIRFLOW__CDR_WEBHOOK__MAX_RETRY_DELAY_SECONDS": "4",
        # The demo's receiver is on loopback, which the egress guard refuses unless allowed.
        "AIRFLOW__CDR_WEBHOOK__ALLOWED_NETWORKS": "127.0.0.1/32",
        "AIRFLOW_CONN_CDR_DB": postgres_conn(dsn),
        "AIRFLOW_CONN_CDR_WEBHOOK": http_conn(url, api_key=API_KEY, signing_secret=SIGNING_SECRET),
        # Client 3's own endpoint, misconfigured: leg_types must be a list.
        "AIRFLOW_CONN_CDR_WEBHOOK_CLIENT_3": http_conn(url, api_key=API_KEY, leg_types="1"),
    }


def run_in_airflow(env: dict[str, str], metadata: str, start: dt.datetime, end: dt.datetime) -> str:
    """Start Airflow, trigger one run over the demo window, wait for it, stop; return its state."""
    AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
    stack = AirflowStack(AIRFLOW_HOME, None, env, metadata=metadata)
    write_ui_env(stack.env)
    started = time.monotonic()
    stack.start()
    print(
        f"4. Airflow 3.3 up in {time.monotonic() - started:.0f} s: scheduler, dag-processor, triggerer, "
        f"api-server at {stack.base} (LocalExecutor; metadata in database "
        f"{make_url(metadata).database}, logs in .demo/airflow)"
    )
    try:
        stack.unpause()
        conf = {"window_start": start.isoformat(), "window_end": end.isoformat()}
        run_id = stack.trigger(conf=conf)
        print(f"5. Triggered run {run_id} with Params {json.dumps(conf)}")
        print("   (one mapped post_cdr task per CDR; retries wait 2 s, then 4 s)")
        state = stack.wait_run(run_id, timeout=300)
        print(f"   Run finished: {state} (one CDR is refused by the receiver, so the run fails)\n")
        return state
    finally:
        leftovers = stack.stop()
        if leftovers:
            print(f"   warning: Airflow processes outlived the stop: {leftovers}")


def ledger_rows(conn: psycopg.Connection[Any], cdr_ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = conn.execute(
        "SELECT cdr_id, status, attempts, http_status, error, latency_ms FROM cdr_webhook.delivery "
        "WHERE cdr_id = ANY(%s)",
        (cdr_ids,),
    ).fetchall()
    keys = ("status", "attempts", "http_status", "error", "latency_ms")
    return {row[0]: dict(zip(keys, row[1:], strict=True)) for row in rows}


def report(expected: dict[str, Expected], rows: dict[str, dict[str, Any]], received: list[Any]) -> bool:
    """Print the per-CDR table and return whether every CDR had its designed outcome."""
    header = f"{'cdr_id':<10} {'status':<9} {'tries':>5} {'http':>4}  {'as designed':<11} what / why"
    print(header)
    print("-" * len(header))
    all_ok = True
    for cdr_id, want in expected.items():
        row = rows.get(cdr_id, {})
        requests = [r for r in received if r.cdr_id == cdr_id]
        ok = row.get("status") == want.status and row.get("attempts") == want.attempts
        ok = ok and len(requests) == want.attempts and all(r.signature_ok for r in requests)
        ok = ok and len({r.headers.get("webhook-id") for r in requests}) <= 1
        note = want.label
        if row.get("error") and row.get("status") != "delivered":
            note += f": {row['error']}"
        if requests and requests[-1].answered == 200:
            payload = requests[-1].payload
            if "Jinja" in want.label:
                ok = ok and payload["callerid"] == "{{ 7 * 7 }}"
                note += f" (received callerid {payload['callerid']!r})"
            if "Q.850" in want.label:
                ok = ok and payload["hangup_cause"] == "USER_BUSY"
                note += f" (received {payload['hangup_cause']})"
        all_ok = all_ok and ok
        print(
            f"{cdr_id[:8] + '…':<10} {row.get('status', '-'):<9} {row.get('attempts', '-'):>5} "
            f"{row.get('http_status') or '-':>4}  {'yes' if ok else 'NO':<11} {note}"
        )
    signed = sum(1 for r in received if r.signature_ok)
    print(f"\nReceiver: {len(received)} POSTs, {signed} with a valid signature and the right x-api-key.")
    return all_ok


def write_ui_env(env: dict[str, str], state: Path = STATE) -> None:
    """
    Write what scripts/demo-ui needs to serve the UI on the demo's metadata and task logs, and the
    Deliveries page on its CDR database (``CDR_DATABASE_URL`` when the demo had one, else demo/ui.py
    starts the embedded one again) with its endpoint connections (the page's request preview).
    """
    wanted = (
        "AIRFLOW_HOME",
        "AIRFLOW__CORE__DAGS_FOLDER",
        "AIRFLOW__CORE__PLUGINS_FOLDER",
        "AIRFLOW__CORE__LOAD_EXAMPLES",
        "AIRFLOW__DATABASE__",
        "AIRFLOW__CDR_WEBHOOK__",
        "AIRFLOW_CONN_CDR_WEBHOOK",
        "CDR_DATABASE_URL",
    )
    keep = {key: value for key, value in env.items() if key.startswith(wanted)}
    # The demo's own run kept scheduled runs out of its way; the live UI has the default schedule
    # (every minute), which the scheduled runs and a backfill's runs follow.
    keep.pop("AIRFLOW__CDR_WEBHOOK__SCHEDULE", None)
    keep["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] = "True"
    keep["AIRFLOW__API__SECRET_KEY"] = uuid.uuid4().hex
    lines = [f"export {key}={shlex.quote(value)}" for key, value in sorted(keep.items())]
    # It holds the endpoints' keys and signing secrets: readable by the demo's user only.
    fd = os.open(state / "ui.env", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
