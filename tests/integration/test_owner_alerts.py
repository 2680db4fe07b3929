"""The endpoint's owner is told: pauses and resumes (any process) owe an alert in the ledger, and the one
sender delivers it to a real SMTP server on 127.0.0.1 (aiosmtpd) and a real signed-webhook receiver."""

from __future__ import annotations

import json
from html import unescape
from typing import TYPE_CHECKING

import pytest
from aiosmtpd.controller import Controller
from standardwebhooks import Webhook

from cdr_webhook.deliver.owner import drain
from cdr_webhook.ledger import endpoints, owner_alerts, pause_rules
from cdr_webhook.outcome import Decision, Verdict
from cdr_webhook.setting_values import parse_settings
from demo.connections import http_conn
from demo.receiver import Receiver
from tests.support.deployments import API_KEY, SIGNING_SECRET
from tests.support.page import get
from tests.support.smtp_server import Inbox, free_port, smtp_conn

if TYPE_CHECKING:
    import email

OWNER_SECRET = "whsec_" + "b3duZXItYWxlcnRzLXNpZ25pbmcta2V5LTEyMzQ1Ng=="
BASE_URL = "https://airflow.example.com"


@pytest.fixture
def inbox(monkeypatch):
    handler = Inbox()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_OWNERS", smtp_conn(controller.port))
    yield handler
    controller.stop()


