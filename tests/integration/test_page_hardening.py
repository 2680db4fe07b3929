"""The Deliveries page's hardening (issue #18, item 4), each finding tried the way it was found.

The page in-process on real PostgreSQL, with real SimpleAuthManager tokens (the fixtures of
test_deliveries_page.py), and real HTTP servers on 127.0.0.1 standing in for Airflow's REST API and
for an internal service a forged ``Host`` header would point at.
"""

# The page's fixtures come from test_deliveries_page.py: each test's parameter names one (F811).
# ruff: noqa: F811

from __future__ import annotations

import http.server
import json
import threading
from html import unescape
from typing import TYPE_CHECKING, Any

import pytest

from cdr_webhook.ledger import endpoints
from tests.support.page import csrf_of, get, post

if TYPE_CHECKING:
    from collections.abc import Iterator


class FakeServer:
    """An HTTP server on 127.0.0.1 that records every request and answers each with ``reply``."""

    def __init__(self, status: int = 200, body: bytes = b"{}", headers: dict[str, str] | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.reply = (status, body, headers or {"content-type": "application/json"})
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length", 0))
                server.requests.append(
                    {"method": self.command, "path": self.path, "headers": dict(self.headers),
                     "body": self.rfile.read(length)}
                )  # fmt: skip
                status, body, headers = server.reply
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer  # noqa: N815 (http.server's naming)

            def log_message(self, *args: Any) -> None:
                pass

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self.netloc = self.url.removeprefix("http://")
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


@pytest.fixture
def servers(monkeypatch) -> Iterator[tuple[FakeServer, FakeServer]]:
    """Airflow's API (``[api] base_url`` unset; ``[api] host``/``port`` name it) and an internal service."""
    airflow, internal = FakeServer(), FakeServer(body=b'{"secret": "internal-only-answer"}')
    monkeypatch.delenv("AIRFLOW__API__BASE_URL", raising=False)
    monkeypatch.setenv("AIRFLOW__API__HOST", "0.0.0.0")  # a wildcard bind: reached on loopback
    monkeypatch.setenv("AIRFLOW__API__PORT", airflow.netloc.split(":")[1])
    try:
        yield airflow, internal
    finally:
        airflow.close()
        internal.close()


def trigger(http, *, headers: dict[str, str] | None = None):
    token = csrf_of(get(http, "/", user="admin").text)
    http.cookies.clear()
    http.cookies.set("_token", http.tokens["admin"])
    data = {"csrf": token, "policy": "failed", "since": "2026-11-21", "to": "2026-11-21", "client": "42"}
    return http.post("/cdr-webhook/runs", data=data, headers=headers or {}, follow_redirects=False)


# -- the page's REST calls go to the configured address, never the request's Host ------------------


def test_a_forged_host_header_does_not_choose_where_the_api_server_calls(client, servers):
    airflow, internal = servers
    airflow.reply = (200, json.dumps({"dag_run_id": "manual__from-the-page"}).encode(),
                     {"content-type": "application/json"})  # fmt: skip

    response = trigger(client, headers={"host": internal.netloc})

    assert response.status_code == 200, response.text
    assert "manual__from-the-page" in response.text
    assert internal.requests == []  # the Host header's server was never contacted
    [call] = airflow.requests
    assert (call["method"], call["path"]) == ("POST", "/api/v2/dags/cdr_webhook/dagRuns")
    assert call["headers"]["authorization"] == f"Bearer {client.tokens['admin']}"
    assert json.loads(call["body"])["conf"]["client_id"] == 42


def test_base_url_wins_when_set(client, servers, monkeypatch):
    airflow, internal = servers
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", internal.url)  # here the "internal" one is Airflow
    monkeypatch.setenv("AIRFLOW__API__PORT", "1")
    internal.reply = (200, b'{"dag_run_id": "manual__x"}', {"content-type": "application/json"})
    assert trigger(client, headers={"host": airflow.netloc}).status_code == 200
    assert len(internal.requests) == 1
    assert airflow.requests == []


def test_a_redirect_is_not_followed_and_a_strangers_body_is_not_shown(client, servers):
    airflow, internal = servers
    airflow.reply = (307, b"moved", {"location": f"{internal.url}/steal", "content-type": "text/plain"})
    response = trigger(client)
    assert response.status_code == 502
    assert "Airflow answered HTTP 307" in response.text
    assert internal.requests == []

    airflow.reply = (500, b"<html>internal admin console: db password hunter2</html>",
                     {"content-type": "text/html"})  # fmt: skip
    response = trigger(client)
    assert response.status_code == 502
    assert "Airflow answered HTTP 500" in response.text
    assert "hunter2" not in response.text


def test_airflows_own_error_detail_is_shown(client, servers):
    airflow, _ = servers
    airflow.reply = (409, json.dumps({"detail": "run already exists"}).encode(),
                     {"content-type": "application/json"})  # fmt: skip
    response = trigger(client)
    assert response.status_code == 502
    assert "Airflow answered HTTP 409: run already exists" in unescape(response.text)


def test_proxy_variables_are_not_used(client, servers, monkeypatch):
    airflow, internal = servers
    airflow.reply = (200, b'{"dag_run_id": "manual__y"}', {"content-type": "application/json"})
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, internal.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert trigger(client).status_code == 200
    assert internal.requests == []
    assert len(airflow.requests) == 1


def test_an_unreachable_api_is_a_502_naming_it(client, servers, monkeypatch):
    monkeypatch.setenv("AIRFLOW__API__PORT", "1")
    response = trigger(client)
    assert response.status_code == 502
    assert "did not answer (ConnectionError)" in response.text


# -- pause takes only endpoints, with bounded one-line texts ----------------------------------------


def pause(http, endpoint: str, reason: str = ""):
    token = csrf_of(get(http, "/endpoints", user="admin").text)
    return post(http, "/endpoints/pause", data={"csrf": token, "endpoint": endpoint, "reason": reason})


def test_pausing_a_name_that_is_no_endpoint_is_refused_and_writes_nothing(client, cdr_db):
    for name in ("cdr_db", "airflow_db", "x" * 300, "cdr_webhook\n2026-11-28 ERROR forged", ""):
        response = pause(client, name)
        assert response.status_code in (400, 422), (name, response.status_code)
    assert cdr_db.execute("SELECT count(*) FROM cdr_webhook.endpoint_state").fetchone()[0] == 0
    assert "no endpoint &#39;cdr_db&#39;" in pause(client, "cdr_db").text
    assert "cdr_db" not in get(client, "/endpoints").text


def test_pausing_an_endpoint_of_the_ledger_or_of_a_route_name_works(client, cdr_db):
    cdr_db.execute(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, cdr_created_at, status) "
        "VALUES ('z', 'custom_receiver', now(), 'queued')"
    )
    assert pause(client, "custom_receiver").status_code == 303  # has ledger rows
    assert pause(client, "cdr_webhook_client_9").status_code == 303  # a route's name, no rows yet
    assert endpoints.paused_endpoints(cdr_db) == {"custom_receiver", "cdr_webhook_client_9"}


