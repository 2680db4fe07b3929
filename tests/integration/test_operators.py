"""CdrWebhookOperator.execute against real PostgreSQL and real receivers, one try at a time.

Each test plays one try of a mapped ``post_cdr`` task (the task instance's run, map index, try
number and max_tries are what Airflow hands it) and checks what the ledger, the endpoint's state,
the receiver and the raised exception show.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import re
import threading
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from cdr_webhook.deliver.operator import CdrWebhookOperator, RetryLater
from demo.dialer import Dialer
from demo.receiver import Receiver
from tests.support.task_instances import (
    API_KEY,
    ENDPOINT,
    SECRET,
    FakeTaskInstance,
    connect_endpoint,
    endpoint_state,
    queue,
    row,
)

NOW = dt.datetime.now(dt.UTC)


def run_try(cdr_id: str, ti: FakeTaskInstance, *, retries: int = 1) -> None:
    operator = CdrWebhookOperator(
        task_id="post_cdr", cdr_ids=[cdr_id], http_conn_id=ENDPOINT, retries=retries
    )
    operator.execute({"ti": ti})


@pytest.fixture
def receiver(monkeypatch):
    with Receiver(secret=SECRET, api_key=API_KEY) as server:
        connect_endpoint(monkeypatch, server.url, signing_secret=SECRET)
        yield server


# -- retries are judged by the task instance's max_tries ----------------------------------------


def test_a_cleared_task_retries_again_and_honours_retry_after(db, receiver):
    cdr = Dialer(db).cdr(created_at=NOW - dt.timedelta(minutes=5), client_id=7)
    queue(db, cdr)
    receiver.script(cdr, [(503, {"Retry-After": "7"})] * 5)
    # retries = 1: tries 1 and 2 are spent; the operator cleared it, so Airflow set max_tries = 2 + 1.
    with pytest.raises(RetryLater) as raised:
        run_try(cdr, FakeTaskInstance(try_number=3, max_tries=3), retries=1)

    assert raised.value.retry_after == 7
    assert row(db, cdr)["status"] == "queued"  # not failed between tries
    # A try that will be retried is a failed attempt (the select step throttles the endpoint), not a
    # failed delivery (the streak that pauses it).
    assert (endpoint_state(db)["consecutive_failures"], endpoint_state(db)["failed_attempts"]) == (0, 1)

    with pytest.raises(AirflowException, match="retries exhausted"):
        run_try(cdr, FakeTaskInstance(try_number=4, max_tries=3), retries=1)
    assert (row(db, cdr)["status"], row(db, cdr)["attempts"]) == ("failed", 2)
    assert (endpoint_state(db)["consecutive_failures"], endpoint_state(db)["failed_attempts"]) == (1, 2)


# -- a configuration error is recorded, holds its endpoint and fails at once ----------------------


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"signing_secret": "whsec_notbase64!!"}, "extra 'signing_secret': the secret is invalid"),
        ({"max_in_flight": "lots"}, "extra 'max_in_flight': must be a positive integer"),
        ({"leg_types": "1"}, "extra 'leg_types': must be a list of integers"),
        (None, "does not exist"),
    ],
)
def test_a_configuration_error_is_recorded_pauses_the_endpoint_and_fails_without_retries(
    db, monkeypatch, extra, reason
):
    with Receiver() as server:
        if extra is None:
            monkeypatch.delenv(f"AIRFLOW_CONN_{ENDPOINT.upper()}", raising=False)
        else:
            connect_endpoint(monkeypatch, server.url, **extra)
        cdr = Dialer(db).cdr(created_at=NOW - dt.timedelta(minutes=5), client_id=7)
        queue(db, cdr)

        with pytest.raises(AirflowFailException, match=f"connection '{ENDPOINT}'.*resume {ENDPOINT}"):
            run_try(cdr, FakeTaskInstance())

        assert server.received() == []
    recorded = row(db, cdr)
    assert (recorded["status"], recorded["run_id"], recorded["attempts"]) == ("queued", None, 0)
    assert reason in recorded["error"]
    state = endpoint_state(db)
    assert state["paused"] is True
    assert reason in state["reason"]


# -- only the owning run's task sends ------------------------------------------------------------


def test_a_task_whose_cdr_another_run_delivered_does_not_send_it_again(db, receiver):
    cdr = Dialer(db).cdr(created_at=NOW - dt.timedelta(minutes=5), client_id=7)
    # Run 1's claim went stale; run 2 took it over and delivered it. Run 1's task starts only now.
    queue(db, cdr, run_id="scheduled__2", status="delivered", map_index=4)

    with pytest.raises(
        AirflowSkipException,
        match=r"belongs to run 'scheduled__2', map index 4 \(status delivered\): clear that",
    ):
        run_try(cdr, FakeTaskInstance(run_id="scheduled__1"))

    assert receiver.received() == []
    assert row(db, cdr)["run_id"] == "scheduled__2"


def test_a_cleared_task_of_the_owning_run_sends_its_delivered_cdr_again(db, receiver):
    cdr = Dialer(db).cdr(created_at=NOW - dt.timedelta(minutes=5), client_id=7)
    queue(db, cdr, status="delivered")
    run_try(cdr, FakeTaskInstance(run_id="scheduled__1", try_number=2, max_tries=3))
    assert len(receiver.received(cdr)) == 1


def test_a_try_keeps_every_queued_claim_of_its_run_fresh(db, receiver):
    dialer = Dialer(db)
    sent, waiting = (dialer.cdr(created_at=NOW - dt.timedelta(minutes=m), client_id=7) for m in (5, 4))
    for cdr in (sent, waiting):
        queue(db, cdr, updated_at=NOW - dt.timedelta(hours=2))
    run_try(sent, FakeTaskInstance())
    age = db.execute(
        "SELECT now() - updated_at FROM cdr_webhook.delivery WHERE cdr_id = %s", (waiting,)
    ).fetchone()[0]
    assert age < dt.timedelta(minutes=1)


# -- secrets never reach the ledger, the log or an exception --------------------------------------


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("content-length", 0))
        body = self.rfile.read(length)
        echo = json.dumps({"path": self.path, "headers": dict(self.headers), "body": body.decode()})
        self.send_response(400, f"bad request, your key is {self.headers.get('x-api-key')}")
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(echo.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def echo_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_echoing_receiver_never_gets_a_secret_into_the_ledger_or_the_exception(
    db, monkeypatch, echo_server, caplog
):
    url = f"{echo_server}/hooks/t0ken-in-path?sig=q5ecret"
    connect_endpoint(monkeypatch, url, signing_secret=SECRET)
    cdr = Dialer(db).cdr(created_at=NOW - dt.timedelta(minutes=5), client_id=7)
    queue(db, cdr)

    with pytest.raises(AirflowFailException) as raised:
        run_try(cdr, FakeTaskInstance())

    recorded = row(db, cdr)
    assert recorded["http_status"] == 400
    assert '"x-api-key": "***"' in recorded["response_excerpt"]  # the echo is kept, the key is not
    stored = " ".join([recorded["error"], recorded["response_excerpt"], str(raised.value), caplog.text])
    for secret in (API_KEY, SECRET, "t0ken-in-path", "q5ecret"):
        assert secret not in stored


def test_a_malformed_url_is_named_by_scheme_and_host_only(db, monkeypatch):
    connect_endpoint(monkeypatch, "https://hooks.example.com:99999/t0ken-in-path")
    cdr = Dialer(db).cdr(created_at=NOW - dt.timedelta(minutes=5), client_id=7)
    queue(db, cdr)

    with pytest.raises(AirflowFailException) as raised:
        run_try(cdr, FakeTaskInstance())

    stored = row(db, cdr)["error"] + endpoint_state(db)["reason"] + str(raised.value)
    assert "host: is not a valid URL (scheme 'https'" in stored
    assert "t0ken-in-path" not in stored


# -- a busy endpoint gives the worker back without using a retry ---------------------------------


def test_a_try_that_finds_every_slot_busy_is_rescheduled_without_using_a_retry(
    db, cdr_dsn, monkeypatch, receiver, settings_env
):
    import psycopg
    from airflow.sdk.exceptions import AirflowRescheduleException

    from cdr_webhook.deliver.slots import endpoint_slots

    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__SLOT_WAIT_SECONDS", "0")
    connect_endpoint(monkeypatch, receiver.url, signing_secret=SECRET, max_in_flight=1)
    cdr = Dialer(db).cdr(created_at=NOW - dt.timedelta(minutes=5), client_id=7)
    queue(db, cdr)
    with psycopg.connect(cdr_dsn, autocommit=True) as other_worker:
        with (
            endpoint_slots(other_worker, ENDPOINT, limit=1, wanted=1, wait_seconds=0),
            pytest.raises(AirflowRescheduleException) as raised,
        ):
            run_try(cdr, FakeTaskInstance())

    wait = raised.value.reschedule_date - dt.datetime.now(dt.UTC)
    assert dt.timedelta(seconds=3) < wait <= dt.timedelta(seconds=5)  # request_timeout_seconds (5 in tests)
    assert receiver.received() == []
    assert (row(db, cdr)["status"], row(db, cdr)["attempts"], row(db, cdr)["run_id"]) == (
        "queued",
        0,
        "scheduled__1",
    )
    run_try(cdr, FakeTaskInstance())  # the slot is free again: the same try sends it
    assert len(receiver.received(cdr)) == 1


def test_tries_of_one_run_at_once_never_wait_on_each_others_claims(db, cdr_dsn):
    """Refreshing the run's claims skips rows another try holds: no lock wait, so no deadlock."""
    import psycopg

    from cdr_webhook import ledger

    dialer = Dialer(db)
    mine, theirs = (dialer.cdr(created_at=NOW - dt.timedelta(minutes=m), client_id=7) for m in (5, 4))
    for cdr in (mine, theirs):
        queue(db, cdr, updated_at=NOW - dt.timedelta(hours=2))
    db.execute("SET lock_timeout = '2s'")
    with psycopg.connect(cdr_dsn) as other_try:  # another try of the run, mid-transaction on its row
        other_try.execute("SELECT 1 FROM cdr_webhook.delivery WHERE cdr_id = %s FOR UPDATE", (theirs,))
        [claim], _ = ledger.start_attempts(
            db,
            cdr_ids=[mine],
            endpoint=ENDPOINT,
            dag_id="cdr_webhook",
            run_id="scheduled__1",
            map_index=0,
            claim_timeout_seconds=3600,
        )
    assert claim.cdr_id == mine


