"""CdrWebhookHook against real HTTP servers on 127.0.0.1: headers, redirects, timeouts, bounded reads."""

from __future__ import annotations

import base64
import http.server
import json
import socket
import threading
import time

import pytest

from cdr_webhook.deliver.hook import CdrWebhookHook
from cdr_webhook.endpoint_config import EndpointConfigError
from cdr_webhook.signing import build_headers
from demo.receiver import Receiver
from tests.support.drip_server import DripServer

API_KEY = "key-5f2b9c1e7a"
LOOPBACK = ("127.0.0.0/8",)
SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()
BODY = b'{"cdr_id":"1","callerid":"{{ 7 * 7 }}"}'


def http_conn(monkeypatch, conn_id: str, url: str, *, password: str | None = API_KEY, **extra) -> None:
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{conn_id.upper()}",
        json.dumps({"conn_type": "http", "host": url, "password": password, "extra": extra}),
    )


def headers_for(body: bytes = BODY) -> dict[str, str]:
    return build_headers(
        msg_id="msg_1", timestamp=int(time.time()), body=body, api_key=API_KEY, signing_secrets=[SECRET]
    )


@pytest.fixture
def receiver():
    with Receiver(secret=SECRET, api_key=API_KEY) as server:
        yield server


def test_sends_exactly_our_headers_and_none_of_the_extras(monkeypatch, receiver):
    http_conn(monkeypatch, "hook_test", receiver.url, login="user", signing_secret=SECRET, x_leak="nope")
    hook = CdrWebhookHook("hook_test", timeout=5, allowed_networks=LOOPBACK)

    result = hook.post(BODY, headers_for())

    assert (result.http_status, result.error) == (200, None)
    [request] = receiver.received()
    assert request.signature_ok is True
    assert request.body == BODY
    assert set(request.headers) == {
        "host",
        "user-agent",
        "accept-encoding",
        "content-length",
        "content-type",
        "x-api-key",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
    assert request.headers["x-api-key"] == API_KEY
    assert request.headers["accept-encoding"] == "identity"
    assert request.path == "/cdr-hook"


def test_the_endpoint_comes_from_the_connection_once(monkeypatch):
    http_conn(monkeypatch, "hook_test", "http://127.0.0.1:9/x", signing_secret=[SECRET, SECRET])
    hook = CdrWebhookHook("hook_test")
    assert (hook.endpoint.api_key, hook.endpoint.signing_secrets) == (API_KEY, (SECRET, SECRET))
    http_conn(monkeypatch, "hook_test", "http://127.0.0.1:9/x", password=None)
    assert hook.endpoint.api_key == API_KEY  # read once per hook (once per task)
    assert CdrWebhookHook("hook_test").endpoint.api_key is None
    http_conn(monkeypatch, "hook_test", "http://127.0.0.1:9/x", signing_secret={"a": 1})
    with pytest.raises(
        EndpointConfigError, match="extra 'signing_secret': must be a whsec_ string or a list"
    ):
        _ = CdrWebhookHook("hook_test").endpoint
    monkeypatch.delenv("AIRFLOW_CONN_HOOK_TEST")
    with pytest.raises(EndpointConfigError, match="connection 'hook_test': does not exist"):
        _ = CdrWebhookHook("hook_test").endpoint


def test_redirect_is_a_failure_and_its_target_is_never_contacted(monkeypatch):
    with Receiver() as target, Receiver(redirect_to=target.url) as redirecting:
        redirecting.script("1", [302])
        http_conn(monkeypatch, "hook_test", redirecting.url)

        result = CdrWebhookHook("hook_test", timeout=5, allowed_networks=LOOPBACK).post(BODY, headers_for())

        assert result.http_status == 302
        assert len(redirecting.received()) == 1
        assert target.received() == []


def test_a_silent_server_times_out(monkeypatch):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        http_conn(monkeypatch, "hook_test", f"http://127.0.0.1:{listener.getsockname()[1]}/hook")
        started = time.monotonic()

        result = CdrWebhookHook("hook_test", timeout=1, allowed_networks=LOOPBACK).post(BODY, headers_for())

        assert result.http_status is None
        assert result.error.startswith("no complete reply within the 1 s deadline")
        assert time.monotonic() - started < 2


# --- one deadline per POST: a receiver cannot hold it by answering a byte at a time -----------------

STATUS_AND_HEADERS = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: 7f3a9c\r\ncontent-length: 2\r\n\r\n"
)


