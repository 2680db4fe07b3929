"""The owners' alerts in Airflow (``dag.test()``): a 410 in a delivery run pauses the endpoint, and the
``cdr_webhook_owner_alerts`` DAG mails its owner through a real SMTP server on 127.0.0.1; while that
server is down, the alert stays owed and the task fails (what an operator sees in Airflow)."""

from __future__ import annotations

import json

import pytest
from aiosmtpd.controller import Controller

from cdr_webhook.ledger import endpoints, owner_alerts
from demo.connections import http_conn
from demo.dialer import Dialer
from tests.conftest import ROOT, reread_settings
from tests.support.dag_runs import recent, window
from tests.support.deployments import API_KEY, SIGNING_SECRET
from tests.support.smtp_server import Inbox, free_port, smtp_conn

pytestmark = pytest.mark.e2e
OWNER = "ops@acme.example"


def run_owner_alerts():
    from airflow.dag_processing.dagbag import DagBag

    reread_settings()
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag("cdr_webhook_owner_alerts").test(logical_date=None)


def state_of(dag_run) -> str:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        [ti] = session.query(TaskInstance).filter(TaskInstance.run_id == dag_run.run_id).all()
        return str(ti.state)


def test_a_410_in_a_run_pauses_the_endpoint_and_the_owner_gets_one_email(
    cdr_db, receiver, run_dag, settings_env
):
    settings_env.setenv(
        "AIRFLOW_CONN_CDR_WEBHOOK",
        http_conn(
            receiver.url, api_key=API_KEY, signing_secret=SIGNING_SECRET, owner_email="ops@acme.example"
        ),
    )
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__OWNER_ALERT_SMTP_CONN_ID", "smtp_owners")
    settings_env.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com")
    gone = Dialer(cdr_db).cdr(created_at=recent(120))
    receiver.script(gone, [410])
    run_dag(**window())
    assert endpoints.is_paused(cdr_db, "cdr_webhook")

    # The SMTP server is down: the alert stays owed and the task fails, saying so.
    settings_env.setenv("AIRFLOW_CONN_SMTP_OWNERS", smtp_conn(free_port()))
    failed = run_owner_alerts()
    assert str(failed.state) == "failed"
    assert state_of(failed) == "failed"
    [owed] = owner_alerts.pending(cdr_db)
    assert owed.kind == "paused"
    assert "ConnectionRefusedError" in owed.last_error

    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        settings_env.setenv("AIRFLOW_CONN_SMTP_OWNERS", smtp_conn(controller.port))
        cdr_db.execute("UPDATE cdr_webhook.owner_alert SET next_attempt_at = now()")
        sent = run_owner_alerts()
        again = run_owner_alerts()  # nothing more is owed
    finally:
        controller.stop()
    assert str(sent.state) == "success"
    assert str(again.state) == "success"
    [message] = inbox.messages
    assert message["Subject"] == "[CDR webhook] endpoint cdr_webhook paused"
    text = message.get_body(preferencelist=("html",)).get_content()
    assert "HTTP 410 Gone" in text
    assert "https://airflow.example.com/cdr-webhook/endpoint?endpoint=cdr_webhook" in text
    assert owner_alerts.pending(cdr_db) == []
    assert json.loads(smtp_conn(1))["extra"]["from_email"] in message["From"]