# -- the rules of a task of one CDR ---------------------------------------------------------------


def test_a_paused_endpoint_gives_the_cdr_back_to_the_queue_and_skips_the_task(db, receiver):
    from cdr_webhook.ledger import endpoints

    cdr = Dialer(db).cdr(created_at=NOW - dt.timedelta(minutes=5), client_id=7)
    queue(db, cdr)
    endpoints.pause(db, ENDPOINT, reason="by hand", actor="test")

    with pytest.raises(AirflowSkipException, match=f"endpoint {ENDPOINT} is paused: CDR {cdr} stays queued"):
        run_try(cdr, FakeTaskInstance())

    assert receiver.received() == []
    assert (row(db, cdr)["status"], row(db, cdr)["attempts"], row(db, cdr)["run_id"]) == ("queued", 0, None)


def test_a_cdr_gone_from_the_source_is_skipped_and_fails_without_retries(db, receiver):
    cdr = Dialer(db).cdr(created_at=NOW - dt.timedelta(minutes=5), client_id=7)
    queue(db, cdr)
    db.execute("DELETE FROM dialer.cdr WHERE id::text = %s", (cdr,))  # gone from the source

    with pytest.raises(AirflowFailException, match=f"CDR {cdr} cannot be sent: .*no longer in"):
        run_try(cdr, FakeTaskInstance())

    assert receiver.received() == []
    assert (row(db, cdr)["status"], row(db, cdr)["attempts"]) == ("skipped", 0)


