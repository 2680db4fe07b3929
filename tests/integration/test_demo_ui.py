"""The live demo's parts that run beside Airflow (demo/ui.py): its receiver on the endpoints'
address, the dialer, the demo's minutes for a backfill."""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import requests

from cdr_webhook.signing import build_headers
from demo.connections import http_conn
from demo.ui import demo_minutes, dial, print_requests, start_receiver

if TYPE_CHECKING:
    import psycopg

SECRET = "whsec_" + "ZGVtby11aS10ZXN0LXNpZ25pbmctc2VjcmV0IQ=="
API_KEY = "demo-ui-test-key"


def endpoints_at(url: str) -> dict[str, str]:
    return {
        "AIRFLOW_CONN_CDR_WEBHOOK": http_conn(url, api_key=API_KEY, signing_secret=SECRET),
        "AIRFLOW_CONN_CDR_WEBHOOK_CLIENT_3": http_conn(url, api_key=API_KEY, leg_types="1"),
    }


def post(url: str, cdr_id: str) -> int:
    body = json.dumps({"cdr_id": cdr_id}).encode()
    headers = build_headers(
        msg_id="msg_demo", timestamp=int(time.time()), body=body, api_key=API_KEY, signing_secrets=[SECRET]
    )
    return requests.post(url, data=body, headers=headers, timeout=10).status_code


def test_the_receiver_listens_where_the_endpoints_point_and_prints_each_post(capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    receiver, moved = start_receiver(endpoints_at(f"http://127.0.0.1:{port}/cdr-hook"))
    stopped = threading.Event()
    printer = threading.Thread(target=print_requests, args=(receiver, stopped))
    printer.start()
    try:
        assert receiver.url == f"http://127.0.0.1:{port}/cdr-hook"
        assert post(receiver.url, "cdr-1") == 200
        time.sleep(1.2)
    finally:
        stopped.set()
        printer.join()
        receiver.stop()
    assert json.loads(moved["AIRFLOW_CONN_CDR_WEBHOOK"])["host"] == receiver.url
    out = capsys.readouterr().out
    assert "receiver: POST /cdr-hook cdr_id=cdr-1 webhook-id=msg_demo signature valid: answered 200" in out


def test_a_taken_port_moves_the_receiver_and_both_endpoints_with_it(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        receiver, moved = start_receiver(endpoints_at(f"http://127.0.0.1:{port}/cdr-hook"))
        try:
            assert receiver.url != f"http://127.0.0.1:{port}/cdr-hook"
            for name in ("AIRFLOW_CONN_CDR_WEBHOOK", "AIRFLOW_CONN_CDR_WEBHOOK_CLIENT_3"):
                conn = json.loads(moved[name])
                assert conn["host"] == receiver.url
                assert conn["password"] == API_KEY  # the rest of the connection is kept
            assert json.loads(moved["AIRFLOW_CONN_CDR_WEBHOOK_CLIENT_3"])["extra"] == {"leg_types": "1"}
            assert post(receiver.url, "cdr-2") == 200
        finally:
            receiver.stop()
    assert f"port {port} is taken" in capsys.readouterr().out


def test_the_dialer_commits_cdrs_until_stopped_and_the_minutes_cover_the_ledger(
    cdr_db: psycopg.Connection[Any], cdr_dsn: str, capsys, monkeypatch
) -> None:
    from cdr_webhook.ledger import schema

    schema.migrate(cdr_db)
    assert demo_minutes(cdr_dsn) is None  # an empty ledger: no backfill to suggest
    stopped = threading.Event()
    dialer = threading.Thread(target=dial, args=(cdr_dsn, 0.2, stopped))
    dialer.start()
    time.sleep(1.1)
    stopped.set()
    dialer.join()
    committed = [line.split()[-1] for line in capsys.readouterr().out.splitlines()]
    assert len(committed) >= 3
    in_source = {str(row[0]) for row in cdr_db.execute("SELECT cdr_id FROM cdr_webhook_source").fetchall()}
    assert set(committed) <= in_source
    cdr_db.execute(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status) "
        "SELECT cdr_id::text, 'cdr_webhook', client_id, created_at, 'delivered' FROM cdr_webhook_source"
    )
    monkeypatch.setenv("PGTZ", "Asia/Kolkata")  # the session's zone must not change the printed UTC
    minutes = demo_minutes(cdr_dsn)
    assert all(minute.endswith("+00:00") for minute in minutes)
    first, last = (dt.datetime.fromisoformat(minute) for minute in minutes)
    created = [row[0] for row in cdr_db.execute("SELECT created_at FROM cdr_webhook_source").fetchall()]
    # Whole minutes, as `airflow backfill create` takes them: the first and the last CDR's.
    assert first == min(created).replace(second=0, microsecond=0)
    assert last == max(created).replace(second=0, microsecond=0)