def test_reasons_are_one_line_and_bounded(client, cdr_db):
    forged = "maintenance\r\n2026-11-28 09:00:00 ERROR admin deleted everything\x1b[2J\u202e"
    assert pause(client, "cdr_webhook", reason=forged).status_code == 303
    reason = cdr_db.execute("SELECT reason FROM cdr_webhook.endpoint_event").fetchone()[0]
    assert reason == "maintenance  2026-11-28 09:00:00 ERROR admin deleted everything [2J"
    too_long = pause(client, "cdr_webhook_client_42", reason="r" * (endpoints.MAX_REASON_CHARS + 1))
    assert too_long.status_code == 400
    assert f"at most {endpoints.MAX_REASON_CHARS}" in too_long.text


def test_the_ledger_bounds_what_every_path_writes(cdr_db, populated):
    event = endpoints.pause(cdr_db, "cdr_webhook", reason="a\nb" + "c" * 1000, actor="eve\x00\n")
    assert event is not None
    assert event.reason.startswith("a bc")
    assert len(event.reason) == endpoints.MAX_REASON_CHARS
    assert event.actor == "eve"
    with pytest.raises(endpoints.EndpointNameError):
        endpoints.pause(cdr_db, "cdr_webhook\nforged", reason="r", actor="a")
    with pytest.raises(endpoints.EndpointNameError, match="no endpoint 'cdr_db'"):
        endpoints.check_pausable(cdr_db, "cdr_db")