def test_a_refused_request_fails_at_once_without_using_a_retry(db, receiver):
    cdr = Dialer(db).cdr(created_at=NOW - dt.timedelta(minutes=5), client_id=7)
    queue(db, cdr)
    receiver.script(cdr, [400])
    with pytest.raises(AirflowFailException, match="HTTP 400.*; not retried, no retry can help"):
        run_try(cdr, FakeTaskInstance(try_number=1, max_tries=3))
    assert (row(db, cdr)["status"], row(db, cdr)["attempts"]) == ("failed", 1)


def test_a_cdrs_first_attempt_logs_and_measures_how_long_after_its_created_at_it_went_out(
    db, receiver, capsys, monkeypatch
):
    from cdr_webhook.deliver import report

    timings: list[tuple[str, float]] = []

    class Stats:
        @staticmethod
        def incr(name: str, tags: dict[str, str]) -> None:
            pass

        @staticmethod
        def timing(name: str, value: float, tags: dict[str, str]) -> None:
            timings.append((name, value))

    monkeypatch.setattr(report, "Stats", Stats)
    cdr = Dialer(db).cdr(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5), client_id=7)
    queue(db, cdr)
    receiver.script(cdr, [503])

    with pytest.raises(RetryLater):
        run_try(cdr, FakeTaskInstance(try_number=1, max_tries=2))
    run_try(cdr, FakeTaskInstance(try_number=2, max_tries=2))

    lines = [line for line in capsys.readouterr().out.splitlines() if f"CDR {cdr} " in line]
    [first] = [line for line in lines if "(attempt 1," in line]
    [second] = [line for line in lines if "(attempt 2," in line]
    waited = float(re.search(r"\), (\d+\.\d) s after its created_at", first).group(1))
    assert 300 <= waited < 360  # created 5 minutes before this test sent it
    assert "after its created_at" not in second  # only the first POST says how long the CDR waited
    [pickup] = [value for name, value in timings if name == "cdr_webhook.pickup_latency"]
    assert 300_000 <= pickup < 360_000  # milliseconds, once per CDR
    assert [name for name, _ in timings].count("cdr_webhook.latency") == 2
