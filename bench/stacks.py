"""An Airflow started for a benchmark (demo/stack.py's), its endpoints' connections, and its teardown."""

from __future__ import annotations

import compileall
import os
import shutil
import sys
import time
from typing import TYPE_CHECKING

from demo.connections import http_conn, postgres_conn
from demo.dialer import ROOT
from demo.stack import AirflowStack

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

SIGNING_SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a bench-only secret, not a real one
CDR_DAG = ROOT / "dags" / "cdr_webhook_dag.py"
#: The harness's DAGs folder: the project's DAG beside the bench-only ones (bench/dags/).
BENCH_DAG_FILES = (
    CDR_DAG,
    *(
        ROOT / "bench" / "dags" / name
        for name in ("bench_noop_dag.py", "bench_noop_deferred_dag.py", "bench_triggers.py", "bench_shape.py")
    ),
)
BENCH_DAGS = ("cdr_webhook", "bench_noop", "bench_noop_deferred")


def deployment_env(dsn: str, receiver_url: str, *, page_limit: int | None = None) -> dict[str, str]:
    """The CDR database and the default endpoint (the receiver, signed) of every benchmark's Airflow."""
    env = {
        "AIRFLOW_CONN_CDR_DB": postgres_conn(dsn),
        "AIRFLOW_CONN_CDR_WEBHOOK": http_conn(receiver_url, signing_secret=SIGNING_SECRET),
        "AIRFLOW__CDR_WEBHOOK__ALLOWED_NETWORKS": "127.0.0.1/32",
    }
    if page_limit:  # the runs' list read in one page
        env["AIRFLOW__API__MAXIMUM_PAGE_LIMIT"] = str(page_limit)
    return env


def extra_env(pairs: Sequence[str]) -> dict[str, str]:
    """``NAME=VALUE`` pairs as a mapping; a pair without ``=`` is an error naming it."""
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--env {pair!r}: expected NAME=VALUE")
        env[name] = value
    return env


def build_dags_folder(folder: Path) -> Path:
    """The harness's DAGs folder, its bytecode compiled as scripts/bootstrap and the image do theirs."""
    folder.mkdir(parents=True)
    for path in BENCH_DAG_FILES:
        shutil.copy(path, folder / path.name)
    compileall.compile_dir(folder, quiet=1)
    return folder


def start_bench_stack(
    home: Path, pg_server: str | None, env: dict[str, str], *, triggerer: bool = True
) -> AirflowStack:
    """An Airflow over the harness's DAGs folder (``AIRFLOW__CORE__DAGS_FOLDER``), each DAG unpaused."""
    home.mkdir(parents=True)
    # The triggerer imports triggers by classpath; the DAGs folder, where the bench's own triggers
    # are, is not on its sys.path unless its environment says so.
    path = os.pathsep.join([env["AIRFLOW__CORE__DAGS_FOLDER"], str(ROOT)])
    stack = AirflowStack(home, pg_server, env | {"PYTHONPATH": path}, triggerer=triggerer)
    began = time.monotonic()
    try:
        stack.start()
        for dag_id in BENCH_DAGS:
            wait_dag(stack, dag_id)
            stack.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
    except BaseException:
        stop_stack(stack)
        raise
    print(f"Airflow up in {time.monotonic() - began:.1f} s ({home})", flush=True)
    return stack


def start_watching(stack: AirflowStack) -> AirflowStack:
    """Start an Airflow as a user's: ``cdr_webhook`` unpaused, returned once its first scheduled run is
    done and the triggerer watches the source (new CDRs then start runs of their own)."""
    try:
        stack.start()
        stack.unpause()
        wait_first_run(stack)
    except BaseException:
        stop_stack(stack)
        raise
    return stack


def wait_dag(stack: AirflowStack, dag_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while stack.api("GET", f"/dags/{dag_id}", expect=None).get("dag_id") != dag_id:
        if time.monotonic() > deadline:
            raise TimeoutError(f"DAG {dag_id} not parsed after {timeout:.0f} s")
        time.sleep(1)


def wait_first_run(stack: AirflowStack, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["state"] == "success" for r in stack.runs(run_type="scheduled")):
            if "Watching cdr_webhook_source" in stack.log_tail("triggerer", 1_000_000):
                return
        time.sleep(1)
    raise TimeoutError("no scheduled run, or no watcher, after the start")


def stop_stack(stack: AirflowStack | None) -> None:
    """Stop the Airflow (if it started) and drop its metadata; name what outlived the stop."""
    if stack is None:
        return
    leftovers = stack.stop()
    stack.drop_metadata()
    if leftovers:
        print(f"processes that outlived the stop (killed): {leftovers}", file=sys.stderr)