def _deadline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cdr-webhook-deadline")]


def test_a_status_line_sent_a_byte_at_a_time_is_cut_off_at_the_deadline(monkeypatch):
    # Each byte comes well within the socket timeout: only a deadline on the whole exchange stops it.
    with DripServer(drip=STATUS_AND_HEADERS + b"ok", interval=0.2) as server:
        http_conn(monkeypatch, "hook_test", f"http://127.0.0.1:{server.port}/hook?token=tok-abc123")
        started = time.monotonic()

        result = CdrWebhookHook("hook_test", timeout=1.5, allowed_networks=LOOPBACK).post(BODY, headers_for())

        elapsed = time.monotonic() - started
        assert (result.http_status, result.response_excerpt) == (None, None)
        assert result.error == (
            "no complete reply within the 1.5 s deadline (the receiver answered too slowly or not at all)"
        )
        assert "tok-abc123" not in result.error
        assert elapsed < 2.0
        assert 1400 <= result.latency_ms <= 2000
        assert result.refused is False  # a retryable failure
        assert len(server.requests) == 1
        assert server.finished == 0


def test_a_body_sent_a_byte_at_a_time_keeps_the_status_and_a_partial_excerpt(monkeypatch):
    body = b'{"accepted":true,"note":"' + b"x" * 100 + b'"}'
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body)
    with DripServer(head=head, drip=body, interval=0.2) as server:
        http_conn(monkeypatch, "hook_test", f"http://127.0.0.1:{server.port}/hook")
        started = time.monotonic()

        result = CdrWebhookHook("hook_test", timeout=1.5, allowed_networks=LOOPBACK).post(BODY, headers_for())

        assert time.monotonic() - started < 2.0
        assert (result.http_status, result.error) == (200, None)  # the status decides: delivered
        assert result.response_excerpt
        assert body.decode().startswith(result.response_excerpt)
        assert len(result.response_excerpt) < len(body)
        assert server.finished == 0


def test_a_slow_resolver_counts_against_the_deadline(monkeypatch, receiver):
    released = threading.Event()

    def stuck_resolver(host: str, port: int) -> list[str]:
        released.wait(30)  # a DNS server that does not answer
        return ["127.0.0.1"]

    port = receiver.url.split(":")[2].split("/")[0]
    http_conn(monkeypatch, "hook_test", f"http://hooks.test:{port}/cdr-hook")
    hook = CdrWebhookHook("hook_test", timeout=1, allowed_networks=LOOPBACK, resolver=stuck_resolver)
    started = time.monotonic()
    try:
        result = hook.post(BODY, headers_for())
    finally:
        released.set()

    assert time.monotonic() - started < 1.5
    assert result.http_status is None
    assert result.error == (
        "no complete reply within the 1 s deadline (resolving the host or connecting took too long)"
    )
    assert receiver.received() == []


