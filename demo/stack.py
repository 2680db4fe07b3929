"""A real Airflow on 127.0.0.1: scheduler, dag-processor, triggerer and api-server, LocalExecutor.

(The demo, the tests and the benchmarks.) The triggerer runs the commit watcher (cdr_webhook.watch),
which starts a run seconds after new CDRs are committed; without it the schedule still delivers.

The metadata DB is a database of its own on a PostgreSQL server, or SQLite in the Airflow home.
Components are driven the way a user drives them: the REST API (``/api/v2``) and the ``airflow``
CLI. Every process runs in a session of its own, so teardown ends each one with what it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

import psutil
import psycopg
import requests
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from demo.dialer import ROOT

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def jwt_secret() -> str:
    """A key for the api-server's tokens of the length PyJWT asks for: 64 bytes for HS512, Airflow's
    algorithm for a shared secret (a shorter one makes it warn, InsecureKeyLengthWarning)."""
    return secrets.token_urlsafe(64)  # 64 random bytes, 86 characters


def sqlalchemy_url(dsn: str) -> str:
    """Return the SQLAlchemy URL (psycopg 3 driver) of a libpq conninfo."""
    params = conninfo_to_dict(dsn)
    user = params.get("user", "postgres")
    password = f":{params['password']}" if params.get("password") else ""
    host = params.get("host", "")
    database = params.get("dbname", "postgres")
    if host.startswith("/"):  # a Unix socket directory (the embedded server)
        return f"postgresql+psycopg://{user}{password}@/{database}?host={host}"
    port = params.get("port", "5432")
    return f"postgresql+psycopg://{user}{password}@{host}:{port}/{database}"


def metadata_dbname(dsn: str) -> str:
    """The demo's Airflow metadata database: its CDR database's name with ``_airflow`` appended."""
    return f"{conninfo_to_dict(dsn).get('dbname', 'postgres')}_airflow"


def running_in(sessions: set[int]) -> list[psutil.Process]:
    """Return the live processes of these sessions.

    Zombies are left out: they have exited, and only their parent (or an init that reaps, which
    some containers' PID 1 is not) can remove them from the process table.
    """
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(proc.pid) in sessions:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def end_sessions(sessions: set[int], grace: float = 10) -> list[str]:
    """Give what still runs in these sessions ``grace`` seconds to exit; kill and return the rest."""
    deadline = time.monotonic() + grace
    while (survivors := running_in(sessions)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in survivors:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return [f"{proc.pid} {' '.join(proc.info['cmdline'] or [])}" for proc in survivors]


class AirflowStack:
    """Starts, drives and stops one Airflow deployment."""

    def __init__(
        self,
        home: Path,
        pg_server: str | None,
        env: Mapping[str, str],
        *,
        login: tuple[str, str] | None = None,
        triggerer: bool = True,
        port: int | None = None,
        python: str = sys.executable,
        metadata: str | None = None,
    ) -> None:
        """
        :param pg_server: the PostgreSQL to create the metadata DB on; None: ``metadata``, else
            SQLite in ``home``.
        :param metadata: the SQLAlchemy URL of a metadata database that exists already (the demo's,
            which outlives this stack); only with ``pg_server`` None.
        :param login: username and password the REST calls authenticate with (a deployment whose
            auth manager does not make everyone an admin); None: no credentials.
        :param triggerer: start the triggerer (False: a deployment without one, where only the
            schedule delivers).
        :param python: the interpreter whose Airflow runs (another virtualenv's: an installed package).
        :param port: the api-server's port (None: a free one).
        """
        self.python = python
        self.home = home
        self.components = COMPONENTS if triggerer else tuple(c for c in COMPONENTS if c != "triggerer")
        self.login = login
        self._token: str | None = None
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.meta_db = f"airflow_meta_{uuid.uuid4().hex[:10]}"
        self._pg_server = pg_server
        if pg_server:
            metadata = sqlalchemy_url(make_conninfo(pg_server, dbname=self.meta_db))
        elif not metadata:
            # SQLite (the harness's --metadata sqlite) takes one writer at a time: another waits for
            # it up to this timeout; a writer that would deadlock with another fails at once.
            metadata = f"sqlite:///{home}/airflow.db?timeout=60"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.env = os.environ | {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.base,
            "AIRFLOW__API__SECRET_KEY": uuid.uuid4().hex,
            "AIRFLOW__API_AUTH__JWT_SECRET": jwt_secret(),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            **env,
        }

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 180) -> AirflowStack:
        if self._pg_server:
            with psycopg.connect(self._pg_server, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{self.meta_db}"')
        self.airflow("db", "migrate")
        for component in self.components:
            self.spawn(component, component)
        self._wait_healthy(timeout)
        return self

    def spawn(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``airflow <args>`` as component ``name``, in a session of its own, logging to ``name.log``.

        :param env: Variables added to the deployment's environment for this process only.
        """
        with (self.home / f"{name}.log").open("wb") as log:
            self.processes[name] = subprocess.Popen(
                [self.python, "-m", "airflow", *args],
                env=self.env | dict(env or {}),
                cwd=self.home,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.processes[name]

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            for component, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"airflow {component} exited: {self.log_tail(component)}")
            try:
                health = requests.get(f"{self.base}/api/v2/monitor/health", timeout=5).json()
                dag = requests.get(
                    f"{self.base}/api/v2/dags/cdr_webhook", timeout=5, headers=self.auth_headers()
                )
                last = (health, dag.status_code)
                if (
                    health["scheduler"]["status"] == "healthy"
                    and (health.get("dag_processor") or {}).get("status") == "healthy"
                    and (
                        "triggerer" not in self.components
                        or (health.get("triggerer") or {}).get("status") == "healthy"
                    )
                    and dag.status_code == 200
                ):
                    return
            except (requests.RequestException, ValueError, KeyError) as err:
                last = err
            time.sleep(1)
        raise TimeoutError(f"Airflow did not become healthy in {timeout:.0f} s: {last}")

    def restart(self, component: str, timeout: float = 180) -> list[str]:
        """Restart one component as an operator does: SIGTERM to its session, then start it again.

        What of its session outlives 30 s is killed and returned. The old log is kept as
        ``<component>.<n>.log``; returns once the deployment is healthy again.
        """
        self._end_session(component, signal.SIGTERM)
        leftovers = end_sessions({self.processes[component].pid})
        self.spawn(component, component)
        self._wait_healthy(timeout)
        return leftovers

    def _end_session(self, name: str, signum: signal.Signals) -> None:
        """Send ``signum`` to the process group of ``name``, wait for it and keep its log aside."""
        process = self.processes[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self.keep_log(name)

    def keep_log(self, name: str) -> None:
        """Move ``<name>.log`` aside to the next free ``<name>.<n>.log`` (before starting it again)."""
        number = 1
        while (self.home / f"{name}.{number}.log").exists():
            number += 1
        (self.home / f"{name}.log").rename(self.home / f"{name}.{number}.log")

    def stop(self) -> list[str]:
        """Stop every component with SIGINT (then SIGKILL); return the processes that outlived it."""
        sessions = {process.pid for process in self.processes.values()}
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return end_sessions(sessions)

    def drop_metadata(self) -> None:
        """Drop the metadata database created on the PostgreSQL server (tests clean up after them)."""
        if self._pg_server:
            with psycopg.connect(self._pg_server, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{self.meta_db}" WITH (FORCE)')

    def log_tail(self, component: str, chars: int = 4000) -> str:
        path = self.home / f"{component}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    # -- driving it ----------------------------------------------------------------------------

    def airflow(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run an ``airflow`` CLI command against this deployment; raise with its output on failure."""
        result = subprocess.run(
            [self.python, "-m", "airflow", *args],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"airflow {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def auth_headers(self) -> dict[str, str]:
        """The ``Authorization`` header of ``login``'s token (fetched once from ``/auth/token``), or none."""
        if self.login is None:
            return {}
        if self._token is None:
            username, password = self.login
            response = requests.post(
                f"{self.base}/auth/token", json={"username": username, "password": password}, timeout=10
            )
            response.raise_for_status()
            self._token = response.json()["access_token"]
        return {"authorization": f"Bearer {self._token}"}

    def api(self, method: str, path: str, *, expect: int | None = 200, **kwargs: Any) -> Any:
        kwargs["headers"] = self.auth_headers() | dict(kwargs.get("headers") or {})
        response = requests.request(method, f"{self.base}/api/v2{path}", timeout=30, **kwargs)
        if expect is not None and response.status_code != expect:
            raise AssertionError(f"{method} {path}: HTTP {response.status_code} {response.text[:2000]}")
        return response.json() if response.content else None

    def unpause(self) -> None:
        self.api("PATCH", "/dags/cdr_webhook", json={"is_paused": False})

    def trigger(self, conf: Mapping[str, Any] | None = None, **body: Any) -> str:
        run = self.api(
            "POST", "/dags/cdr_webhook/dagRuns", json={"logical_date": None, "conf": conf or {}, **body}
        )
        return run["dag_run_id"]

    def runs(self, **query: Any) -> list[dict[str, Any]]:
        return self.api("GET", "/dags/cdr_webhook/dagRuns", params={"limit": 100, **query})["dag_runs"]

    def wait_run(self, run_id: str, timeout: float = 120) -> str:
        """Wait until the run finishes; return its state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.api("GET", f"/dags/cdr_webhook/dagRuns/{run_id}")["state"]
            if state in ("success", "failed"):
                return state
            time.sleep(0.5)
        raise TimeoutError(f"run {run_id} not finished after {timeout:.0f} s:\n{self.log_tail('scheduler')}")

    def wait_backfills(self, timeout: float = 180) -> list[dict[str, Any]]:
        """Wait until every backfill of the DAG is completed (the scheduler closes it after its runs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            backfills = self.api("GET", "/backfills", params={"dag_id": "cdr_webhook"})["backfills"]
            if all(backfill["completed_at"] for backfill in backfills):
                return backfills
            time.sleep(1)
        raise TimeoutError(f"backfills not completed after {timeout:.0f} s")

    def clear_mapped_task(self, run_id: str, map_index: int, task_id: str = "post_cdr") -> None:
        """Clear one mapped task instance of a run through the REST API, as an operator's retry does."""
        self.api(
            "POST",
            "/dags/cdr_webhook/clearTaskInstances",
            json={
                "dry_run": False,
                "dag_run_id": run_id,
                "task_ids": [[task_id, map_index]],
                "reset_dag_runs": True,
            },
        )

    def task_instances(self, run_id: str) -> list[dict[str, Any]]:
        return self.api("GET", f"/dags/cdr_webhook/dagRuns/{run_id}/taskInstances", params={"limit": 1000})[
            "task_instances"
        ]

    def task_log(self, run_id: str, map_index: int, try_number: int = 1) -> list[str]:
        """Return the event lines of one mapped post_cdr try's log."""
        content = self.api(
            "GET",
            f"/dags/cdr_webhook/dagRuns/{run_id}/taskInstances/post_cdr/logs/{try_number}",
            params={"map_index": map_index, "full_content": True},
            headers={"accept": "application/json"},
        )["content"]
        return [entry.get("event", "") if isinstance(entry, dict) else str(entry) for entry in content]

    def conn_env(self) -> dict[str, str]:
        return {key: value for key, value in self.env.items() if key.startswith("AIRFLOW_CONN_")}

    def dump(self) -> str:
        return json.dumps({name: self.log_tail(name, 1500) for name in self.processes}, indent=1)
