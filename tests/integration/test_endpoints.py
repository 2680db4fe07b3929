"""Endpoint pause/resume against a real PostgreSQL: the pause rules, the audit trail, concurrency, the CLI."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from cdr_webhook.adapters import notify_endpoint_event
from cdr_webhook.ledger import endpoints, pause_rules, schema
from cdr_webhook.ledger.endpoints import GONE_REASON, EndpointEvent
from tests.support.endpoints_cli import cli
from tests.support.ledger_records import outcome

if TYPE_CHECKING:
    from pathlib import Path

RULES = {"pause_after_failures": 5, "pause_after_hours": 72.0, "pause_after_minutes": 30.0}


def record(
    conn: psycopg.Connection[Any],
    endpoint: str = "ep",
    *,
    delivered: bool,
    final: bool = True,
    gone: bool = False,
    **rules: Any,
) -> EndpointEvent | None:
    """One attempt's outcome, through the recorder the delivery tasks use."""
    decided = outcome(delivered=delivered, final=final, gone=gone)
    return pause_rules.record_outcomes(conn, endpoint, [decided], **{**RULES, **rules})


def fail(conn: psycopg.Connection[Any], endpoint: str = "ep", **kwargs: Any) -> EndpointEvent | None:
    return record(conn, endpoint, delivered=False, **kwargs)


def succeed(conn: psycopg.Connection[Any], endpoint: str = "ep") -> EndpointEvent | None:
    return record(conn, endpoint, delivered=True)


def state(conn: psycopg.Connection[Any], endpoint: str = "ep") -> dict[str, Any]:
    cur = conn.execute("SELECT * FROM cdr_webhook.endpoint_state WHERE endpoint = %s", (endpoint,))
    row = cur.fetchone()
    assert row is not None
    return dict(zip([column.name for column in cur.description or ()], row, strict=True))


def backdate_failing_since(conn: psycopg.Connection[Any], *, hours: float, endpoint: str = "ep") -> None:
    conn.execute(
        "UPDATE cdr_webhook.endpoint_state SET failing_since = now() - make_interval(secs => %s) "
        "WHERE endpoint = %s",
        (hours * 3600, endpoint),
    )


def events(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT endpoint, action, reason, actor, at FROM cdr_webhook.endpoint_event ORDER BY id"
    ).fetchall()


def test_schema_creation_is_idempotent(db):
    schema.migrate(db)
    assert endpoints.paused_endpoints(db) == set()
    assert endpoints.list_endpoints(db) == []


def test_http_410_pauses_at_once_with_the_reason(db):
    event = fail(db, gone=True)

    assert event is not None
    assert (event.endpoint, event.action, event.reason, event.actor) == (
        "ep",
        "paused",
        GONE_REASON,
        "cdr_webhook",
    )
    assert endpoints.is_paused(db, "ep")
    assert endpoints.paused_endpoints(db) == {"ep"}
    assert events(db) == [("ep", "paused", GONE_REASON, "cdr_webhook", event.at)]
    assert fail(db, gone=True) is None  # already paused: no second event
    assert len(events(db)) == 1
    assert state(db)["consecutive_failures"] == 2


def test_failure_threshold_pauses_exactly_at_n(db):
    assert [fail(db) for _ in range(4)] == [None] * 4
    assert not endpoints.is_paused(db, "ep")

    event = fail(db)

    assert event is not None
    assert event.reason == "5 consecutive failed deliveries (pause_after_failures = 5)"
    assert endpoints.is_paused(db, "ep")
    assert fail(db) is None
    assert state(db)["consecutive_failures"] == 6
    assert [row[1] for row in events(db)] == ["paused"]


def test_a_success_resets_the_count(db):
    for _ in range(4):
        fail(db)
    assert succeed(db) is None
    after_success = state(db)
    assert after_success["consecutive_failures"] == 0
    assert after_success["failing_since"] is None
    assert after_success["last_success_at"] is not None

    assert [fail(db) for _ in range(4)] == [None] * 4
    assert not endpoints.is_paused(db, "ep")
    assert state(db)["consecutive_failures"] == 4


