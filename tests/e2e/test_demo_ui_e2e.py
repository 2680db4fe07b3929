"""A newcomer's first click: ``scripts/demo-ui``, then Browse → CDR deliveries, in headless Chromium.

``scripts/demo-ui`` itself is started (one api-server) on a demo state of its own: the demo's
``ui.env`` as :func:`demo.__main__.write_ui_env` writes it, a migrated metadata database, and the CDR
database with CDRs and their ledger rows (``CDR_DATABASE_URL``, as the demo records it when given
one). The page must show those deliveries; with the ``cdr_db`` connection deleted (through Airflow's
REST API) it must be a page naming the connection and saying what to do, not a 500.
Screenshots go to ``test-artifacts/deliveries-page/``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import time
from typing import TYPE_CHECKING

import psycopg
import pytest
import requests

from demo.__main__ import write_ui_env
from demo.dialer import Dialer
from demo.stack import free_port
from tests.conftest import AIRFLOW_HOME, ROOT
from tests.deployments import prepare_cdr_database

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.e2e, pytest.mark.scheduler, pytest.mark.browser]

SCREENSHOTS = ROOT / "test-artifacts" / "deliveries-page"
DAY = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)).replace(microsecond=0)


def demo_data(dsn: str) -> dict[str, str]:
    """Two CDRs of the demo's kind and their ledger rows: one delivered, one refused by the receiver."""
    prepare_cdr_database(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        dialer = Dialer(conn)
        made = {}
        for minute, status, http, error in (
            (1, "delivered", 200, None),
            (2, "failed", 400, "HTTP 400 Bad Request"),
        ):
            created = DAY + dt.timedelta(minutes=minute)
            cdr_id = dialer.cdr(client_id=1, created_at=created)
            conn.execute(
                "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status, "
                "attempts, http_status, error, dag_id, run_id, map_index) "
                "VALUES (%s, 'cdr_webhook', 1, %s, %s, 1, %s, %s, 'cdr_webhook', 'manual__demo', %s)",
                (cdr_id, created, status, http, error, minute),
            )
            made[status] = cdr_id
    return made


@pytest.fixture(scope="module")
def demo_ui(cdr_dsn, airflow_db, tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    made = demo_data(cdr_dsn)
    state = tmp_path_factory.mktemp("demo-state")
    home = state / "airflow"
    home.mkdir()
    shutil.copy(AIRFLOW_HOME / "airflow.db", home / "airflow.db")  # migrated once per session
    write_ui_env(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "CDR_DATABASE_URL": cdr_dsn,
        },
        state,
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    log = (state / "demo-ui.log").open("wb")
    process = subprocess.Popen(
        [str(ROOT / "scripts" / "demo-ui")],
        env=env | {"CDR_DEMO_STATE": str(state), "PORT": str(port), "AIRFLOW__API__WORKERS": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, process, state)
        yield base, made
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def wait_healthy(base: str, process: subprocess.Popen[bytes], state) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"scripts/demo-ui exited {process.returncode}:\n{(state / 'demo-ui.log').read_text()}"
            )
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{base}/api/v2/monitor/health", timeout=5).ok:
                return
        time.sleep(1)
    pytest.fail(f"scripts/demo-ui did not answer in 240 s:\n{(state / 'demo-ui.log').read_text()}")


def test_the_first_click_shows_the_demos_deliveries_and_a_missing_connection_says_what_to_do(
    demo_ui, browser
):
    from playwright.sync_api import expect

    base, made = demo_ui
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 800})
    ui = context.new_page()
    # Browse → CDR deliveries opens this route (the plugin's url_route); everyone is an admin in the
    # demo's UI, so there is no login form.
    ui.goto(f"{base}/plugin/cdr-deliveries")
    frame = ui.frame_locator("iframe")
    expect(frame.get_by_role("heading", name="Deliveries")).to_be_visible(timeout=60_000)
    expect(frame.get_by_role("row").filter(has_text=made["failed"])).to_contain_text("HTTP 400 Bad Request")
    expect(frame.get_by_role("row").filter(has_text=made["delivered"])).to_be_visible()
    ui.screenshot(path=SCREENSHOTS / "7-demo-ui-first-click.png")

    # The connection demo-ui defined is in Airflow's metadata: deleting it is what a newcomer's
    # environment without one looks like.
    assert requests.get(f"{base}/api/v2/connections/cdr_db", timeout=30).json()["conn_type"] == "postgres"
    assert requests.delete(f"{base}/api/v2/connections/cdr_db", timeout=30).status_code == 204
    ui.reload()
    frame = ui.frame_locator("iframe")
    message = frame.get_by_role("alert")
    missing = "the Airflow connection 'cdr_db', and the api-server has no such connection"
    expect(message).to_contain_text(missing, timeout=60_000)
    expect(message).to_contain_text("AIRFLOW_CONN_CDR_DB")
    expect(frame.get_by_role("heading", name="503")).to_be_visible()
    ui.screenshot(path=SCREENSHOTS / "8-no-cdr-db-connection.png")
    context.close()
