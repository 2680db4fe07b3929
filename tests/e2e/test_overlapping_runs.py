"""Two Airflow deployments running the DAG at once over one CDR database never double-send."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import psycopg
import pytest

from demo.dialer import Dialer
from tests.conftest import AIRFLOW_HOME
from tests.support.dag_runs import ledger, recent, window

pytestmark = pytest.mark.e2e

HOLD_SECONDS = 150  # the longest the first POST waits for the other deployment to claim


def test_overlapping_runs_never_double_send(cdr_db, cdr_dsn, receiver, airflow_db, tmp_path):
    dialer = Dialer(cdr_db)
    cdrs = [dialer.cdr(created_at=recent(600 - n)) for n in range(60)]
    held: dict[str, Any] = {}
    first = threading.Lock()

    def hold_the_first_post(headers: dict[str, str], body: bytes) -> None:
        # While a run's POST is held, that run cannot finish, nor its deployment start its next run
        # (`dags test && dags test`): a claim by any other run is the other deployment's, made now.
        if not first.acquire(blocking=False):
            return
        held["cdr_id"] = json.loads(body)["cdr_id"]
        deadline = time.monotonic() + HOLD_SECONDS
        with psycopg.connect(cdr_dsn, autocommit=True) as conn:
            [held["run"]] = conn.execute(
                "SELECT run_id FROM cdr_webhook.delivery WHERE cdr_id = %s", (held["cdr_id"],)
            ).fetchone()
            while not held.get("other_runs") and time.monotonic() < deadline:
                time.sleep(0.2)
                rows = conn.execute(
                    "SELECT DISTINCT run_id FROM cdr_webhook.delivery WHERE run_id IS NOT NULL"
                )
                held["other_runs"] = {run for (run,) in rows} - {held["run"]}

    receiver.before_answer = hold_the_first_post
    conf = json.dumps({key: value.isoformat() for key, value in window().items()})
    processes = []
    for name in ("a", "b"):
        home = tmp_path / name
        home.mkdir()
        shutil.copy(AIRFLOW_HOME / "airflow.db", home / "airflow.db")  # already migrated
        env = os.environ | {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            # 25 per run: each deployment runs twice, so both must take part to send all 60.
            "AIRFLOW__CDR_WEBHOOK__MAX_CDRS_PER_RUN": "25",
            # The held POST must not time out: a retry after a timeout is a second send, by design.
            "AIRFLOW__CDR_WEBHOOK__REQUEST_TIMEOUT_SECONDS": str(HOLD_SECONDS + 30),
        }
        test = f"{sys.executable} -m airflow dags test cdr_webhook -c '{conf}'"
        processes.append(
            subprocess.Popen(
                ["bash", "-c", f"{test} && {test}"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [process.communicate(timeout=900)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]

    # The runs overlapped: one deployment claimed while the other's POST was in flight.
    assert held.get("other_runs"), f"no other run claimed within {HOLD_SECONDS} s of the first POST"
    # Each `dags test` prints its run ids: the held run was one deployment's, the claims the other's.
    [holder] = [name for name, output in zip("ab", outputs, strict=True) if held["run"] in output]
    claimers = {
        name
        for name, output in zip("ab", outputs, strict=True)
        for run in held["other_runs"]
        if run in output
    }
    assert claimers == {"b" if holder == "a" else "a"}

    sent = Counter(request.cdr_id for request in receiver.received())
    assert set(sent) == set(cdrs)
    assert max(sent.values()) == 1
    assert {row["status"] for row in ledger(cdr_db).values()} == {"delivered"}
    owners = Counter(row["run_id"] for row in ledger(cdr_db).values())
    assert len(owners) >= 3  # runs of both deployments claimed CDRs
    assert max(owners.values()) <= 25
