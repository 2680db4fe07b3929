"""Two Airflow deployments running the DAG at once over one CDR database never double-send."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest

from demo.dialer import Dialer
from tests.conftest import AIRFLOW_HOME
from tests.e2e.test_dag_runs import ledger, recent, window

pytestmark = pytest.mark.e2e


def test_overlapping_runs_never_double_send(cdr_db, receiver, airflow_db, tmp_path):
    dialer = Dialer(cdr_db)
    cdrs = [dialer.cdr(created_at=recent(600 - n)) for n in range(60)]
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
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]

    sent = Counter(request.cdr_id for request in receiver.received())
    assert set(sent) == set(cdrs)
    assert max(sent.values()) == 1
    assert {row["status"] for row in ledger(cdr_db).values()} == {"delivered"}
    owners = Counter(row["run_id"] for row in ledger(cdr_db).values())
    assert len(owners) >= 3  # runs of both deployments claimed CDRs
    assert max(owners.values()) <= 25