def owned(monkeypatch, **extra) -> None:
    """The default endpoint, with owner extras."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_CDR_WEBHOOK",
        http_conn(
            "https://hooks.example/p/s3cret-path", api_key=API_KEY, signing_secret=SIGNING_SECRET, **extra
        ),
    )


def settings(**more: str):
    raw = {
        "owner_alert_smtp_conn_id": "smtp_owners",
        "allowed_networks": "127.0.0.0/8",
        "owner_alert_interval_minutes": "60",
        "owner_alert_window_minutes": "60",
        **more,
    }
    return parse_settings({name: value for name, value in raw.items() if value})


def body_text(message: email.message.EmailMessage) -> str:
    part = message.get_body(preferencelist=("html", "plain"))
    return unescape(part.get_content())


def test_one_email_on_pause_one_on_resume_and_none_more_within_the_interval(db, inbox, monkeypatch):
    owned(monkeypatch, owner_email="jane.doe@customer.example, ops@customer.example")
    db.execute(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, cdr_created_at, status, attempts) "
        "VALUES ('c-1', 'cdr_webhook', '2026-12-01T08:00:00Z', 'queued', 3)"
    )
    # A 410, through the task's own path: the pause rules of record_outcomes.
    [event] = [
        pause_rules.record_outcomes(
            db,
            "cdr_webhook",
            [Decision(Verdict.FAIL_NOW, "HTTP 410 Gone", gone=True)],
            pause_after_failures=50,
            pause_after_hours=72,
        )
    ]
    assert event is not None
    assert event.action == "paused"
    assert [a.kind for a in owner_alerts.pending(db)] == ["paused"]  # owed in the pause's transaction

    done = drain(db, settings(), base_url=BASE_URL)

    assert (done.sent, done.failed) == (1, [])
    [paused] = inbox.messages
    assert inbox.recipients == [["jane.doe@customer.example", "ops@customer.example"]]
    assert paused["Subject"] == "[CDR webhook] endpoint cdr_webhook paused"
    text = body_text(paused)
    assert endpoints.GONE_REASON in text
    assert "first failing CDR created at" in text
    assert "2026-12-01T08:00:00+00:00" in text
    assert f"{BASE_URL}/cdr-webhook/endpoint?endpoint=cdr_webhook" in text
    assert owner_alerts.pending(db) == []

    endpoints.resume(db, "cdr_webhook", actor="alice (CLI)", reason="receiver fixed")
    drain(db, settings(), base_url=BASE_URL)
    assert len(inbox.messages) == 2
    assert inbox.messages[1]["Subject"] == "[CDR webhook] endpoint cdr_webhook resumed"
    assert "receiver fixed" in body_text(inbox.messages[1])
    assert "alice (CLI)" in body_text(inbox.messages[1])

    # The same conditions again within owner_alert_interval_minutes: recorded, not sent.
    endpoints.pause(db, "cdr_webhook", reason="by hand", actor="bob (Deliveries page)")
    endpoints.resume(db, "cdr_webhook", actor="bob (Deliveries page)")
    done = drain(db, settings(), base_url=BASE_URL)
    assert (done.sent, done.suppressed) == (0, 2)  # the owner's last word, "resumed", still holds
    assert len(inbox.messages) == 2
    assert owner_alerts.latest(db)["cdr_webhook"].status == "suppressed"
    assert drain(db, settings(), base_url=BASE_URL).sent == 0  # nothing owed is sent twice

    # Paused again and left so: its alert is held, not dropped, and goes once the interval is over.
    endpoints.pause(db, "cdr_webhook", reason="flapping", actor="cdr_webhook")
    done = drain(db, settings(), base_url=BASE_URL)
    assert (done.sent, done.held) == (0, 1)
    [held] = owner_alerts.pending(db)
    assert held.next_attempt_at > held.at
    db.execute("UPDATE cdr_webhook.owner_alert SET finished_at = finished_at - interval '61 minutes'")
    db.execute("UPDATE cdr_webhook.owner_alert SET next_attempt_at = now() WHERE status = 'pending'")
    assert drain(db, settings(), base_url=BASE_URL).sent == 1
    assert inbox.messages[2]["Subject"] == "[CDR webhook] endpoint cdr_webhook paused"
    assert "flapping" in body_text(inbox.messages[2])
    assert len(inbox.messages) == 3


def test_a_failure_rate_over_the_threshold_alerts_once_per_interval(db, inbox, monkeypatch):
    owned(monkeypatch, owner_email=["ops@customer.example"])
    db.execute(
        "INSERT INTO cdr_webhook.endpoint_health "
        "(endpoint, bucket, attempts, delivered, retried, failed, latency_hist, pickup_hist) VALUES "
        "('cdr_webhook', date_bin('5 minutes', now(), 'epoch'), 40, 10, 25, 5, '{}', '{}'), "
        "('cdr_webhook_client_7', date_bin('5 minutes', now(), 'epoch'), 40, 30, 10, 0, '{}', '{}'), "
        # Outside the window: its failures do not count.
        "('cdr_webhook_client_8', now() - interval '3 hours', 40, 0, 40, 0, '{}', '{}')"
    )

    done = drain(db, settings(owner_alert_failure_rate="0.6", owner_alert_min_attempts="20"), base_url="")

    assert (done.added, done.sent) == (1, 1)  # 30 of 40 failed (75 %); client 7's 25 % did not
    [message] = inbox.messages
    assert message["Subject"] == "[CDR webhook] endpoint cdr_webhook failing"
    text = body_text(message)
    assert "30 of 40 attempts failed in the last 60 min (75 %; owner_alert_failure_rate = 60.0 %)" in text
    assert "failed attempts in the window" in text
    assert drain(db, settings(owner_alert_failure_rate="0.6"), base_url="").added == 0  # within the interval
    assert drain(db, settings(owner_alert_failure_rate="0"), base_url="").added == 0  # 0: off
    assert len(inbox.messages) == 1


def test_the_notification_url_gets_a_post_signed_as_standard_webhooks(db, inbox, monkeypatch):
    with Receiver(secret=OWNER_SECRET) as owner:
        owned(monkeypatch, owner_webhook_url=owner.url + "/t0ken-in-path", owner_webhook_secret=OWNER_SECRET)
        endpoints.pause(db, "cdr_webhook", reason="by hand", actor="bob")

        done = drain(db, settings(), base_url=BASE_URL)

        assert (done.sent, done.failed) == (1, [])
        [request] = owner.received()
    assert request.signature_ok is True
    # The reference library, verifying what arrived with the owner's secret.
    verified = Webhook(OWNER_SECRET).verify(request.body, request.headers)
    assert verified["type"] == "endpoint.paused"
    assert verified["data"]["endpoint"] == "cdr_webhook"
    assert verified["data"]["reason"] == "by hand"
    assert verified["data"]["page"] == f"{BASE_URL}/cdr-webhook/endpoint?endpoint=cdr_webhook"
    assert request.headers["webhook-id"] == f"msg_owner_alert_{owner_alerts.latest(db)['cdr_webhook'].id}"
    assert "x-api-key" not in request.headers  # the endpoint's key is not the owner's business
    assert inbox.messages == []  # no email address: no mail


def test_smtp_down_keeps_the_alert_pending_visible_and_retried(db, monkeypatch, client):
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_OWNERS", smtp_conn(free_port()))  # nothing listens there
    owned(monkeypatch, owner_email="jane.doe@customer.example")
    endpoints.pause(db, "cdr_webhook", reason="by hand", actor="bob")

    done = drain(db, settings(), base_url="")

    assert done.sent == 0
    [failure] = done.failed
    assert "email: ConnectionRefusedError" in failure
    [alert] = owner_alerts.pending(db)
    assert alert.attempts == 1
    assert "ConnectionRefusedError" in alert.last_error
    assert drain(db, settings(), base_url="").failed == []  # not due again before its retry delay

    page = get(client, "/endpoints", user="viewer").text
    assert "j•••@customer.example" in page
    assert "jane.doe@customer.example" not in page
    assert "owner alert paused: pending (1 try)" in unescape(page)
    assert "ConnectionRefusedError" in page

    # The server is back: the next due try sends it.
    db.execute("UPDATE cdr_webhook.owner_alert SET next_attempt_at = now()")
    handler = Inbox()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_OWNERS", smtp_conn(controller.port))
        assert drain(db, settings(), base_url="").sent == 1
    finally:
        controller.stop()
    assert len(handler.messages) == 1
    assert owner_alerts.pending(db) == []


def test_an_endpoint_without_an_owner_owes_nothing_and_a_bad_owner_extra_is_shown(db, inbox, monkeypatch):
    owned(monkeypatch)
    endpoints.pause(db, "cdr_webhook", reason="by hand", actor="bob")
    assert drain(db, settings(), base_url="").no_contact == 1
    assert owner_alerts.latest(db)["cdr_webhook"].status == "no_contact"

    owned(monkeypatch, owner_email="not-an-address")
    endpoints.resume(db, "cdr_webhook", actor="bob")
    done = drain(db, settings(), base_url="")
    [failure] = done.failed
    assert "extra 'owner_email'" in failure
    assert "is not an email address" in failure
    assert inbox.messages == []


def test_the_links_page_prefix_is_where_the_plugin_mounts_the_page():
    from cdr_webhook import owners
    from cdr_webhook.plugin import URL_PREFIX

    assert owners.PAGE_PREFIX == URL_PREFIX


def test_a_refused_login_is_recorded_without_the_smtp_password(db, monkeypatch, caplog):
    from aiosmtpd.smtp import AuthResult

    def refuse(server, session, envelope, mechanism, auth_data):
        return AuthResult(success=False, handled=False)

    handler = Inbox()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=free_port(),
        authenticator=refuse,
        auth_require_tls=False,
    )
    controller.start()
    try:
        conn = json.loads(smtp_conn(controller.port))
        conn.update(login="cdr-mailer", password="smtp-pa55word-xyz")
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_OWNERS", json.dumps(conn))
        owned(monkeypatch, owner_email="ops@customer.example")
        endpoints.pause(db, "cdr_webhook", reason="by hand", actor="bob")
        done = drain(db, settings(), base_url="")
    finally:
        controller.stop()
    [failure] = done.failed
    assert "SMTPAuthenticationError" in failure
    [alert] = owner_alerts.pending(db)
    assert "SMTPAuthenticationError" in alert.last_error
    assert handler.messages == []
    for text in (failure, alert.last_error, caplog.text):
        assert "smtp-pa55word-xyz" not in text


def test_the_owner_url_passes_the_egress_guard_and_a_non_2xx_keeps_the_alert_owed(db, inbox, monkeypatch):
    with Receiver(secret=OWNER_SECRET, api_key="only-with-this-key") as owner:  # 401 to our POST
        owned(monkeypatch, owner_webhook_url=owner.url + "/t0ken-in-path", owner_webhook_secret=OWNER_SECRET)
        endpoints.pause(db, "cdr_webhook", reason="by hand", actor="bob")

        refused = drain(db, settings(allowed_networks=""), base_url="")  # 127.0.0.1 is not allowed
        assert owner.received() == []
        db.execute("UPDATE cdr_webhook.owner_alert SET next_attempt_at = now()")
        answered = drain(db, settings(), base_url="")
        assert len(owner.received()) == 1

    [refusal] = refused.failed
    assert "EndpointRefused" in refusal
    assert "a loopback address" in refusal
    [unauthorized] = answered.failed
    assert "webhook: HTTP 401" in unauthorized
    [alert] = owner_alerts.pending(db)
    assert alert.attempts == 2
    for text in (refusal, unauthorized, alert.last_error):
        assert "t0ken-in-path" not in text


def test_pauses_by_hand_on_the_page_and_in_the_cli_owe_the_owner_one_alert_each(
    client, cdr_db, cdr_dsn, inbox, monkeypatch
):
    from tests.support.endpoints_cli import cli
    from tests.support.page import csrf_of, post

    owned(monkeypatch, owner_email="ops@customer.example")
    token = csrf_of(get(client, "/endpoints", user="admin").text)
    response = post(
        client, "/endpoints/pause", data={"csrf": token, "endpoint": "cdr_webhook", "reason": "maintenance"}
    )
    assert response.status_code == 303
    resumed = cli("resume", "cdr_webhook", "--by", "alice", dsn=cdr_dsn)
    assert resumed.returncode == 0, resumed.stderr

    assert [(a.kind, a.actor) for a in owner_alerts.pending(cdr_db)] == [
        ("paused", "admin (Deliveries page)"),
        ("resumed", "alice"),
    ]
    assert drain(cdr_db, settings(), base_url=BASE_URL).sent == 2
    assert [m["Subject"].rsplit(" ", 1)[1] for m in inbox.messages] == ["paused", "resumed"]
    page = unescape(get(client, "/endpoints", user="viewer").text)
    assert "o•••@customer.example" in page
    assert "owner alert resumed: sent" in page

    post(client, "/endpoints/pause", data={"csrf": token, "endpoint": "cdr_webhook", "reason": "again"})
    assert drain(cdr_db, settings(), base_url=BASE_URL).held == 1
    page = unescape(get(client, "/endpoints", user="viewer").text)
    assert "owner alert paused: held until" in page


class Refusing(Inbox):
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        return f"550 5.1.1 <{address}>: no such user"


def test_a_refused_recipient_keeps_the_alert_owed_and_the_address_masked(db, monkeypatch):
    handler = Refusing()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_OWNERS", smtp_conn(controller.port))
        owned(monkeypatch, owner_email="jane.doe@customer.example")
        endpoints.pause(db, "cdr_webhook", reason="by hand", actor="bob")
        done = drain(db, settings(), base_url="")
    finally:
        controller.stop()
    assert handler.messages == []
    [alert] = owner_alerts.pending(db)
    assert "SMTPRecipientsRefused" in alert.last_error
    assert "j•••@customer.example" in alert.last_error
    assert "jane.doe@customer.example" not in alert.last_error
    assert len(done.failed) == 1