def test_the_cli_refuses_a_name_that_is_no_endpoint_and_an_overlong_reason(cdr_db, cdr_dsn):
    from cdr_webhook.ledger import schema
    from tests.support.endpoints_cli import cli

    schema.migrate(cdr_db)
    refused = cli("pause", "cdr_db", "--reason", "oops", dsn=cdr_dsn)
    assert refused.returncode == 1
    assert "no endpoint 'cdr_db'" in refused.stderr
    long_reason = cli("pause", "cdr_webhook", "--reason", "r" * 501, dsn=cdr_dsn)
    assert long_reason.returncode == 2
    assert "at most 500" in long_reason.stderr
    assert cdr_db.execute("SELECT count(*) FROM cdr_webhook.endpoint_state").fetchone()[0] == 0


# -- every response carries the framing and sniffing policy ------------------------------------------


@pytest.mark.parametrize(
    ("path", "user", "status"),
    [("/", "viewer", 200), ("/static/style.css", "viewer", 200), ("/", None, 401),
     ("/delivery", "viewer", 422), ("/nowhere", "viewer", 404)],
)  # fmt: skip
def test_every_response_has_the_security_headers(client, path, user, status):
    response = get(client, path, user=user)
    assert response.status_code == status
    assert response.headers["content-security-policy"] == "frame-ancestors 'self'"
    assert response.headers["x-content-type-options"] == "nosniff"


# -- bounded inputs, a statement timeout, a pool ------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "says"),
    [("/", {"client": str(2**63)}, "client: &#39;9223372036854775808&#39; is out of range"),
     ("/", {"client": "-" + str(2**63 + 1)}, "is out of range"),
     ("/", {"since": "9999-12-31", "to": "9999-12-31"}, "is not between 1970-01-01 and 2999-12-31"),
     ("/", {"q": "1" * 201}, "search: 201 characters, at most 200"),
     ("/completeness", {"since": "9999-12-31", "to": "9999-12-31"}, "is not between"),
     ("/completeness", {"client": "9" * 30}, "is out of range")],
)  # fmt: skip
def test_out_of_range_filters_are_a_400_naming_the_field(client, path, params, says):
    response = get(client, path, **params)
    assert response.status_code == 400, response.text
    assert says in response.text


def test_a_task_tab_map_index_beyond_an_integer_is_refused(client):
    response = get(
        client, "/task", dag_id="cdr_webhook", run_id="r", task_id="post_cdr", map_index=str(2**40)
    )
    assert response.status_code == 422


def test_a_query_past_the_statement_timeout_is_cancelled_with_a_page_saying_so(client, cdr_dsn, settings_env):
    import psycopg

    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__PAGE_STATEMENT_TIMEOUT_SECONDS", "0.5")
    assert get(client, "/").status_code == 200  # the page's pool is open before the table is locked
    with psycopg.connect(cdr_dsn) as blocker:
        blocker.execute("LOCK TABLE cdr_webhook.delivery IN ACCESS EXCLUSIVE MODE")
        response = get(client, "/")
    assert response.status_code == 503
    assert "ran longer than 0.5 s (page_statement_timeout_seconds)" in response.text
    assert response.headers["x-content-type-options"] == "nosniff"


def test_requests_share_a_pool_of_connections_under_the_timeout(client, settings_env):
    from cdr_webhook.web import deps

    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__PAGE_STATEMENT_TIMEOUT_SECONDS", "7")
    pids = []
    for _ in range(3):
        generator = deps._db()
        conn = next(generator)
        pids.append(conn.info.backend_pid)
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "7s"
        generator.close()
    assert len(set(pids)) == 1  # one connection, reused


