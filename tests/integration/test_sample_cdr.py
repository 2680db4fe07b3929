"""A test CDR (cdr_webhook.deliver.sample) against real receivers on 127.0.0.1 and real PostgreSQL.

It goes the way a delivery goes (the same headers and signature as a real delivery to the same
receiver), once, and leaves an endpoint event, never a ledger row; each verdict in the operator's words.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from cdr_webhook.deliver.sample import TEST_HEADER, send_test, verdict_of
from cdr_webhook.ledger import endpoints, events
from cdr_webhook.outcome import PostResult
from demo.connections import http_conn
from demo.dialer import Dialer
from demo.receiver import Receiver
from tests.integration.test_operators import run_try
from tests.support.endpoints_cli import cli
from tests.support.payloads import assert_valid_payload
from tests.support.pki import issue, pem, tls_context
from tests.support.task_instances import API_KEY, ENDPOINT, SECRET, FakeTaskInstance, connect_endpoint, queue

if TYPE_CHECKING:
    from collections.abc import Iterator

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def receiver(monkeypatch) -> Iterator[Receiver]:
    with Receiver(secret=SECRET, api_key=API_KEY) as server:
        connect_endpoint(monkeypatch, server.url, signing_secret=SECRET)
        yield server


def ledger_rows(conn) -> int:
    return conn.execute("SELECT count(*) FROM cdr_webhook.delivery").fetchone()[0]


def test_a_test_cdr_has_the_headers_and_signature_of_a_real_delivery(db, receiver):
    cdr = Dialer(db).cdr(created_at=NOW - dt.timedelta(minutes=5), client_id=7)
    queue(db, cdr)
    run_try(cdr, FakeTaskInstance())  # a real delivery to the same receiver
    [real] = receiver.received(cdr)

    outcome = send_test(db, ENDPOINT, actor="alice")

    [test] = [r for r in receiver.received() if r.cdr_id == outcome.cdr_id]
    assert (outcome.verdict, outcome.kind, outcome.http_status) == ("delivered", "delivered", 200)
    assert test.signature_ok is True
    assert real.signature_ok is True
    assert set(test.headers) == set(real.headers) | {TEST_HEADER}
    assert test.headers[TEST_HEADER] == "true"
    assert TEST_HEADER not in real.headers
    assert test.headers["x-api-key"] == real.headers["x-api-key"] == API_KEY
    assert test.path == real.path
    # The 19 fields, valid by the payload's schema, plainly a test, and routed: client 7's endpoint.
    payload = test.payload
    assert_valid_payload(payload)
    assert list(payload) == list(real.payload)
    assert payload["cdr_id"].startswith("test-")
    assert payload["cdr_id"] == outcome.cdr_id
    assert payload["client_id"] == 7
    assert payload["hangup_cause"] == "NORMAL_CLEARING"


def test_a_503_is_not_retried_and_nothing_is_recorded_as_a_delivery(db, monkeypatch):
    server = Answer(503)
    before = ledger_rows(db)
    try:
        connect_endpoint(monkeypatch, server.url, signing_secret=SECRET)
        outcome = send_test(db, ENDPOINT, actor="alice")
        time.sleep(1.5)  # longer than the tests' retry delay (1 s): no second POST follows
    finally:
        server.close()

    assert outcome.verdict == "would be retried: 503 Service Unavailable"
    assert server.count == 1  # once, outside any retry schedule
    assert ledger_rows(db) == before
    assert not db.execute("SELECT count(*) FROM cdr_webhook.delivery_attempt").fetchone()[0]
    # A test counts in no failure streak: the endpoint's counters are not touched.
    assert not db.execute(
        "SELECT 1 FROM cdr_webhook.endpoint_state WHERE endpoint = %s", (ENDPOINT,)
    ).fetchall()
    [event] = events.recent_events(db, ENDPOINT)
    assert (event.action, event.actor, event.http_status, event.cdr_id) == (
        "tested",
        "alice",
        503,
        outcome.cdr_id,
    )
    assert event.reason == outcome.verdict
    assert event.latency_ms is not None
    assert event.latency_ms >= 0


def test_a_paused_endpoint_can_be_tested_and_stays_paused(db, receiver):
    endpoints.pause(db, ENDPOINT, reason="onboarding", actor="bob")

    outcome = send_test(db, ENDPOINT, actor="alice")

    assert outcome.delivered
    assert len(receiver.received()) == 1
    assert endpoints.is_paused(db, ENDPOINT)
    assert [e.action for e in events.recent_events(db, ENDPOINT)] == ["tested", "paused"]


class Answer:
    """A receiver that answers every POST with one status and body (the verdicts' cases)."""

    def __init__(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.count = 0
        answer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                self.rfile.read(int(self.headers.get("content-length", 0)))
                answer.count += 1
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.mark.parametrize(
    ("status", "headers", "verdict"),
    [
        (200, {}, "delivered"),
        (204, {}, "delivered"),
        (503, {}, "would be retried: 503 Service Unavailable"),
        (429, {}, "would be retried: 429 Too Many Requests"),
        (401, {}, "fails at once: 401, check the x-api-key"),
        (403, {}, "fails at once: 403, check the x-api-key"),
        (400, {}, "fails at once: 400 Bad Request"),
        (410, {}, "fails at once: 410, the receiver says this endpoint is gone (a delivery pauses it)"),
        (302, {"location": "http://127.0.0.1:1/x"}, "fails at once: 302, redirects are never followed"),
    ],
)
def test_each_http_verdict_in_our_words(db, monkeypatch, status, headers, verdict):
    server = Answer(status, b'{"error": "k3y-echoed-7d41c0ffee9b2e is wrong"}', headers)
    try:
        connect_endpoint(monkeypatch, server.url, signing_secret=SECRET)
        outcome = send_test(db, ENDPOINT, actor="alice")
    finally:
        server.close()
    assert outcome.verdict.startswith(verdict)
    assert server.count == 1
    assert outcome.http_status == status
    # The receiver echoed the x-api-key: the event keeps its reply scrubbed.
    assert API_KEY not in (outcome.excerpt or "")
    assert API_KEY not in json.dumps([e.response_excerpt for e in events.recent_events(db, ENDPOINT)])
    assert endpoints.is_paused(db, ENDPOINT) is False  # not even a 410 pauses: a test is no delivery


def test_the_egress_guard_refuses_and_nothing_is_sent(db, monkeypatch, settings_env, receiver):
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__ALLOWED_NETWORKS", "10.0.0.0/8")

    outcome = send_test(db, ENDPOINT, actor="alice")

    assert outcome.kind == "refused"
    assert outcome.verdict.startswith("refused by the egress guard: ")
    assert "ALLOWED_NETWORKS" in outcome.verdict
    assert receiver.received() == []


def test_tls_failure_is_said_as_tls(db, monkeypatch, tmp_path):
    cert, key = pem(*issue("127.0.0.1", usage=ExtendedKeyUsageOID.SERVER_AUTH))  # self-signed: not trusted
    (tmp_path / "s.crt").write_text(cert)
    (tmp_path / "s.key").write_text(key)
    context = tls_context((tmp_path / "s.crt", tmp_path / "s.key"))
    with Receiver(secret=SECRET, api_key=API_KEY, tls=context) as server:
        connect_endpoint(monkeypatch, server.url, signing_secret=SECRET)
        outcome = send_test(db, ENDPOINT, actor="alice")
        assert server.received() == []
    assert outcome.verdict.startswith("TLS: ")
    assert "certificate" in outcome.verdict


def test_a_connection_that_cannot_be_used_is_a_verdict_and_an_event(db, monkeypatch):
    connect_endpoint(monkeypatch, "https://hooks.example/x", signing_secret="whsec_notbase64!!")

    outcome = send_test(db, ENDPOINT, actor="alice")

    assert outcome.kind == "refused"
    assert outcome.verdict.startswith("not sent: connection 'cdr_webhook_client_7' extra 'signing_secret'")
    assert [e.action for e in events.recent_events(db, ENDPOINT)] == ["tested"]


def test_an_unknown_name_is_refused_and_leaves_no_event(db):
    with pytest.raises(endpoints.EndpointNameError):
        send_test(db, "cdr_db", actor="alice")
    assert not db.execute("SELECT count(*) FROM cdr_webhook.endpoint_event").fetchone()[0]


def test_a_network_error_would_be_retried():
    result = PostResult(None, None, None, 3, sent_at=0.0, error="connection failed: refused")
    assert verdict_of(result) == ("retry", "would be retried: connection failed: refused")


def test_the_cli_sends_a_test_cdr_and_says_the_verdict(db, cdr_dsn, monkeypatch):
    server = Answer(401, b"bad key")
    try:
        connection = http_conn(server.url, api_key=API_KEY, signing_secret=SECRET)
        env = {f"AIRFLOW_CONN_{ENDPOINT.upper()}": connection}
        failed = cli("test", ENDPOINT, "--by", "carol", dsn=cdr_dsn, **env)
    finally:
        server.close()
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "fails at once: 401, check the x-api-key" in failed.stdout
    assert "HTTP status 401" in failed.stdout
    assert "reply: bad key" in failed.stdout
    assert "the test CDR was not delivered" in failed.stderr
    assert server.count == 1
    [event] = events.recent_events(db, ENDPOINT)
    assert (event.actor, event.http_status) == ("carol", 401)
    assert ledger_rows(db) == 0


def test_the_default_endpoints_test_cdr_names_its_latest_client(db, monkeypatch):
    with Receiver(secret=SECRET, api_key=API_KEY) as server:
        monkeypatch.setenv(
            "AIRFLOW_CONN_CDR_WEBHOOK", http_conn(server.url, api_key=API_KEY, signing_secret=SECRET)
        )
        for client, minutes in ((4, 9), (5, 1)):  # client 5's row is the newest
            db.execute(
                "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at) "
                "VALUES (%s, 'cdr_webhook', %s, %s)",
                (f"c{client}", client, NOW - dt.timedelta(minutes=minutes)),
            )
        send_test(db, "cdr_webhook", actor="alice")
        [request] = server.received()
    assert request.payload["client_id"] == 5
