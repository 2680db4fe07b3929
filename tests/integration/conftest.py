"""Fixtures of the integration tests (the session's PostgreSQL ones are in tests/conftest.py): the ledger,
and the Deliveries page mounted in-process over a populated ledger."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

import pytest

from bench.records import attempt
from cdr_webhook import ledger
from cdr_webhook.ledger import schema
from demo.connections import http_conn, postgres_conn
from demo.dialer import Dialer
from tests.support.deployments import API_KEY, SIGNING_SECRET
from tests.support.page import DAY, SIMPLE, USERS

if TYPE_CHECKING:
    from collections.abc import Iterator

    import psycopg


@pytest.fixture
def db(cdr_db: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """The test's CDR database with the ledger and endpoint tables made."""
    schema.migrate(cdr_db)
    return cdr_db


@pytest.fixture
def populated(cdr_db, cdr_dsn) -> dict[str, Any]:
    """Three days of CDRs for clients 1, 2 and 42, with ledger rows in every status and attempt histories."""
    schema.migrate(cdr_db)
    dialer = Dialer(cdr_db)
    made: dict[str, Any] = {"by_status": {}, "all": []}

    def add(client: int, day: int, minute: int, status: str | None, *, phone: str = "+34650123456", tries=()):
        created = DAY + dt.timedelta(days=day, minutes=minute)
        cdr_id = dialer.cdr(client_id=client, created_at=created, phone_number=phone)
        made["all"].append(cdr_id)
        if status is None:
            return cdr_id  # in the source only: never queued
        endpoint = "cdr_webhook" if client != 42 else "cdr_webhook_client_42"
        cdr_db.execute(
            "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status, dag_id, "
            "run_id, map_index) VALUES (%s, %s, %s, %s, 'queued', 'cdr_webhook', %s, %s)",
            (cdr_id, endpoint, client, created, f"manual__{day}", minute),
        )
        claim = ledger.Claim(cdr_id, endpoint, client, created, "queued", 0)
        for outcome, http, error in tries:  # the operator's write path, one attempt at a time
            ledger.record_attempts(cdr_db, [attempt(claim, outcome, http, error, f"answer {http}", 12)])
        if status == "skipped":
            ledger.mark_skipped(cdr_db, claim, "column cost = NaN")
        made["by_status"].setdefault(status, []).append(cdr_id)
        return cdr_id

    for minute in range(0, 60, 5):
        add(1, 0, minute, "delivered", tries=[("delivered", 200, None)])
    made["failed_42"] = add(
        42, 1, 10, "failed",
        phone="+15550100042",
        tries=[("queued", 503, "HTTP 503 Service Unavailable"), ("failed", 400, "HTTP 400 Bad Request")],
    )  # fmt: skip
    add(42, 1, 20, "delivered", tries=[("delivered", 200, None)])
    add(2, 1, 30, "skipped")
    add(2, 2, 40, "queued")
    made["never"] = add(2, 2, 50, None)
    return made


@pytest.fixture(params=[SIMPLE])
def client(request, populated, cdr_dsn, airflow_db, monkeypatch, tmp_path) -> Iterator[Any]:
    """A parent app with the page mounted at /cdr-webhook, and tokens of each test user."""
    from airflow.api_fastapi import app as api_app
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from cdr_webhook.web.app import create_app

    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER", request.param)
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", USERS)
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(tmp_path / "passwords.json"))
    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "test-jwt-secret-" + "0123456789abcdef" * 4)
    monkeypatch.setenv("AIRFLOW__API__SECRET_KEY", "test-secret-key")
    monkeypatch.setenv("AIRFLOW_CONN_CDR_WEBHOOK", http_conn("https://hooks.example/p/s3cret-path",
                       api_key=API_KEY, signing_secret=SIGNING_SECRET))  # fmt: skip
    monkeypatch.setenv("AIRFLOW_CONN_CDR_DB", postgres_conn(cdr_dsn))
    api_app.purge_cached_app()
    manager = api_app.init_auth_manager()
    tokens = {
        name: manager.generate_jwt(SimpleAuthManagerUser(username=name, role=role))
        for name, role in (entry.split(":") for entry in USERS.split(","))
    }
    parent = FastAPI()
    parent.mount("/cdr-webhook", create_app())
    with TestClient(parent, base_url="http://127.0.0.1:8080") as http:
        http.tokens = tokens  # type: ignore[attr-defined]
        yield http
    api_app.purge_cached_app()
