"""What a ``post_cdr`` task process pays before and around its POST, next to a no-op task's.

    PYTHONPATH=plugins .venv/bin/python -m bench.profile_try [--repeat 7] [--dsn DSN]

Each measurement runs in a fresh interpreter that first imports what a task process inherits from
its LocalExecutor worker (forked from the scheduler: Airflow, the scheduler, the Task SDK's task
runner and supervisor, psycopg for a PostgreSQL metadata DB), then times, in order: importing the
DAG file (``runpy``, as the task runner's DagBag does), the modules ``execute`` imports on its first
call, ``load_settings()`` (cold and again), the endpoint's HTTP connection and hook, and one
connection to the CDR database (``cdr_webhook.db.connect``). ``-X importtime`` names the DAG file's
heaviest imports. Prints markdown tables (median and max over ``--repeat`` interpreters). On demand
only: never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.table import load_average
from demo.connections import http_conn, postgres_conn
from demo.dialer import ROOT

BASELINE = (
    "airflow.jobs.scheduler_job_runner",
    "airflow.executors.local_executor",
    "airflow.sdk.execution_time.task_runner",
    "airflow.sdk.execution_time.supervisor",
    "psycopg",  # the scheduler's metadata driver (PostgreSQL metadata), so its workers have it
)
DAG_FILES = {
    "cdr_webhook": ROOT / "dags" / "cdr_webhook_dag.py",
    "bench_noop": ROOT / "bench" / "dags" / "bench_noop_dag.py",
}
MARK = "--- baseline imported ---"

PROBE = """
import importlib, json, runpy, sys, time
for name in {baseline!r}:
    importlib.import_module(name)
print({mark!r}, file=sys.stderr, flush=True)
out = {{}}
def timed(key, fn):
    began = time.perf_counter()
    value = fn()
    out[key] = (time.perf_counter() - began) * 1000
    return value
before = set(sys.modules)
timed("import the DAG file", lambda: runpy.run_path({dag!r}, run_name="dag_file"))
out["modules the DAG file adds"] = len(set(sys.modules) - before)
if {execute!r}:
    timed(
        "execute's first-call imports",
        lambda: [importlib.import_module(m) for m in (
            "cdr_webhook.db", "cdr_webhook.ledger", "cdr_webhook.ledger.endpoints", "cdr_webhook.payload",
            "cdr_webhook.selection.source", "cdr_webhook.signing", "cdr_webhook.deliver.slots",
            "cdr_webhook.endpoint_config",
            "airflow.sdk.observability.stats",
        )],
    )
    from cdr_webhook.adapters import load_settings
    settings = timed("load_settings(), first", load_settings)
    timed("load_settings(), again", load_settings)
    from cdr_webhook.deliver.hook import CdrWebhookHook
    hook = timed(
        "hook and endpoint config (HTTP connection)",
        lambda: CdrWebhookHook("cdr_webhook", allowed_networks=settings.allowed_networks).endpoint,
    )
    from cdr_webhook.db import connect
    conn = timed("connect() to the CDR database (Airflow connection, libpq)", connect)
    timed("one round trip (SELECT 1)", lambda: conn.execute("SELECT 1").fetchone())
    conn.close()
print(json.dumps(out))
"""


def run_probe(dag: Path, execute: bool, env: dict[str, str], importtime: bool = False) -> tuple[dict, str]:
    code = PROBE.format(baseline=BASELINE, mark=MARK, dag=str(dag), execute=execute)
    args = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", code]
    result = subprocess.run(args, env=env, capture_output=True, text=True, check=False, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def heaviest_imports(stderr: str, top: int = 12) -> list[tuple[str, float]]:
    """The top-level imports after the baseline, by cumulative µs (``-X importtime``)."""
    lines = stderr.split(MARK, 1)[-1].splitlines()
    found = []
    for line in lines:
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.split(":", 1)[1].split("|"))
        if not cumulative.isdigit():
            continue
        depth = (len(name) - len(name.lstrip())) // 2
        if depth <= 1:
            found.append((name.strip(), int(cumulative) / 1000))
    return sorted(found, key=lambda item: -item[1])[:top]


def by_package(stderr: str, top: int = 10) -> list[tuple[str, int, float]]:
    """Modules and self time (ms) per top-level package imported after the baseline."""
    totals: dict[str, list[float]] = {}
    for line in stderr.split(MARK, 1)[-1].splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        own, _, name = (part.strip() for part in line.split(":", 1)[1].split("|"))
        if not own.isdigit():
            continue
        parts = name.split(".")
        package = ".".join(parts[:3]) if parts[0] == "airflow" else parts[0]
        entry = totals.setdefault(package, [0, 0.0])
        entry[0] += 1
        entry[1] += int(own) / 1000
    ranked = sorted(totals.items(), key=lambda item: -item[1][1])[:top]
    return [(package, int(count), ms) for package, (count, ms) in ranked]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_try", description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--dsn", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cdr-webhook-profile-", ignore_cleanup_errors=True) as home:
        measure(args, Path(home))
    return 0


def measure(args: argparse.Namespace, home: Path) -> None:
    """Each probe ``--repeat`` times in fresh interpreters (Airflow home ``home``); print the tables."""
    env = os.environ | {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CDR_WEBHOOK__ALLOWED_NETWORKS": "127.0.0.1/32",
        "AIRFLOW_CONN_CDR_DB": postgres_conn(args.dsn),
        "AIRFLOW_CONN_CDR_WEBHOOK": http_conn(
            "http://127.0.0.1:9/cdr-hook", signing_secret="whsec_" + "A" * 32
        ),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT / "bench" / "dags"), str(ROOT)]),
    }
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in DAG_FILES}
    for _ in range(args.repeat):
        for name, dag in DAG_FILES.items():
            out, _ = run_probe(dag, name == "cdr_webhook", env)
            for key, value in out.items():
                samples[name].setdefault(key, []).append(value)
    load = load_average()
    print(f"\nmedian / max over {args.repeat} fresh interpreters each (load average {load}):\n")
    print("| item | `post_cdr` (cdr_webhook) ms | no-op (bench_noop) ms |")
    print("| --- | ---: | ---: |")
    keys = list(samples["cdr_webhook"])
    for key in keys:
        cells = []
        for name in DAG_FILES:
            values = sorted(samples[name].get(key, []))
            cells.append(f"{values[len(values) // 2]:.0f} / {values[-1]:.0f}" if values else "—")
        print(f"| {key} | {cells[0]} | {cells[1]} |")
    for dag in DAG_FILES.values():
        _, stderr = run_probe(dag, False, env, importtime=True)
        print(f"\nHeaviest imports of {dag.name} beyond the worker's (cumulative ms, one `-X importtime`):\n")
        print("| module | ms |\n| --- | ---: |")
        for module, ms in heaviest_imports(stderr):
            print(f"| `{module}` | {ms:.0f} |")
        print(f"\nThe same import of {dag.name} by package (modules, self ms):\n")
        print("| package | modules | ms |\n| --- | ---: | ---: |")
        for package, count, ms in by_package(stderr):
            print(f"| `{package}` | {count} | {ms:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
