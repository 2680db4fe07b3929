"""The real DAG (``dag.test()``) delivering to an endpoint behind OAuth2 client credentials.

A real token endpoint and a receiver that wants its bearer tokens, on 127.0.0.1: the run's tasks
share one token, and no secret reaches the task logs, XCom, rendered fields or Airflow's database.
"""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from demo.connections import http_conn
from demo.dialer import Dialer
from tests.conftest import AIRFLOW_HOME
from tests.support.dag_runs import ledger, recent, window
from tests.support.deployments import API_KEY, SIGNING_SECRET
from tests.support.oauth2_server import BearerReceiver, TokenServer
from tests.support.secrets_sweep import Sweep

pytestmark = pytest.mark.e2e

CLIENT_SECRET = "cl13nt-s3cr3t-dag-8c7b6a"
HEADER_SECRET = "hdr-s3cr3t-dag-1f2e3d"


def test_a_run_delivers_to_an_oauth2_endpoint_with_one_token_and_shows_no_secret(
    cdr_db, run_dag, monkeypatch, capfd
):
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", Fernet.generate_key().decode())
    with (
        TokenServer(client_id="cdr-sender", client_secret=CLIENT_SECRET) as tokens,
        BearerReceiver(tokens, secret=SIGNING_SECRET, api_key=API_KEY, echo=True) as receiver,
    ):
        connection = http_conn(
            receiver.url, api_key=API_KEY, signing_secret=SIGNING_SECRET, oauth2_token_url=tokens.url,
            oauth2_client_id="cdr-sender", oauth2_client_secret=CLIENT_SECRET,
            secret_headers={"X-Shared-Secret": HEADER_SECRET},
        )  # fmt: skip
        monkeypatch.setenv("AIRFLOW_CONN_CDR_WEBHOOK", connection)
        dialer = Dialer(cdr_db)
        made = [dialer.cdr(created_at=recent(300 - 10 * i)) for i in range(4)]

        dag_run = run_dag(**window())

    assert str(dag_run.state) == "success"
    assert {cdr: row["status"] for cdr, row in ledger(cdr_db).items()} == dict.fromkeys(made, "delivered")
    [issued] = tokens.issued
    assert {r.headers["authorization"] for r in receiver.received()} == {f"Bearer {issued.token}"}
    sweep = Sweep({"client secret": CLIENT_SECRET, "secret header": HEADER_SECRET, "token": issued.token})
    out, err = capfd.readouterr()
    sweep.text("output", out + err)
    sweep.files(AIRFLOW_HOME, "airflow home")  # the metadata database (XCom, rendered fields) and logs
    assert not sweep.findings, sweep.report()
    assert sweep.searched["files"] > 0
