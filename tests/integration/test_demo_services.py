"""The entrypoints of the compose file's demo services: ``python -m demo.seed`` and ``demo.receiver``."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import pytest
import requests
from cryptography.x509.oid import ExtendedKeyUsageOID

from cdr_webhook.signing import build_headers
from demo.seed import main as seed_main
from demo.seed import seed
from demo.stack import free_port
from tests.conftest import ROOT
from tests.support.pki import issue, pem, tls_context

if TYPE_CHECKING:
    from collections.abc import Iterator

    import psycopg

API_KEY = "receiver-test-key"
SECRET = "whsec_" + base64.b64encode(b"receiver-entrypoint-test-secret!").decode()


def source_ids(conn: psycopg.Connection[Any]) -> set[str]:
    return {str(row[0]) for row in conn.execute("SELECT cdr_id FROM cdr_webhook_source").fetchall()}


def test_seed_adds_a_batch_and_if_empty_adds_none_to_a_seeded_database(
    cdr_db: psycopg.Connection[Any],
) -> None:
    first = seed(cdr_db, if_empty=True)
    assert len(first) == 6
    assert source_ids(cdr_db) == set(first)  # every demo CDR is visible through the source view

    assert seed(cdr_db, if_empty=True) == []  # a restarted stack adds nothing
    assert source_ids(cdr_db) == set(first)

    second = seed(cdr_db)  # `docker compose run cdr-seed python -m demo.seed`: one more batch
    assert source_ids(cdr_db) == set(first) | set(second)


def test_seed_main_connects_with_the_environment_and_loads_a_fresh_database(
    cdr_db: psycopg.Connection[Any], cdr_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    cdr_db.execute("DROP SCHEMA dialer CASCADE")  # a brand-new database: the seed creates the schema
    monkeypatch.setenv("CDR_DATABASE_URL", cdr_dsn)

    assert seed_main(["--if-empty"]) == 0

    assert "6 demo CDRs" in capsys.readouterr().out
    assert len(source_ids(cdr_db)) == 6


@pytest.fixture
def receiver_process() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    env = os.environ | {"RECEIVER_API_KEY": API_KEY, "RECEIVER_SIGNING_SECRET": SECRET}
    process = subprocess.Popen(
        [sys.executable, "-m", "demo.receiver", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/cdr-hook"
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(url, timeout=1)
            break
        except requests.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"receiver did not start: {process.communicate()[0]}") from None
            time.sleep(0.1)
    try:
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=10)


def post(url: str, body: bytes, *, api_key: str, secret: str) -> int:
    headers = build_headers(
        msg_id="msg_test", timestamp=int(time.time()), body=body, api_key=api_key, signing_secrets=[secret]
    )
    return requests.post(url, data=body, headers=headers, timeout=5).status_code


def test_receiver_entrypoint_checks_the_key_and_signature_from_its_environment_and_logs_each_post(
    receiver_process: tuple[str, subprocess.Popen[str]],
) -> None:
    url, process = receiver_process
    body = json.dumps({"cdr_id": "3f1c0a9e-0000-4000-8000-000000000001"}).encode()
    other = "whsec_" + base64.b64encode(b"some-other-secret-of-32-bytes!!!").decode()

    assert post(url, body, api_key=API_KEY, secret=SECRET) == 200
    assert post(url, body, api_key="wrong-key", secret=SECRET) == 401
    assert post(url, body, api_key=API_KEY, secret=other) == 401
    time.sleep(1)  # the log loop prints every 0.5 s
    process.terminate()  # SIGTERM, as `docker stop` sends it: the receiver exits cleanly
    output, _ = process.communicate(timeout=10)

    assert process.returncode == 0, output
    assert "x-api-key checked, webhook-signature verified" in output
    lines = [line for line in output.splitlines() if line.startswith("POST /cdr-hook")]
    assert [line.rsplit(" ", 1)[1] for line in lines] == ["200", "401", "401"]
    assert "signature valid" in lines[0]
    assert "signature INVALID" in lines[2]


def test_the_receiver_answers_after_its_delay_and_records_the_arrival_before_it() -> None:
    from demo.receiver import Receiver

    with Receiver(delay_ms=300) as receiver, requests.Session() as session:
        sent = time.time()
        response = session.post(receiver.url, data=b'{"cdr_id": "d1"}', timeout=10)
        answered = time.time()
    assert response.status_code == 200
    assert answered - sent >= 0.3
    (request,) = receiver.received("d1")
    assert request.at < answered - 0.25  # the arrival, not the answer


def test_keep_alive_replies_are_not_held_back_by_nagles_algorithm() -> None:
    """
    Each reply is two writes (status line and headers, then the body); with Nagle's algorithm the
    second waited for the client's delayed ACK, at least 40 ms per request on Linux.
    """
    from demo.receiver import Receiver

    with Receiver() as receiver, requests.Session() as session:
        session.post(receiver.url, data=b"{}", timeout=10)  # the connection, once
        began = time.monotonic()
        for _ in range(20):
            session.post(receiver.url, data=b"{}", timeout=10)
        elapsed = time.monotonic() - began
    assert elapsed < 20 * 0.040, f"20 keep-alive POSTs took {elapsed:.2f} s"


def test_the_receiver_shows_and_saves_each_body_byte_for_byte(tmp_path, capsys):
    from demo.receiver import Received, show_body

    body = '{"cdr_id":"a/b c","campaign_name":"Campaña – 電話"}'.encode()
    request = Received("POST", "/cdr-hook", {}, body, None, 200)

    show_body(request, 7, show=True, save_to=tmp_path)

    assert capsys.readouterr().out == body.decode() + "\n"
    assert (tmp_path / "000007-a_b_c.json").read_bytes() == body


def test_the_receiver_serves_mutual_tls_and_echoes_what_it_was_given(tmp_path) -> None:
    """The secrets sweep's receivers: HTTPS refusing a client without a certificate, and the echo."""
    from demo.receiver import Receiver

    ca = issue("receiver test CA")
    (tmp_path / "ca.crt").write_text(pem(ca[0])[0])
    for name, pair in (
        ("server", issue("127.0.0.1", issuer=ca, usage=ExtendedKeyUsageOID.SERVER_AUTH)),
        ("client", issue("receiver-client", issuer=ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)),
    ):
        cert, key = pem(*pair)
        (tmp_path / f"{name}.crt").write_text(cert)
        (tmp_path / f"{name}.key").write_text(key)
    context = tls_context((tmp_path / "server.crt", tmp_path / "server.key"), client_ca=tmp_path / "ca.crt")
    secret = "whsec_" + base64.b64encode(b"receiver-echo-test-signing-key!!").decode()
    with Receiver(tls=context, echo=True, secret=secret) as receiver:
        assert receiver.url.startswith("https://127.0.0.1:")
        with pytest.raises((requests.exceptions.SSLError, requests.ConnectionError)):
            requests.post(receiver.url, data=b"{}", verify=str(tmp_path / "ca.crt"), timeout=10)
        response = requests.post(
            f"{receiver.url}/t0ken",
            data=b'{"cdr_id": "e1"}',
            headers={"x-api-key": "echo-me"},
            verify=str(tmp_path / "ca.crt"),
            cert=(str(tmp_path / "client.crt"), str(tmp_path / "client.key")),
            timeout=10,
        )
    assert (response.status_code, response.reason) == (401, "Unauthorized (key echo-me)")  # unsigned
    assert response.json() == {
        "status": 401,
        "path": "/cdr-hook/t0ken",
        "api-key": "echo-me",
        "api-key-base64": base64.b64encode(b"echo-me").decode(),
        "basic-auth": base64.urlsafe_b64encode(b"cdr:echo-me").decode().rstrip("="),
        "signing-secret": secret,
    }
    assert response.headers["x-echo-api-key"] == "echo-me"
    assert [r.cdr_id for r in receiver.received()] == ["e1"]  # the refused handshake made no request


def test_the_demos_ui_env_is_readable_by_its_owner_only(tmp_path) -> None:
    """``.demo/ui.env`` holds the demo's endpoint connections, keys and signing secrets included."""
    import stat

    from demo.__main__ import write_ui_env

    (tmp_path / "ui.env").write_text("old")
    (tmp_path / "ui.env").chmod(0o644)
    write_ui_env({"AIRFLOW_CONN_CDR_WEBHOOK": '{"password": "k"}', "HOME": "/root"}, tmp_path)

    assert stat.S_IMODE((tmp_path / "ui.env").stat().st_mode) == 0o600
    text = (tmp_path / "ui.env").read_text()
    assert "export AIRFLOW_CONN_CDR_WEBHOOK=" in text
    assert "HOME" not in text
