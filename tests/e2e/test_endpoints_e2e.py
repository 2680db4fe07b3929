"""Per-client endpoints end to end: routing, filters, pausing and resuming, Retry-After, key rotation."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest
from standardwebhooks.webhooks import Webhook

from cdr_webhook.signing import webhook_id
from demo.connections import http_conn
from demo.dialer import Dialer
from demo.receiver import Receiver
from tests.conftest import ROOT
from tests.support.dag_runs import recent, window
from tests.support.deployments import API_KEY, SIGNING_SECRET

pytestmark = pytest.mark.e2e

NEW_SECRET = "whsec_" + base64.b64encode(b"the-new-signing-secret-after-rot").decode()


@pytest.fixture
def client_receivers(monkeypatch, receiver):
    """Receivers for clients 7 and 8, registered as their own connections; client 9 has none."""
    with Receiver(secret=SIGNING_SECRET, api_key="key-7") as seven, Receiver(api_key="key-8") as eight:
        for client, server, key, extra in (
            (7, seven, "key-7", {"signing_secret": SIGNING_SECRET}),
            (8, eight, "key-8", {}),
        ):
            set_extra(monkeypatch, client, server, key, extra)
        yield {7: seven, 8: eight, None: receiver}


def set_extra(monkeypatch, client: int, server: Receiver, key: str, extra: dict) -> None:
    monkeypatch.setenv(
        f"AIRFLOW_CONN_CDR_WEBHOOK_CLIENT_{client}", http_conn(server.url, api_key=key, **extra)
    )


def rows(conn) -> dict[str, dict]:
    result = conn.execute(
        "SELECT cdr_id, endpoint, status, attempts, http_status, error FROM cdr_webhook.delivery"
    ).fetchall()
    keys = ("endpoint", "status", "attempts", "http_status", "error")
    return {row[0]: dict(zip(keys, row[1:], strict=True)) for row in result}


def cli(cdr_dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": str(ROOT / "plugins"), "CDR_DATABASE_URL": cdr_dsn}
    return subprocess.run(
        [sys.executable, "-m", "cdr_webhook", "endpoints", *args], env=env, capture_output=True, text=True
    )


def test_three_clients_are_routed_to_their_own_endpoints_or_the_default(cdr_db, client_receivers, run_dag):
    dialer = Dialer(cdr_db)
    seven, eight, nine = (dialer.cdr(client_id=c, created_at=recent(60 - c)) for c in (7, 8, 9))

    run_dag(**window())

    assert [r.cdr_id for r in client_receivers[7].received()] == [seven]
    assert [r.cdr_id for r in client_receivers[8].received()] == [eight]
    assert [r.cdr_id for r in client_receivers[None].received()] == [nine]
    assert client_receivers[7].received()[0].signature_ok is True
    assert client_receivers[7].received()[0].headers["x-api-key"] == "key-7"
    assert client_receivers[8].received()[0].headers["x-api-key"] == "key-8"
    assert "webhook-signature" not in client_receivers[8].received()[0].headers  # no secret: unsigned
    assert client_receivers[7].received()[0].headers["webhook-id"] == webhook_id(
        seven, "cdr_webhook_client_7"
    )
    assert {cdr: row["endpoint"] for cdr, row in rows(cdr_db).items()} == {
        seven: "cdr_webhook_client_7",
        eight: "cdr_webhook_client_8",
        nine: "cdr_webhook",
    }


def test_skip_mode_records_unrouted_clients_as_skipped(cdr_db, client_receivers, run_dag, settings_env):
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__UNROUTED_CLIENTS", "skip")
    dialer = Dialer(cdr_db)
    seven = dialer.cdr(client_id=7, created_at=recent(30))
    nine = dialer.cdr(client_id=9, created_at=recent(20))

    run_dag(**window())

    assert client_receivers[None].received() == []
    assert [r.cdr_id for r in client_receivers[7].received()] == [seven]
    assert rows(cdr_db)[nine] == {
        "endpoint": "cdr_webhook_client_9",
        "status": "skipped",
        "attempts": 0,
        "http_status": None,
        "error": (
            "no endpoint: connection 'cdr_webhook_client_9' does not exist and unrouted_clients is 'skip'"
        ),
    }


def test_filters_in_the_connection_extra_skip_cdrs_naming_the_filter(
    cdr_db, client_receivers, run_dag, monkeypatch
):
    set_extra(monkeypatch, 7, client_receivers[7], "key-7", {
        "signing_secret": SIGNING_SECRET, "leg_types": [1], "min_billed_duration": 1,
    })  # fmt: skip
    dialer = Dialer(cdr_db)
    wanted = dialer.cdr(client_id=7, created_at=recent(40))
    b_leg = dialer.cdr(client_id=7, leg_type=2, created_at=recent(30))
    unanswered = dialer.cdr(client_id=7, billed_duration=0, created_at=recent(20))
    campaign = cdr_db.execute("SELECT id FROM dialer.campaign WHERE client_id = 7").fetchone()[0]
    set_extra(monkeypatch, 8, client_receivers[8], "key-8", {"campaign_ids": [campaign + 1000]})
    other_campaign = dialer.cdr(client_id=8, created_at=recent(10))

    run_dag(**window())

    assert [r.cdr_id for r in client_receivers[7].received()] == [wanted]
    assert client_receivers[8].received() == []
    ledger = rows(cdr_db)
    assert ledger[b_leg]["status"] == "skipped"
    assert ledger[b_leg]["error"] == "filtered out by cdr_webhook_client_7 extra leg_types=[1]: leg_type is 2"
    assert ledger[unanswered]["error"] == (
        "filtered out by cdr_webhook_client_7 extra min_billed_duration=1: billed_duration is 0"
    )
    assert ledger[other_campaign]["error"].startswith(
        "filtered out by cdr_webhook_client_8 extra campaign_ids="
    )


def test_410_pauses_the_endpoint_and_resume_delivers_the_held_cdrs_in_order(
    cdr_db, cdr_dsn, client_receivers, run_dag, settings_env
):
    dialer = Dialer(cdr_db)
    sevens = [dialer.cdr(client_id=7, created_at=recent(100 - n)) for n in range(3)]
    other = dialer.cdr(client_id=8, created_at=recent(90))
    for cdr in sevens:  # whichever is sent first is answered 410 (dag.test runs tasks in no set order)
        client_receivers[7].script(cdr, [410])

    run_dag(**window())

    [gone] = client_receivers[7].received()  # one request, then nothing: the endpoint is paused
    held = [cdr for cdr in sevens if cdr != gone.cdr_id]
    assert [r.cdr_id for r in client_receivers[8].received()] == [other]  # other endpoints go on
    ledger = rows(cdr_db)
    assert ledger[gone.cdr_id]["status"] == "failed"
    assert [ledger[cdr]["status"] for cdr in held] == ["queued", "queued"]
    listed = cli(cdr_dsn, "list")
    assert listed.returncode == 0, listed.stderr
    assert "cdr_webhook_client_7" in listed.stdout
    assert "paused" in listed.stdout
    assert "410" in listed.stdout

    # While paused, new CDRs of the endpoint wait too, and nothing is sent there.
    later = [dialer.cdr(client_id=7, created_at=recent(5 - n)) for n in range(2)]
    for cdr in held:
        client_receivers[7].script(cdr, [])
    run_dag(**window())
    assert len(client_receivers[7].received()) == 1

    resumed = cli(
        cdr_dsn, "resume", "cdr_webhook_client_7", "--by", "noc-oncall", "--reason", "fixed their DNS"
    )
    assert resumed.returncode == 0, resumed.stderr
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__MAX_CDRS_PER_RUN", "3")  # 4 wait: two runs
    run_dag(**window())
    first_run = {r.cdr_id for r in client_receivers[7].received()[1:]}
    run_dag(**window())
    second_run = {r.cdr_id for r in client_receivers[7].received()[1 + len(first_run) :]}

    # Oldest first: the held CDRs go with the first run after the resume, the newer ones after.
    assert first_run == {*held, later[0]}
    assert second_run == {later[1]}
    assert all(rows(cdr_db)[cdr]["status"] == "delivered" for cdr in (*held, *later))
    events = cdr_db.execute(
        "SELECT action, actor, reason FROM cdr_webhook.endpoint_event "
        "WHERE endpoint = 'cdr_webhook_client_7' ORDER BY at"
    ).fetchall()
    assert [event[:2] for event in events] == [("paused", "cdr_webhook"), ("resumed", "noc-oncall")]
    assert "410" in events[0][2]
    assert events[1][2] == "fixed their DNS"


def test_sustained_failure_pauses_after_the_threshold(cdr_db, client_receivers, run_dag, settings_env):
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__PAUSE_AFTER_FAILURES", "2")
    dialer = Dialer(cdr_db)
    cdrs = [dialer.cdr(client_id=8, created_at=recent(50 - n)) for n in range(4)]
    for cdr in cdrs:
        client_receivers[8].script(cdr, [400])

    run_dag(**window())

    sent = [r.cdr_id for r in client_receivers[8].received()]
    assert len(sent) == 2
    assert sorted(rows(cdr_db)[cdr]["status"] for cdr in cdrs) == ["failed", "failed", "queued", "queued"]
    state = cdr_db.execute(
        "SELECT paused, reason FROM cdr_webhook.endpoint_state WHERE endpoint = 'cdr_webhook_client_8'"
    ).fetchone()
    assert state[0] is True
    assert "2 consecutive failed deliveries" in state[1]


def test_retry_after_is_honoured(cdr_db, receiver, run_dag, settings_env):
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__MAX_RETRY_DELAY_SECONDS", "10")
    cdr = Dialer(cdr_db).cdr(created_at=recent(30))
    receiver.script(cdr, [(429, {"retry-after": "4"})])  # the task's own retry delay is 1 s

    run_dag(**window())

    first, second = receiver.received(cdr)
    assert (first.answered, second.answered) == (429, 200)
    assert second.at - first.at >= 4


def test_two_signing_secrets_both_verify_for_a_zero_downtime_rotation(cdr_db, receiver, run_dag, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_CDR_WEBHOOK",
        http_conn(receiver.url, api_key=API_KEY, signing_secret=[SIGNING_SECRET, NEW_SECRET]),
    )
    cdr = Dialer(cdr_db).cdr(created_at=recent(30))

    run_dag(**window())

    [request] = receiver.received(cdr)
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    for secret in (SIGNING_SECRET, NEW_SECRET):
        Webhook(secret).verify(request.body, request.headers)


def test_an_endpoint_the_egress_guard_refuses_fails_at_once_naming_rule_and_setting(
    cdr_db, receiver, run_dag, settings_env
):
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__ALLOWED_NETWORKS", "")  # loopback is no longer allowed
    cdr = Dialer(cdr_db).cdr(created_at=recent(30))

    run_dag(**window())

    assert receiver.received() == []
    row = rows(cdr_db)[cdr]
    assert (row["status"], row["attempts"], row["http_status"]) == ("failed", 1, None)
    assert "127.0.0.1 is a loopback address" in row["error"]
    assert "AIRFLOW__CDR_WEBHOOK__ALLOWED_NETWORKS" in row["error"]