def test_a_success_on_a_paused_endpoint_does_not_resume_it(db):
    fail(db, gone=True)
    assert succeed(db) is None
    assert endpoints.is_paused(db, "ep")
    assert state(db)["consecutive_failures"] == 0


def test_failing_longer_than_pause_after_hours_pauses(db):
    assert fail(db) is None
    first_failure = state(db)["failing_since"]
    assert first_failure is not None
    assert fail(db) is None
    assert state(db)["failing_since"] == first_failure  # the first failure since the last success counts

    backdate_failing_since(db, hours=73)
    event = fail(db)

    assert event is not None
    assert event.reason is not None
    assert event.reason.startswith("no successful delivery for 73 h")
    assert event.reason.endswith("(pause_after_hours = 72)")
    assert state(db)["consecutive_failures"] == 3


def test_failing_for_less_than_pause_after_hours_does_not_pause(db):
    fail(db)
    backdate_failing_since(db, hours=71)
    assert fail(db) is None
    assert not endpoints.is_paused(db, "ep")


def backdate_attempts_failing_since(conn: psycopg.Connection[Any], *, minutes: float) -> None:
    conn.execute(
        "UPDATE cdr_webhook.endpoint_state SET attempts_failing_since = now() - make_interval(secs => %s) "
        "WHERE endpoint = 'ep'",
        (minutes * 60,),
    )


def test_every_attempt_failing_for_pause_after_minutes_pauses_retries_included(db):
    assert fail(db, final=False) is None  # a try that will be retried
    first = state(db)["attempts_failing_since"]
    assert first is not None
    assert fail(db, final=False) is None
    assert state(db)["attempts_failing_since"] == first  # the first failed attempt since the last success

    backdate_attempts_failing_since(db, minutes=31)
    event = fail(db, final=False)

    assert event is not None
    assert event.reason == "every attempt failed for 31 min, retries included (pause_after_minutes = 30)"
    assert endpoints.is_paused(db, "ep")
    assert state(db)["consecutive_failures"] == 0  # no delivery has ended: it is the attempts that count


def test_a_success_restarts_the_failing_attempts_clock(db):
    fail(db, final=False)
    backdate_attempts_failing_since(db, minutes=29)
    assert succeed(db) is None
    assert state(db)["attempts_failing_since"] is None
    fail(db, final=False)
    backdate_attempts_failing_since(db, minutes=29)
    assert fail(db, final=False) is None
    assert not endpoints.is_paused(db, "ep")


def test_rules_must_be_usable(db):
    with pytest.raises(ValueError, match="pause_after_failures"):
        fail(db, pause_after_failures=0)


def test_tries_that_will_be_retried_are_failed_attempts_not_failed_deliveries(db):
    for _ in range(RULES["pause_after_failures"] + 2):
        assert fail(db, final=False) is None
    assert (state(db)["consecutive_failures"], state(db)["failed_attempts"]) == (
        0,
        RULES["pause_after_failures"] + 2,
    )
    assert not endpoints.is_paused(db, "ep")
    assert endpoints.failing_endpoints(db) == {"ep"}
    succeed(db)
    assert (state(db)["consecutive_failures"], state(db)["failed_attempts"]) == (0, 0)
    assert endpoints.failing_endpoints(db) == set()


def test_pause_and_resume_record_who_when_and_why(db):
    paused = endpoints.pause(db, "ep", reason="customer migrating", actor="alice")
    assert paused is not None
    assert (paused.action, paused.reason, paused.actor) == ("paused", "customer migrating", "alice")
    assert endpoints.pause(db, "ep", reason="again", actor="bob") is None
    current = state(db)
    assert (current["paused"], current["reason"], current["changed_by"]) == (
        True,
        "customer migrating",
        "alice",
    )
    assert current["changed_at"] == paused.at

    fail(db)
    fail(db)
    resumed = endpoints.resume(db, "ep", actor="carol", reason="migration done")
    assert resumed is not None
    assert endpoints.resume(db, "ep", actor="dave") is None
    assert endpoints.resume(db, "never-seen", actor="dave") is None
    current = state(db)
    assert (current["paused"], current["consecutive_failures"], current["failing_since"]) == (False, 0, None)
    assert current["changed_by"] == "carol"

    assert events(db) == [
        ("ep", "paused", "customer migrating", "alice", paused.at),
        ("ep", "resumed", "migration done", "carol", resumed.at),
    ]
    assert resumed.at >= paused.at