# -- a missing or unreachable CDR database is a page that says what to do ------------------------------


def test_a_missing_cdr_db_connection_is_a_503_naming_it(client, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_CDR_DB")
    for path in ("/", "/endpoints", "/completeness"):
        response = get(client, path)
        assert response.status_code == 503, response.text
        text = unescape(response.text)
        assert "the Airflow connection 'cdr_db', and the api-server has no such connection" in text
        assert "AIRFLOW_CONN_CDR_DB" in text


def test_an_unreachable_cdr_database_is_a_503_without_its_password(client, monkeypatch):
    from demo.connections import postgres_conn

    monkeypatch.setenv(
        "AIRFLOW_CONN_CDR_DB", postgres_conn("host=127.0.0.1 port=1 user=cdr password=hunter2-pw dbname=cdr")
    )
    response = get(client, "/")
    assert response.status_code == 503
    text = unescape(response.text)
    assert "The CDR database of the Airflow connection 'cdr_db' (127.0.0.1:1/cdr) cannot be reached" in text
    assert "Connection refused" in text
    assert "hunter2-pw" not in text


# -- an API key echoed in base64 is scrubbed before the ledger stores it -----------------------------


def test_an_api_key_echoed_in_base64_is_scrubbed_in_the_ledger_and_on_the_page(
    client, cdr_db, populated, monkeypatch
):
    import base64
    import time

    from cdr_webhook import ledger
    from cdr_webhook.deliver.hook import CdrWebhookHook
    from cdr_webhook.outcome import Attempt, Decision, Verdict
    from cdr_webhook.signing import build_headers
    from demo.connections import http_conn
    from tests.support.deployments import API_KEY, SIGNING_SECRET

    echoed = {
        "seen_key": base64.b64encode(API_KEY.encode()).decode(),
        "seen_basic": base64.urlsafe_b64encode(f"cdr:{API_KEY}".encode()).decode().rstrip("="),
    }
    receiver = FakeServer(status=400, body=json.dumps(echoed).encode())
    try:
        connection = http_conn(receiver.url, api_key=API_KEY, signing_secret=SIGNING_SECRET)
        monkeypatch.setenv("AIRFLOW_CONN_CDR_WEBHOOK_CLIENT_42", connection)
        hook = CdrWebhookHook("cdr_webhook_client_42", timeout=5, allowed_networks=("127.0.0.0/8",))
        body = b'{"cdr_id": "x"}'
        headers = build_headers(msg_id="msg_1", timestamp=int(time.time()), body=body, api_key=API_KEY,
                                signing_secrets=[SIGNING_SECRET])  # fmt: skip
        result = hook.post(body, headers).scrubbed(hook.endpoint.secrets())  # as every attempt is
    finally:
        receiver.close()
    assert receiver.requests[0]["headers"]["x-api-key"] == API_KEY  # it did get the key to echo
    cdr_id = populated["failed_42"]
    created = cdr_db.execute("SELECT cdr_created_at FROM cdr_webhook.delivery WHERE cdr_id = %s", (cdr_id,))
    claim = ledger.Claim(cdr_id, "cdr_webhook_client_42", 42, created.fetchone()[0], "failed", 2)
    decision = Decision(Verdict.FAIL_NOW, error=f"HTTP {result.http_status}")
    ledger.record_attempts(cdr_db, [Attempt(claim, result, decision, "msg_1")])  # as every task records

    stored = cdr_db.execute(
        "SELECT string_agg(response_excerpt, ' ') FROM cdr_webhook.delivery_attempt WHERE cdr_id = %s",
        (cdr_id,),
    ).fetchone()[0]
    page = unescape(get(client, "/delivery", cdr_id=cdr_id, endpoint="cdr_webhook_client_42").text)
    assert '"seen_key": "***"' in stored
    assert '"seen_key": "***"' in page
    for value in echoed.values():
        assert value[4:-4] not in stored
        assert value[4:-4] not in page
