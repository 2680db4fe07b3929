"""The real DAG in Airflow (``dag.test()``), real PostgreSQL, a real receiver on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3

import pytest

from cdr_webhook.signing import webhook_id
from demo.dialer import Dialer
from tests.conftest import AIRFLOW_HOME
from tests.support.dag_runs import ledger, recent, window
from tests.support.deployments import API_KEY, SIGNING_SECRET
from tests.support.payloads import assert_valid_payload

pytestmark = pytest.mark.e2e


def task_states(dag_run, task_id: str = "post_cdr") -> dict[int, tuple[str, int]]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = (
            session.query(TaskInstance)
            .filter(TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id)
            .filter(TaskInstance.task_id == task_id)
            .all()
        )
        return {ti.map_index: (str(ti.state), ti.try_number, ti.rendered_map_index) for ti in tis}


def test_delivery_retry_fail_fast_redirect_and_verbatim_text(cdr_db, receiver, run_dag):
    dialer = Dialer(cdr_db)
    ok = dialer.cdr(created_at=recent(300), callerid="{{ 7 * 7 }}")
    flaky = dialer.cdr(created_at=recent(290))
    rejected = dialer.cdr(created_at=recent(280))
    redirected = dialer.cdr(created_at=recent(270))
    receiver.script(flaky, [503, 200])
    receiver.script(rejected, [400])
    receiver.script(redirected, [302])

    dag_run = run_dag(**window())

    assert str(dag_run.state) == "failed"  # two CDRs could not be delivered
    rows = ledger(cdr_db)
    assert {cdr: row["status"] for cdr, row in rows.items()} == {
        ok: "delivered",
        flaky: "delivered",
        rejected: "failed",
        redirected: "failed",
    }
    # Delivered, with the CDR text verbatim, signed, schema-valid.
    [sent] = receiver.received(ok)
    assert sent.payload["callerid"] == "{{ 7 * 7 }}"
    assert b'"callerid":"{{ 7 * 7 }}"' in sent.body
    assert sent.signature_ok is True
    assert sent.headers["x-api-key"] == API_KEY
    for request in receiver.received():
        assert_valid_payload(request.payload)
        assert request.signature_ok is True
    # 503 then 200: two attempts carrying one webhook-id, recorded in the ledger.
    flaky_requests = receiver.received(flaky)
    assert [r.answered for r in flaky_requests] == [503, 200]
    assert {r.headers["webhook-id"] for r in flaky_requests} == {webhook_id(flaky, "cdr_webhook")}
    assert rows[flaky]["attempts"] == 2
    assert rows[flaky]["http_status"] == 200
    # 400: one attempt, failed at once without using the retries.
    assert len(receiver.received(rejected)) == 1
    assert rows[rejected] | {"run_id": None} == {
        "status": "failed",
        "attempts": 1,
        "http_status": 400,
        "error": "HTTP 400 Bad Request",
        "run_id": None,
        "map_index": 2,
    }
    # 302: a failure, and the Location target (the receiver's redirect_to, a closed port) was not hit.
    assert len(receiver.received(redirected)) == 1
    assert rows[redirected]["error"] == "HTTP 302 Found (redirects are never followed)"
    assert rows[redirected]["attempts"] == 1
    # The grid: each mapped task is named by its cdr_id; fail-fast tasks used one try.
    states = task_states(dag_run)
    assert {index: state[2] for index, state in states.items()} == {
        0: ok,
        1: flaky,
        2: rejected,
        3: redirected,
    }
    assert states[1][:2] == ("success", 2)
    assert states[2][:2] == ("failed", 1)
    assert states[3][:2] == ("failed", 1)


def test_a_run_asking_the_impossible_fails_at_once_its_select_not_retried(cdr_db, receiver, run_dag):
    # select_cdrs retries what may pass (a lost worker, database or api-server), not a wrong request.
    tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    dag_run = run_dag(window_start=tomorrow, window_end=tomorrow + dt.timedelta(hours=1))

    assert str(dag_run.state) == "failed"
    state, try_number, _ = task_states(dag_run, "select_cdrs")[-1]
    assert (state, try_number) == ("failed", 1)
    assert receiver.received() == []


def test_policies_missing_then_failed(cdr_db, receiver, run_dag):
    dialer = Dialer(cdr_db)
    good = dialer.cdr(created_at=recent(200))
    bad = dialer.cdr(created_at=recent(190))
    receiver.script(bad, [400])
    span = window()

    run_dag(**span)
    assert len(receiver.received()) == 2

    run_dag(**span, policy="missing")
    assert len(receiver.received()) == 2  # nothing new: every CDR of the window has a ledger row

    dag_run = run_dag(**span, policy="failed")
    assert str(dag_run.state) == "success"
    resent = receiver.received()[2:]
    assert [r.cdr_id for r in resent] == [bad]
    assert resent[0].headers["webhook-id"] == webhook_id(bad, "cdr_webhook")
    assert ledger(cdr_db)[bad]["status"] == "delivered"
    assert ledger(cdr_db)[bad]["attempts"] == 2
    assert ledger(cdr_db)[good]["attempts"] == 1


def test_overflow_above_max_cdrs_per_run_goes_with_the_next_runs(cdr_db, receiver, run_dag, settings_env):
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__MAX_CDRS_PER_RUN", "2")
    dialer = Dialer(cdr_db)
    cdrs = [dialer.cdr(created_at=recent(100 - n)) for n in range(5)]
    span = window()

    sent_per_run = []
    for _ in range(4):
        before = len(receiver.received())
        run_dag(**span)
        sent_per_run.append([r.cdr_id for r in receiver.received()[before:]])

    # Oldest first across runs (within a run, tasks run in no set order).
    assert [set(run) for run in sent_per_run] == [set(cdrs[0:2]), set(cdrs[2:4]), {cdrs[4]}, set()]
    assert {row["status"] for row in ledger(cdr_db).values()} == {"delivered"}


def test_the_run_sizes_its_tasks_a_burst_goes_in_chunks_a_few_cdrs_a_task_each(
    cdr_db, receiver, run_dag, monkeypatch
):
    monkeypatch.setattr("cdr_webhook.selection.tasks.worker_cores", lambda: 8)  # whatever this machine has
    dialer = Dialer(cdr_db)
    burst = [dialer.cdr(created_at=recent(600 - n)) for n in range(40)]

    chunked = run_dag(**window())

    # 40 CDRs of one endpoint, over chunk_above (16): ceil(40 / 16) = 3 chunks, dealt in turn.
    assert str(chunked.state) == "success"
    names = sorted(name for _, _, name in task_states(chunked).values())
    assert names == sorted([f"{burst[0]} (14 CDRs)", f"{burst[1]} (13 CDRs)", f"{burst[2]} (13 CDRs)"])
    assert sorted(r.cdr_id for r in receiver.received()) == sorted(burst)  # each once

    steady = [dialer.cdr(created_at=recent(3 - n)) for n in range(3)]
    single = run_dag(window_start=recent(5), window_end=recent(0))

    # A few CDRs: a task each, named by its cdr_id, as ever.
    assert sorted(name for _, _, name in task_states(single).values()) == sorted(steady)
    assert {row["status"] for row in ledger(cdr_db).values()} == {"delivered"}


def test_secrets_reach_no_log_xcom_rendered_field_or_metadata_row(
    cdr_db, receiver, run_dag, capfd, settings_env
):
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__RETRIES", "2")  # not the default (6): the setting is used
    dialer = Dialer(cdr_db)
    delivered = dialer.cdr(created_at=recent(60))
    failing = dialer.cdr(created_at=recent(50))
    receiver.script(failing, [500] * 7)  # more failures than tries: the retry count is the limit

    run_dag(**window())

    output = capfd.readouterr()
    log_text = output.out + output.err
    assert delivered in log_text  # the capture did see the task logs
    assert "HTTP 500" in log_text
    metadata = b""
    for suffix in ("", "-wal"):
        path = AIRFLOW_HOME / f"airflow.db{suffix}"
        if path.exists():
            metadata += path.read_bytes()
    assert metadata  # the run was written there
    with sqlite3.connect(AIRFLOW_HOME / "airflow.db") as meta:
        xcoms = [row[0] for row in meta.execute("SELECT value FROM xcom")]
        rendered = [
            row[0] for row in meta.execute("SELECT rendered_fields FROM rendered_task_instance_fields")
        ]
    assert xcoms  # select_cdrs' mapping list is there...
    for value in xcoms:
        for item in json.loads(value) if value.startswith("[") else []:
            assert set(item) == {"cdr_ids", "http_conn_id"}  # ...and holds ids, never a body
            assert len(item["cdr_ids"]) == 1  # one CDR per task by default
    secret_body = SIGNING_SECRET.removeprefix("whsec_")
    for secret in (API_KEY, SIGNING_SECRET, secret_body):
        assert secret not in log_text
        assert secret.encode() not in metadata
        assert all(secret not in str(value) for value in xcoms + rendered)
        assert cdr_db.execute(
            "SELECT count(*) FROM cdr_webhook.delivery WHERE error LIKE %s OR response_excerpt LIKE %s",
            (f"%{secret}%", f"%{secret}%"),
        ).fetchone() == (0,)
    # Phone numbers stay out of Airflow's metadata DB: bodies are built at POST time.
    assert b"+34650123456" not in metadata
    assert ledger(cdr_db)[failing]["status"] == "failed"
    assert ledger(cdr_db)[failing]["attempts"] == 3  # the first try and the 2 retries configured
    assert len(receiver.received(failing)) == 3