def test_concurrent_outcomes_count_exactly(db, cdr_dsn):
    threads, per_thread = 8, 25
    barrier = threading.Barrier(threads)
    returned: list[EndpointEvent | None] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            with psycopg.connect(cdr_dsn, autocommit=True) as conn:
                barrier.wait()
                results = [fail(conn, "busy", pause_after_failures=100) for _ in range(per_thread)]
            with lock:
                returned.extend(results)
        except BaseException as err:
            with lock:
                errors.append(err)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()

    assert errors == []
    assert state(db, "busy")["consecutive_failures"] == threads * per_thread
    paused = [event for event in returned if event is not None]
    assert len(paused) == 1
    assert paused[0].reason == "100 consecutive failed deliveries (pause_after_failures = 100)"
    assert [row[:2] for row in events(db)] == [("busy", "paused")]


def insert_ledger(conn: psycopg.Connection[Any], endpoint: str, status: str, count: int) -> None:
    for n in range(count):
        conn.execute(
            "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, cdr_created_at, status) "
            "VALUES (%s, %s, now(), %s)",
            (f"{endpoint}-{status}-{n}", endpoint, status),
        )


def test_list_endpoints_counts_queued_and_failed(db):
    insert_ledger(db, "alpha", "queued", 3)
    insert_ledger(db, "alpha", "failed", 2)
    insert_ledger(db, "alpha", "delivered", 4)
    insert_ledger(db, "beta", "delivered", 1)
    insert_ledger(db, "beta", "skipped", 1)
    endpoints.pause(db, "gamma", reason="not live yet", actor="alice")  # a state row, no ledger rows
    fail(db, "beta")

    listed = {status.endpoint: status for status in endpoints.list_endpoints(db)}

    assert list(listed) == ["alpha", "beta", "gamma"]
    assert (listed["alpha"].queued, listed["alpha"].failed, listed["alpha"].paused) == (3, 2, False)
    assert (listed["beta"].queued, listed["beta"].failed, listed["beta"].consecutive_failures) == (0, 0, 1)
    gamma = listed["gamma"]
    assert (gamma.paused, gamma.reason, gamma.changed_by, gamma.queued) == (True, "not live yet", "alice", 0)
    assert gamma.changed_at is not None
    assert [s.endpoint for s in endpoints.list_endpoints(db, endpoint="alpha")] == ["alpha"]


def test_cli_pause_list_resume(cdr_db, cdr_dsn, tmp_path: Path):
    probe = tmp_path / "probe.jsonl"
    notifier_env = {
        "AIRFLOW__CDR_WEBHOOK__FAILURE_NOTIFIER": "tests.integration.endpoint_notifier_probe:notifier",
        "CDR_NOTIFIER_PROBE": str(probe),
    }
    paused = cli(
        "pause", "cdr_webhook_client_7", "--reason", "receiver rebuilt", "--by", "alice", dsn=cdr_dsn
    )
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.startswith("paused endpoint 'cdr_webhook_client_7' at ")
    assert "by alice: receiver rebuilt" in paused.stdout

    again = cli(
        "pause", "cdr_webhook_client_7", "--reason", "other", "--by", "bob", dsn=cdr_dsn, **notifier_env
    )
    assert again.returncode == 0, again.stderr
    assert "already paused since " in again.stdout
    assert "by alice: receiver rebuilt" in again.stdout
    assert not probe.exists()  # nothing changed, nobody is told

    insert_ledger(cdr_db, "cdr_webhook_client_7", "queued", 2)
    listed = cli("list", dsn=cdr_dsn)
    assert listed.returncode == 0, listed.stderr
    header, _, row = listed.stdout.splitlines()
    assert header.split()[:4] == ["endpoint", "state", "since", "by"]
    assert row.split()[:2] == ["cdr_webhook_client_7", "paused"]
    assert " alice " in row
    assert row.endswith("receiver rebuilt")
    assert row.split()[-5:-2] == ["2", "0", "0"]  # queued, failed, consecutive failures

    resumed = cli("resume", "cdr_webhook_client_7", "--by", "carol", dsn=cdr_dsn, **notifier_env)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("resumed endpoint 'cdr_webhook_client_7' at ")
    assert [json.loads(line)["event"]["actor"] for line in probe.read_text().splitlines()] == ["carol"]
    assert not endpoints.is_paused(cdr_db, "cdr_webhook_client_7")
    assert [row[1:4] for row in events(cdr_db)] == [
        ("paused", "receiver rebuilt", "alice"),
        ("resumed", None, "carol"),
    ]

    not_paused = cli("resume", "cdr_webhook_client_7", dsn=cdr_dsn)
    assert not_paused.returncode == 0, not_paused.stderr
    assert "'cdr_webhook_client_7' is not paused" in not_paused.stdout


