"""A real Airflow on CeleryExecutor on 127.0.0.1: the stack of demo/stack.py plus Celery workers.

Redis is the broker; the metadata database is also Celery's result backend. Each worker is a
separate ``airflow celery worker`` with a name of its own (``worker-1``, …), which its task
instances record as their ``hostname`` (``[core] hostname_callable`` is :func:`worker_hostname`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import uuid
from typing import TYPE_CHECKING

from psycopg.conninfo import make_conninfo

from demo.dialer import ROOT
from demo.stack import AirflowStack, free_port, running_in, sqlalchemy_url

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

#: The variable that names the worker a process belongs to (unset outside the workers).
WORKER_NAME = "CDR_WORKER_NAME"


def worker_hostname() -> str:
    """``[core] hostname_callable``: the worker's own name, so two workers on one host stay apart."""
    return os.environ.get(WORKER_NAME) or socket.getfqdn()


class CeleryStack(AirflowStack):
    """
    Scheduler, dag-processor, triggerer and api-server as in :class:`AirflowStack`, on CeleryExecutor,
    plus workers.

    :param broker_url: The Redis URL of the Celery broker.
    :param workers: How many ``airflow celery worker`` processes to start.
    :param concurrency: Task slots of each worker.
    """

    def __init__(
        self,
        home: Path,
        pg_server: str,
        env: Mapping[str, str],
        *,
        broker_url: str,
        workers: int = 2,
        concurrency: int = 4,
    ) -> None:
        self.workers = [f"worker-{number}" for number in range(1, workers + 1)]
        self.concurrency = concurrency
        # A queue of its own: other deployments may share the broker, and their workers must not take
        # this deployment's tasks.
        self.queue = f"cdr-webhook-{uuid.uuid4().hex[:10]}"
        super().__init__(home, pg_server, env)
        self.env |= {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": f"{__name__}.worker_hostname",
            "AIRFLOW__CELERY__BROKER_URL": broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+"
            + sqlalchemy_url(make_conninfo(pg_server, dbname=self.meta_db)),
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": self.queue,
            **env,
        }

    def start(self, timeout: float = 180) -> CeleryStack:
        super().start(timeout)
        for name in self.workers:
            self._spawn_worker(name)
        self._wait_workers_ready(self.workers, timeout)
        return self

    def _spawn_worker(self, name: str) -> None:
        self.spawn(
            name,
            *("celery", "worker", "--celery-hostname", f"{name}@%h", "--queues", self.queue),
            *("--concurrency", str(self.concurrency), "--pid", str(self.home / f"{name}.pid")),
            *("--without-mingle", "--without-gossip"),
            env={WORKER_NAME: name, "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())},
        )

    def start_worker_again(self, name: str, timeout: float = 180) -> None:
        """Start a worker :meth:`kill_worker` killed, under the same name (its old log kept aside)."""
        assert self.processes[name].poll() is not None, f"{name} is still running"
        self.keep_log(name)
        (self.home / f"{name}.pid").unlink(missing_ok=True)  # Celery refuses to start on a stale pidfile
        self._spawn_worker(name)
        self._wait_workers_ready([name], timeout)

    def _wait_workers_ready(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(names)
        while waiting and time.monotonic() < deadline:
            for name in list(waiting):
                if self.processes[name].poll() is not None:
                    raise RuntimeError(f"airflow celery worker {name} exited: {self.log_tail(name)}")
                if " ready." in self.log_tail(name, 100_000):
                    waiting.discard(name)
            time.sleep(0.5)
        if waiting:
            raise TimeoutError(f"Celery workers not ready after {timeout:.0f} s: {sorted(waiting)}")

    def freeze_worker(self, name: str) -> list[int]:
        """SIGSTOP every process of the worker (nothing of it moves on); return their pids."""
        return self._signal_worker(name, signal.SIGSTOP)

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL every process of the worker, as if its machine died; return their pids."""
        killed = self._signal_worker(name, signal.SIGKILL)
        self.processes[name].wait(timeout=30)
        return killed

    def _signal_worker(self, name: str, signum: signal.Signals) -> list[int]:
        """Send ``signum`` to every process of the worker: its main process, pool and task processes.

        Not only its process group: the task processes Airflow starts make process groups of their
        own, but stay in the worker's session.
        """
        session = self.processes[name].pid
        done: set[int] = set()
        # Again until none is left: a process may fork between the listing and its parent's signal.
        while todo := [proc for proc in running_in({session}) if proc.pid not in done]:
            for proc in todo:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)
                done.add(proc.pid)
            time.sleep(0.1)
        return sorted(done)
