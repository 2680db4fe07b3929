"""Fixtures for running the real DAG with ``dag.test()``: a migrated metadata DB, the endpoint, a runner."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import time
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from demo.connections import http_conn
from demo.receiver import Receiver
from tests.conftest import ROOT, reread_settings
from tests.support.deployments import API_KEY, SIGNING_SECRET, receiver_deployment

if TYPE_CHECKING:
    import contextlib
    from collections.abc import Callable, Iterator, Mapping
    from pathlib import Path

    from demo.stack import AirflowStack


@pytest.fixture(scope="module")
def deploy(
    pg_server: str, cdr_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., contextlib.AbstractContextManager[tuple[AirflowStack, Receiver]]]:
    """
    ``deploy(home, env, *servers, **stack_options)``: a module's real Airflow and its receiver.

    :func:`tests.support.deployments.receiver_deployment` on this session's PostgreSQL; ``home`` is a path, or
    the name of a new temporary directory.
    """

    def deployment(
        home: Path | str, env: Mapping[str, str], *servers: Any, **stack_options: Any
    ) -> contextlib.AbstractContextManager[tuple[AirflowStack, Receiver]]:
        where = tmp_path_factory.mktemp(home) if isinstance(home, str) else home
        return receiver_deployment(where, pg_server, cdr_dsn, env, *servers, **stack_options)

    return deployment


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """A verifying receiver registered as the default endpoint, connection ``cdr_webhook``."""
    with Receiver(secret=SIGNING_SECRET, api_key=API_KEY) as server:
        monkeypatch.setenv(
            "AIRFLOW_CONN_CDR_WEBHOOK", http_conn(server.url, api_key=API_KEY, signing_secret=SIGNING_SECRET)
        )
        yield server


@pytest.fixture
def cdr_conn(cdr_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection to the CDR database that leaves its schema alone (for module-wide deployments)."""
    with psycopg.connect(cdr_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def run_dag(airflow_db: None, cdr_db: Any) -> Callable[..., Any]:
    """Run the ``cdr_webhook`` DAG once with ``dag.test()``, with the given Params; return the run."""
    from airflow.dag_processing.dagbag import DagBag

    def run(**params: Any) -> Any:
        reread_settings()  # the DAG is built with the settings of now
        bag = DagBag(dag_folder=str(ROOT / "dags"))
        assert not bag.import_errors, bag.import_errors
        dag = bag.get_dag("cdr_webhook")
        conf = {
            key: value.isoformat() if isinstance(value, dt.datetime) else value
            for key, value in params.items()
        }
        return dag.test(logical_date=None, run_conf=conf)

    return run


# Flags for a headless Chromium on a machine with no display and a closed network (root needs no sandbox).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Chromium driven by Playwright: ``$CHROMIUM`` (scripts/test sets it), or one on PATH."""
    executable = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not executable:
        pytest.fail(
            "browser test: no Chromium found. scripts/test installs Debian's chromium when run as root; "
            "otherwise install one or set CHROMIUM=/path/to/chrome (or deselect: -m 'not browser')"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


LOCAL_REDIS = "redis://127.0.0.1:6379/0"


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis for Celery: ``$CDR_TEST_REDIS_URL`` or 127.0.0.1:6379 when it answers, else one started here.

    The one started here is ``$REDIS_SERVER`` (scripts/ensure-redis finds or installs it) or a
    ``redis-server`` on PATH, on a free port of 127.0.0.1, stopped at the end of the session.
    """
    wanted = os.environ.get("CDR_TEST_REDIS_URL", LOCAL_REDIS)
    if redis_answers(wanted):
        yield wanted
        return
    executable = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if not executable:
        pytest.fail(
            f"celery test: no Redis answers at {wanted} and no redis-server found. scripts/test installs "
            "Debian's redis-server when run as root; otherwise install one, set REDIS_SERVER=/path/to/"
            "redis-server or CDR_TEST_REDIS_URL (or deselect: -m 'not celery')"
        )
    from demo.stack import free_port

    port = free_port()
    directory = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [executable, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory)]
        + ["--save", "", "--appendonly", "no"],
        stdout=(directory / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        for _ in range(100):
            if redis_answers(url) or server.poll() is not None:
                break
            time.sleep(0.1)
        if not redis_answers(url):
            pytest.fail(f"{executable} did not start: {(directory / 'redis.log').read_text()[-2000:]}")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