def test_cli_reads_the_airflow_connection_without_a_dsn(cdr_db):
    # cdr_db sets AIRFLOW_CONN_CDR_DB; with neither --dsn nor CDR_DATABASE_URL the CLI must use it.
    schema.migrate(cdr_db)
    endpoints.pause(cdr_db, "ep", reason="checked via Airflow", actor="alice")
    listed = cli("list", dsn=None)
    assert listed.returncode == 0, listed.stderr
    assert "checked via Airflow" in listed.stdout


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("pause", "ep"),  # --reason is required
        ("pause", "ep", "--reason", "  "),
        ("resume",),
        ("frobnicate", "ep"),
    ],
)
def test_cli_bad_usage_exits_2(args):
    result = cli(*args, dsn="host=127.0.0.1 port=1")
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_cli_connection_error_names_the_source_and_hides_the_password():
    dsn = "postgresql://someone:hunter2-secret@127.0.0.1:1/nowhere?connect_timeout=3"
    from_env = cli("list", dsn=dsn)
    assert from_env.returncode == 1
    assert "(from $CDR_DATABASE_URL)" in from_env.stderr
    assert len(from_env.stderr.strip().splitlines()) == 1

    malformed = cli("list", "--dsn", "host=127.0.0.1 password=hunter2-secret nonsense", dsn=None)
    assert malformed.returncode == 1
    assert "(from --dsn)" in malformed.stderr
    for result in (from_env, malformed):
        assert "hunter2-secret" not in result.stdout + result.stderr


@pytest.mark.parametrize(("attribute", "kind"), [("notifier", "notifier"), ("plain", "callable")])
def test_notify_calls_the_configured_notifier(settings_env, tmp_path: Path, attribute: str, kind: str):
    probe = tmp_path / "probe.jsonl"
    settings_env.setenv(
        "AIRFLOW__CDR_WEBHOOK__FAILURE_NOTIFIER", f"tests.integration.endpoint_notifier_probe:{attribute}"
    )
    settings_env.setenv("CDR_NOTIFIER_PROBE", str(probe))
    at = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)

    notify_endpoint_event(EndpointEvent("ep", "paused", GONE_REASON, "cdr_webhook", at))

    recorded = [json.loads(line) for line in probe.read_text().splitlines()]
    assert recorded == [
        {
            "kind": kind,
            "event": {
                "endpoint": "ep",
                "action": "paused",
                "reason": GONE_REASON,
                "actor": "cdr_webhook",
                "at": str(at),
            },
        }
    ]


def test_a_failing_notifier_is_logged_not_raised(settings_env, caplog):
    settings_env.setenv(
        "AIRFLOW__CDR_WEBHOOK__FAILURE_NOTIFIER", "tests.integration.endpoint_notifier_probe:broken"
    )
    event = EndpointEvent("ep", "paused", "by hand", "alice", dt.datetime(2026, 11, 28, tzinfo=dt.UTC))

    with caplog.at_level(logging.INFO, logger="cdr_webhook.ledger.endpoints"):
        notify_endpoint_event(event)

    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("Endpoint ep paused by alice") for message in messages)
    failure = [record for record in caplog.records if record.exc_info]
    assert len(failure) == 1
    assert "the pager is down" in str(failure[0].exc_info[1])


