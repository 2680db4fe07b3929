"""An endpoint behind OAuth2 client credentials, against a real token endpoint and receiver on 127.0.0.1.

The tries run the real operator, lanes and hook (in this process, and in two worker processes at
once); the token comes from :class:`tests.support.oauth2_server.TokenServer` through the egress guard, is
shared through the CDR database, replaced once after a 401, and never reaches a log, the ledger in
plain text, what a try returns, or the page.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from html import unescape

import pytest
from airflow.sdk.exceptions import AirflowFailException
from cryptography.fernet import Fernet

from cdr_webhook.deliver.operator import CdrWebhookOperator, RetryLater
from cdr_webhook.ledger import tokens as token_rows
from demo.connections import http_conn
from demo.dialer import Dialer
from tests.conftest import ROOT
from tests.support.deployments import API_KEY as PAGE_KEY
from tests.support.deployments import SIGNING_SECRET
from tests.support.oauth2_server import BearerReceiver, TokenServer
from tests.support.page import csrf_of, get, post
from tests.support.secrets_sweep import Sweep
from tests.support.task_instances import (
    API_KEY,
    ENDPOINT,
    SECRET,
    FakeTaskInstance,
    connect_endpoint,
    queue,
    row,
)

NOW = dt.datetime.now(dt.UTC)
CLIENT_ID = "cdr-sender"
CLIENT_SECRET = "cl13nt-s3cr3t-4f1d9c2b7e"
HEADER_SECRET = "hdr-s3cr3t-0a1b2c3d4e5f"
#: A worker process's try of a chunk (beside this module).
WORKER = "tests.integration.oauth2_worker"


@pytest.fixture
def tokens(monkeypatch):
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", Fernet.generate_key().decode())
    with TokenServer(client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as server:
        yield server


@pytest.fixture
def receiver(tokens, monkeypatch):
    # A careless receiver: every reply carries the request's headers back, the bearer token too.
    with BearerReceiver(tokens, secret=SECRET, api_key=API_KEY, echo=True) as server:
        connect_endpoint(
            monkeypatch, server.url, signing_secret=SECRET, oauth2_token_url=tokens.url,
            oauth2_client_id=CLIENT_ID, oauth2_client_secret=CLIENT_SECRET, oauth2_scope=["cdr.write"],
            oauth2_audience="https://crm.example", headers={"X-Tenant": "acme"},
            secret_headers={"X-Shared-Secret": HEADER_SECRET},
        )  # fmt: skip
        yield server


def cdrs(conn, n: int) -> list[str]:
    dialer = Dialer(conn)
    made = [dialer.cdr(created_at=NOW - dt.timedelta(minutes=30, seconds=-i), client_id=7) for i in range(n)]
    for cdr in made:
        queue(conn, cdr)
    return made


def run(cdr_ids: list[str], ti: FakeTaskInstance | None = None, *, cdrs_per_task: int = 100) -> object:
    operator = CdrWebhookOperator(
        task_id="post_cdr", cdr_ids=cdr_ids, http_conn_id=ENDPOINT, cdrs_per_task=cdrs_per_task, retries=2
    )
    return operator.execute({"ti": ti or FakeTaskInstance()})


def sweep(server: TokenServer, *texts: str, dsn: str | None = None) -> None:
    """Look for the client secret, the secret header and every token issued, in every form the
    secrets sweep knows, in ``texts`` and (``dsn``) every table of the CDR database."""
    found = Sweep(
        {"client secret": CLIENT_SECRET, "secret header": HEADER_SECRET}
        | {f"token {n}": issued.token for n, issued in enumerate(server.issued, 1)}
    )
    for n, text in enumerate(texts):
        found.text(f"text {n}", text)
    if dsn is not None:
        found.database(dsn, "cdr", fernet_key=os.environ["AIRFLOW__CORE__FERNET_KEY"])
    assert not found.findings, found.report()


def test_a_chunk_fetches_one_token_and_every_post_carries_it_with_the_api_key_signature_and_headers(
    db, cdr_dsn, receiver, tokens, capsys, caplog
):
    chunk = cdrs(db, 6)

    returned = run(chunk)

    assert returned is None  # nothing for XCom
    assert {cdr: row(db, cdr)["status"] for cdr in chunk} == dict.fromkeys(chunk, "delivered")
    [issued] = tokens.issued
    assert (issued.client_auth, issued.scope, issued.audience) == (
        "client_secret_basic", "cdr.write", "https://crm.example"
    )  # fmt: skip
    got = receiver.received()
    assert len(got) == 6
    for request in got:
        assert request.answered == 200
        assert request.signature_ok is True
        assert request.headers["authorization"] == f"Bearer {issued.token}"
        assert request.headers["x-api-key"] == API_KEY
        assert (request.headers["x-tenant"], request.headers["x-shared-secret"]) == ("acme", HEADER_SECRET)
    # Shared through the ledger, encrypted: the row holds no token a reader of the database could use.
    stored = token_rows.read_token(db, ENDPOINT)
    assert stored is not None
    assert issued.token.encode() not in stored.ciphertext
    assert token_rows.token_fetches(db, ENDPOINT) == 1
    # The echoed replies were scrubbed before the ledger kept their excerpts.
    assert "***" in row(db, chunk[0])["response_excerpt"]
    logs = capsys.readouterr().out + caplog.text
    assert "fetched an OAuth2 access token from http://127.0.0.1" in logs
    sweep(tokens, logs, dsn=cdr_dsn)  # the ledger's token row too, even with Airflow's fernet_key


def test_the_next_try_reuses_the_token_and_one_that_expires_is_replaced(db, receiver, tokens):
    tokens.lifetime = 2
    first, second, third = cdrs(db, 3)
    receiver.script(first, [503])

    with pytest.raises(RetryLater):
        run([first, second], FakeTaskInstance(try_number=1))
    run([first, second], FakeTaskInstance(try_number=2))  # a new task: a new hook, the shared token

    assert len(tokens.issued) == 1
    assert row(db, first)["status"] == "delivered"
    time.sleep(2)  # past its expiry (and the 0.2 s taken before it)
    run([third], FakeTaskInstance(map_index=1))
    assert len(tokens.issued) == 2
    assert receiver.received(third)[0].headers["authorization"] == f"Bearer {tokens.issued[1].token}"


def test_two_worker_processes_at_once_fetch_one_token_between_them(db, cdr_dsn, receiver, tokens):
    tokens.delay = 1.0  # the first fetch is still under way when the second worker wants a token
    chunk = cdrs(db, 6)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT)])}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.integration.oauth2_worker",
                str(index),
                *chunk[index * 3 : index * 3 + 3],
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for index in range(2)
    ]
    for worker in workers:
        assert worker.stdout.readline().strip() == "ready"
    for worker in workers:  # both send from now on
        worker.stdin.write("go\n")
        worker.stdin.flush()
    outputs = [worker.communicate(timeout=60)[0] for worker in workers]

    assert [worker.returncode for worker in workers] == [0, 0], outputs
    assert all(json.loads(out.strip().splitlines()[-1]) == {"returned": None} for out in outputs)
    assert tokens.requests == 1  # the second worker waited for the first one's token
    [issued] = tokens.issued
    assert {r.headers["authorization"] for r in receiver.received()} == {f"Bearer {issued.token}"}
    assert {row(db, cdr)["status"] for cdr in chunk} == {"delivered"}
    assert token_rows.token_fetches(db, ENDPOINT) == 1
    sweep(tokens, *outputs, dsn=cdr_dsn)


def test_a_401_to_a_revoked_token_brings_one_new_token_and_the_post_goes_again(db, receiver, tokens):
    early, *chunk = cdrs(db, 7)
    run([early], FakeTaskInstance(map_index=1))
    tokens.revoke_all()  # the receiver now refuses the shared token

    run(chunk)

    assert len(tokens.issued) == 2  # however many POSTs met the 401 at once
    new = f"Bearer {tokens.issued[1].token}"
    for cdr in chunk:
        answers = [(r.answered, r.headers["authorization"] == new) for r in receiver.received(cdr)]
        assert answers[-1] == (200, True)
        assert row(db, cdr)["attempts"] == 1  # the 401 before the new token is no attempt of its own


def test_a_receiver_that_refuses_every_token_gets_one_new_one_then_the_401_is_the_outcome(
    db, receiver, tokens, monkeypatch
):
    monkeypatch.setattr(tokens, "valid", lambda token: False)
    one, *chunk = cdrs(db, 5)

    with pytest.raises(AirflowFailException, match="HTTP 401"):
        run([one], cdrs_per_task=1)
    assert len(tokens.issued) == 2
    assert (row(db, one)["status"], row(db, one)["http_status"]) == ("failed", 401)

    with pytest.raises(AirflowFailException, match="4 CDR\\(s\\) of this chunk failed for good"):
        run(chunk, FakeTaskInstance(map_index=1))
    # A new task replaces the refused token once, however many of its POSTs met the 401 at once.
    assert len(tokens.issued) == 3
    assert {row(db, cdr)["http_status"] for cdr in chunk} == {401}


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ((503, {"error": "temporarily_unavailable"}), "answered HTTP 503"),
        (
            (401, {"error": "invalid_client", "error_description": "client authentication failed"}),
            "refused the request: invalid_client (client authentication failed)",
        ),
    ],
    ids=["down", "invalid_client"],
)
def test_a_failing_token_endpoint_is_a_retryable_failure_that_names_it(
    db, cdr_dsn, receiver, tokens, answer, reason
):
    tokens.fail_with = answer
    chunk = cdrs(db, 4)

    with pytest.raises(RetryLater, match="4 CDR\\(s\\) of this chunk to retry") as raised:
        run(chunk)

    expected = f"OAuth2 token endpoint http://127.0.0.1:{tokens.url.split(':')[2].split('/')[0]} {reason}"
    assert {row(db, cdr)["status"] for cdr in chunk} == {"queued"}
    assert {row(db, cdr)["error"] for cdr in chunk} == {expected}
    assert receiver.received() == []
    assert tokens.requests == 1  # the chunk's other POSTs did not ask again
    sweep(tokens, str(raised.value), dsn=cdr_dsn)


def test_the_pages_name_the_authentication_and_a_test_cdr_gets_a_token_never_shown(
    client, cdr_dsn, tokens, populated, monkeypatch
):
    with BearerReceiver(tokens, secret=SIGNING_SECRET, api_key=PAGE_KEY, echo=True) as server:
        connection = http_conn(
            server.url, api_key=PAGE_KEY, signing_secret=SIGNING_SECRET, oauth2_token_url=tokens.url,
            oauth2_client_id=CLIENT_ID, oauth2_client_secret=CLIENT_SECRET, headers={"X-Tenant": "acme"},
            secret_headers={"X-Shared-Secret": HEADER_SECRET},
        )  # fmt: skip
        monkeypatch.setenv("AIRFLOW_CONN_CDR_WEBHOOK", connection)
        endpoints = get(client, "/endpoints").text
        queued = populated["by_status"]["queued"][0]
        preview = unescape(get(client, "/delivery", cdr_id=queued, endpoint="cdr_webhook").text)
        confirm = get(client, "/test-cdr", user="admin", endpoint="cdr_webhook")
        sent = post(client, "/test-cdr", data={"csrf": csrf_of(confirm.text), "endpoint": "cdr_webhook"})

    origin = tokens.url.rsplit("/", 3)[0]
    assert f"OAuth2 bearer token from {origin}; headers X-Tenant, X-Shared-Secret (secret)" in unescape(
        endpoints
    )
    assert f"Bearer (OAuth2 access token from {origin}, fetched when sent)" in preview
    assert "acme" in preview
    assert "(secret, not shown)" in preview
    assert sent.status_code == 200, sent.text
    assert 'id="verdict"><strong>delivered</strong>' in sent.text
    [issued] = tokens.issued
    [request] = server.received()
    assert request.headers["authorization"] == f"Bearer {issued.token}"
    detail = get(client, "/endpoint", endpoint="cdr_webhook").text  # the test CDR's event, its excerpt
    sweep(tokens, endpoints, preview, sent.text, detail, dsn=cdr_dsn)


def test_a_test_cdr_whose_new_token_is_refused_too_says_to_check_the_oauth2_client(
    db, receiver, tokens, monkeypatch
):
    from cdr_webhook.deliver.sample import send_test

    monkeypatch.setattr(tokens, "valid", lambda token: False)

    outcome = send_test(db, ENDPOINT, actor="alice")

    assert (outcome.kind, outcome.verdict) == (
        "fail",
        "fails at once: 401, check the x-api-key and the OAuth2 client",
    )
    assert len(tokens.issued) == 2
    assert [r.answered for r in receiver.received()] == [401, 401]