def test_a_resolver_error_within_the_deadline_is_reported_as_such(monkeypatch):
    def unknown_host(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    http_conn(monkeypatch, "hook_test", "http://hooks.test:9/cdr-hook")
    hook = CdrWebhookHook("hook_test", timeout=5, allowed_networks=LOOPBACK, resolver=unknown_host)

    result = hook.post(BODY, headers_for())

    assert result.http_status is None
    assert (
        result.error == "connection failed: cannot resolve hooks.test: [Errno -2] Name or service not known"
    )
    assert result.latency_ms < 1000


def test_a_fast_receiver_is_unaffected_and_no_watchdog_thread_stays(monkeypatch, receiver):
    http_conn(monkeypatch, "hook_test", receiver.url)
    hook = CdrWebhookHook("hook_test", timeout=1.5, allowed_networks=LOOPBACK)

    results = [hook.post(BODY, headers_for()) for _ in range(3)]

    assert [(r.http_status, r.error, r.response_excerpt) for r in results] == [
        (200, None, '{"status": 200}')
    ] * 3
    assert all(r.latency_ms < 500 for r in results)
    assert _deadline_threads() == []
    assert len(receiver.received()) == 3


def test_a_sessions_block_keeps_one_watchdog_thread_between_its_posts_and_ends_it(monkeypatch, receiver):
    http_conn(monkeypatch, "hook_test", receiver.url)
    hook = CdrWebhookHook("hook_test", timeout=1.5, allowed_networks=LOOPBACK)

    with hook.sessions() as session:
        first = hook.post(BODY, headers_for(), session=session())
        kept = _deadline_threads()
        second = hook.post(BODY, headers_for(), session=session())
        assert _deadline_threads() == kept  # the same thread, not a new one per POST
    assert len(kept) == 1
    assert (first.http_status, second.http_status) == (200, 200)
    assert _deadline_threads() == []


def test_a_sessions_block_resolves_each_post_in_one_kept_thread_that_ends_with_it(monkeypatch, receiver):
    resolved_in: list[threading.Thread] = []

    def resolver(host: str, port: int) -> list[str]:
        resolved_in.append(threading.current_thread())
        return ["127.0.0.1"]

    port = receiver.url.split(":")[2].split("/")[0]
    http_conn(monkeypatch, "hook_test", f"http://hooks.test:{port}/cdr-hook")
    hook = CdrWebhookHook("hook_test", timeout=1.5, allowed_networks=LOOPBACK, resolver=resolver)

    with hook.sessions() as session:
        results = [hook.post(BODY, headers_for(), session=session()) for _ in range(3)]

    assert [r.http_status for r in results] == [200] * 3
    assert len(resolved_in) == 3  # every POST resolved its host again
    assert len(set(resolved_in)) == 1  # in the one thread the block kept
    resolved_in[0].join(2)
    assert not resolved_in[0].is_alive()


def test_connection_refused_is_described_without_the_url(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    http_conn(monkeypatch, "hook_test", f"http://127.0.0.1:{port}/hook/tok-abc123?token=tok-abc123")

    result = CdrWebhookHook("hook_test", timeout=2, allowed_networks=LOOPBACK).post(BODY, headers_for())

    assert result.http_status is None
    assert result.error.startswith("connection failed:")
    assert "Connection refused" in result.error
    assert "tok-abc123" not in result.error


def test_proxy_environment_variables_are_ignored(monkeypatch, receiver):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    http_conn(monkeypatch, "hook_test", receiver.url)

    assert (
        CdrWebhookHook("hook_test", timeout=5, allowed_networks=LOOPBACK)
        .post(BODY, headers_for())
        .http_status
        == 200
    )


class _HugeBody(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(500)
        self.send_header("content-length", str(10 * 1024 * 1024))
        self.end_headers()
        chunk = b"\xff" + b"x" * 65535
        try:
            for _ in range(160):
                self.wfile.write(chunk)
        except OSError:
            pass  # the client stopped reading, as it should

    def log_message(self, *args):
        pass


def test_only_a_bounded_excerpt_of_the_response_is_read(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HugeBody)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        http_conn(monkeypatch, "hook_test", f"http://127.0.0.1:{server.server_address[1]}/")
        result = CdrWebhookHook("hook_test", timeout=5, allowed_networks=LOOPBACK).post(BODY, headers_for())
    finally:
        server.shutdown()
        server.server_close()
    assert result.http_status == 500
    assert 0 < len(result.response_excerpt.encode()) <= 2048
    assert result.response_excerpt.startswith("\ufffd")