def test_notify_without_a_notifier_only_logs(settings_env, caplog):
    event = EndpointEvent("ep", "resumed", None, "alice", dt.datetime(2026, 11, 28, tzinfo=dt.UTC))
    with caplog.at_level(logging.INFO, logger="cdr_webhook.ledger.endpoints"):
        notify_endpoint_event(event)
    assert [record.getMessage() for record in caplog.records] == [
        "Endpoint ep resumed by alice at 2026-11-28 00:00:00+00:00: no reason given"
    ]


def test_cli_check_parses_endpoints_as_the_dag_does_and_names_what_is_wrong(monkeypatch):
    from demo.connections import http_conn

    monkeypatch.setenv(
        "AIRFLOW_CONN_GOOD_EP",
        http_conn("https://hooks.example.com/t0ken", api_key="s3cret-key", leg_types=[1], max_in_flight=2),
    )
    monkeypatch.setenv("AIRFLOW_CONN_BAD_EP", http_conn("https://hooks.example.com/t0ken", leg_types="1"))
    oauth2 = {
        "oauth2_token_url": "https://idp.example/t",
        "oauth2_client_id": "cdr-sender",
        "oauth2_client_secret": "s3cret-c",
    }
    monkeypatch.setenv(
        "AIRFLOW_CONN_AUTH_EP",
        http_conn("https://hooks.example.com/t0ken", secret_headers={"X-Token": "s3cret-h"}, **oauth2),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_CLASH_EP",
        http_conn("https://hooks.example.com/t0ken", headers={"X-Api-Key": "s3cret-x"}),
    )
    good = cli("check", "good_ep", "auth_ep", dsn=None)
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip().splitlines() == [
        "ok     good_ep: https://hooks.example.com, x-api-key set, 0 signing secret(s), "
        "no client certificate, max_in_flight 2, leg_types=[1]",
        "ok     auth_ep: https://hooks.example.com, x-api-key not set, 0 signing secret(s), "
        "no client certificate, max_in_flight default, OAuth2 bearer token from https://idp.example; "
        "headers X-Token (secret)",
    ]
    bad = cli("check", "good_ep", "bad_ep", "no_such_ep", "clash_ep", dsn=None)
    assert bad.returncode == 1
    assert "error  connection 'bad_ep' extra 'leg_types': must be a list of integers, not '1'" in bad.stdout
    assert "error  connection 'no_such_ep': does not exist" in bad.stdout
    assert (
        "error  connection 'clash_ep' extra 'headers' header 'X-Api-Key': clashes with a header the delivery "
        "sets itself (the connection's password sets it)" in bad.stdout
    )
    assert "3 of 4 endpoint(s) cannot be used: bad_ep, no_such_ep, clash_ep" in bad.stderr
    for secret in ("t0ken", "s3cret"):
        assert secret not in bad.stdout + good.stdout


def test_list_endpoints_runs_without_jit(db, cdr_dsn):
    # With a big backlog its counts are costed above jit_above_cost; compiling took longer than counting.
    seen: list[str] = []

    class Recorder(psycopg.Cursor):
        def execute(self, query, params=None, **kwargs):
            if "ledger_endpoints" in str(query):
                with psycopg.Cursor(self.connection) as cur:
                    seen.append(cur.execute("SHOW jit").fetchone()[0])
            return super().execute(query, params, **kwargs)

    insert_ledger(db, "alpha", "queued", 1)
    with psycopg.connect(cdr_dsn, autocommit=True, cursor_factory=Recorder) as conn:
        conn.execute("SET jit = on")
        assert [s.endpoint for s in endpoints.list_endpoints(conn)] == ["alpha"]
        assert conn.execute("SHOW jit").fetchone() == ("on",)
    assert seen == ["off"]
