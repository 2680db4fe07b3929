"""A newcomer's path, in headless Chromium: the demo, then ``scripts/demo-ui``, then the three workflows.

The demo runs as the README gives it (``python -m demo``, which ``scripts/demo`` runs) on a state
folder and a CDR database of its own; then ``scripts/demo-ui`` itself starts the live demo on them
(api-server, scheduler, dag-processor, triggerer, and the demo's receiver printing each POST). The
tests take the steps of docs/demo.md, "Try the three workflows", in order: find why a CDR failed
(its task's page and log, then the Deliveries page's detail), clear that task and redeliver from the
page, backfill the demo's window with the trigger form and with ``airflow backfill create``; each
time the receiver's lines on the console must show the CDRs sent again with their original
``webhook-id``. Then the pages' disabled actions and the Endpoints page, a missing ``cdr_db``
connection, and Ctrl-C, which must leave nothing running.
Screenshots go to ``test-artifacts/deliveries-page/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import psutil
import psycopg
import pytest
import requests

from demo.stack import free_port, metadata_dbname
from tests.conftest import ROOT, scratch_database

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = [pytest.mark.e2e, pytest.mark.scheduler, pytest.mark.browser]

SCREENSHOTS = ROOT / "test-artifacts" / "deliveries-page"
RECEIVED = re.compile(
    r"^receiver: POST \S+ cdr_id=(?P<cdr_id>\S+) webhook-id=(?P<webhook_id>\S+) "
    r"signature (?P<signature>\w+): answered (?P<status>\d+)$",
    re.M,
)


@dataclasses.dataclass
class LiveDemo:
    """``scripts/demo-ui`` running on a demo's state: its address, its console, its CDR database."""

    base: str
    state: Path
    dsn: str
    process: subprocess.Popen[bytes]
    #: The webhook-id each CDR was first sent with (its task log's, read in the first test).
    original: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def console(self) -> str:
        return (self.state / "demo-ui.log").read_text(errors="replace")

    def received(self) -> list[dict[str, str]]:
        """The receiver's lines on the console, in order."""
        return [match.groupdict() for match in RECEIVED.finditer(self.console)]

    def wait_received(self, want: Counter[str], timeout: float = 180) -> list[dict[str, str]]:
        """Wait until the console shows at least ``want`` POSTs of each CDR; return every line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.received()
            got = Counter(line["cdr_id"] for line in lines)
            if all(got[cdr_id] >= count for cdr_id, count in want.items()):
                return lines
            time.sleep(1)
        pytest.fail(f"the receiver did not get {dict(want)} in {timeout:.0f} s:\n{self.console[-6000:]}")

    def ledger(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()


@pytest.fixture(scope="module")
def demo_dsn(pg_server: str) -> Iterator[str]:
    """A scratch CDR database for the demo (it creates the reference schema there, and Airflow's
    metadata database beside it, which goes with it)."""
    with scratch_database(pg_server, "cdr_demo_ui") as dsn:
        try:
            yield dsn
        finally:
            with psycopg.connect(pg_server, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{metadata_dbname(dsn)}" WITH (FORCE)')


@pytest.fixture(scope="module")
def live_demo(demo_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDemo]:
    state = tmp_path_factory.mktemp("demo-state")
    # A newcomer's shell: none of the test session's Airflow settings.
    shell = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    shell |= {"CDR_DEMO_STATE": str(state), "CDR_DATABASE_URL": demo_dsn}
    demo = subprocess.run(
        [sys.executable, "-m", "demo"], env=shell, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert demo.returncode == 0, demo.stdout[-6000:] + demo.stderr[-6000:]
    assert "Warning" not in demo.stderr, demo.stderr  # none of ours (RuntimeDirWarning, JWT key length)

    port = free_port()
    with (state / "demo-ui.log").open("wb") as log:
        process = subprocess.Popen(
            [str(ROOT / "scripts" / "demo-ui")],
            env=shell | {"PORT": str(port)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    live = LiveDemo(f"http://127.0.0.1:{port}", state, demo_dsn, process)
    try:
        wait_started(live)
        yield live
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def wait_started(live: LiveDemo) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if live.process.poll() is not None:
            pytest.fail(f"scripts/demo-ui exited {live.process.returncode}:\n{live.console}")
        if "The three workflows to try" in live.console:
            return
        time.sleep(1)
    pytest.fail(f"scripts/demo-ui did not start in 300 s:\n{live.console}")


def failed_delivery(live: LiveDemo) -> tuple[str, str, int]:
    """The demo's CDR the receiver refused (400): its cdr_id, run and map index."""
    [row] = live.ledger(
        "SELECT cdr_id, run_id, map_index FROM cdr_webhook.delivery WHERE http_status = 400 AND attempts = 1"
    )
    return row


def sendable(live: LiveDemo) -> list[str]:
    """The demo's CDRs a run can send (not skipped, and not held with client 3's endpoint)."""
    return [
        row[0]
        for row in live.ledger(
            "SELECT cdr_id FROM cdr_webhook.delivery WHERE status IN ('delivered', 'failed') ORDER BY cdr_id"
        )
    ]


def test_the_console_says_what_runs_where(live_demo):
    console = live_demo.console
    assert f"api-server     {live_demo.base}" in console
    for component in ("scheduler", "dag-processor", "triggerer"):
        assert f"\n  {component} " in console
    assert "schedule '* * * * *'" in console  # a schedule a backfill can use
    assert re.search(r"Receiver: +http://127\.0\.0\.1:\d+/cdr-hook", console)
    assert f"Deliveries page: {live_demo.base}/plugin/cdr-deliveries" in console
    assert "airflow backfill create --dag-id cdr_webhook" in console
    for noise in ("Warning", "warning"):  # InsecureKeyLengthWarning, RuntimeDirWarning: none
        assert noise not in console


def test_1_find_why_a_cdr_failed_its_log_then_the_pages_detail(live_demo, browser):
    from playwright.sync_api import expect

    cdr_id, run_id, map_index = failed_delivery(live_demo)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    ui = browser.new_page(viewport={"width": 1400, "height": 900})
    # Grid: the demo's run's red post_cdr square lists its tasks by cdr_id; the failed one's opens.
    ui.goto(f"{live_demo.base}/dags/cdr_webhook")
    ui.get_by_test_id(f"grid-{run_id}-post_cdr").click()
    listed = ui.get_by_role("row").filter(has=ui.get_by_role("link", name=cdr_id, exact=True))
    expect(listed).to_contain_text("Failed", timeout=60_000)
    listed.get_by_role("link", name=cdr_id, exact=True).click()
    expect(ui).to_have_url(re.compile(f"/tasks/post_cdr/mapped/{map_index}$"))
    expect(ui.get_by_role("heading", name=f"post_cdr [{cdr_id}]")).to_be_visible(timeout=60_000)
    expect(ui.get_by_text(f"CDR {cdr_id} to endpoint cdr_webhook failed: HTTP 400")).to_be_visible()
    sending = ui.get_by_text(f"Sending CDR {cdr_id} to endpoint cdr_webhook (try 1, webhook-id")
    webhook_id = re.search(r"webhook-id (msg_\w+)", sending.first.inner_text()).group(1)
    live_demo.original[cdr_id] = webhook_id
    ui.screenshot(path=SCREENSHOTS / "9-demo-failed-task-log.png")

    # Browse → CDR deliveries → the CDR: its attempt, what the receiver answered, the request.
    ui.goto(f"{live_demo.base}/plugin/cdr-deliveries")
    frame = ui.frame_locator("iframe")
    expect(frame.get_by_role("row").filter(has_text=cdr_id)).to_contain_text(
        "HTTP 400 Bad Request", timeout=60_000
    )
    frame.get_by_role("link", name=cdr_id).click()
    expect(frame.get_by_role("heading", name=cdr_id)).to_be_visible()
    attempts = frame.get_by_role("table").nth(0)
    expect(attempts).to_contain_text("HTTP 400 Bad Request")
    expect(attempts).to_contain_text('"status": 400')  # the receiver's answer, its excerpt
    expect(frame.get_by_role("row").filter(has_text="webhook-id")).to_contain_text(webhook_id)
    ui.screenshot(path=SCREENSHOTS / "10-demo-failed-delivery-detail.png")
    ui.close()


def test_2_clear_the_failed_task_then_redeliver_from_the_page(live_demo, browser):
    from playwright.sync_api import expect

    cdr_id, run_id, map_index = failed_delivery(live_demo)
    webhook_id = live_demo.original[cdr_id]
    before = Counter(line["cdr_id"] for line in live_demo.received())
    ui = browser.new_page(viewport={"width": 1400, "height": 900})
    ui.goto(f"{live_demo.base}/dags/cdr_webhook/runs/{quote(run_id)}/tasks/post_cdr/mapped/{map_index}")
    expect(ui.get_by_role("heading", name=f"post_cdr [{cdr_id}]")).to_be_visible(timeout=60_000)
    ui.get_by_role("button", name="Press shift+c to clear").click()
    dialog = ui.get_by_role("dialog")
    expect(dialog.get_by_role("button", name="Affected Tasks: 1")).to_be_visible()
    dialog.get_by_role("button", name="Confirm").click()
    expect(dialog).to_be_hidden()
    # The live receiver accepts it: sent again, with the webhook-id of its first try.
    lines = live_demo.wait_received(before + Counter({cdr_id: 1}))
    assert lines[-1] == {"cdr_id": cdr_id, "webhook_id": webhook_id, "signature": "valid", "status": "200"}

    # Browse → CDR deliveries → the CDR → Redeliver: once more, the same webhook-id.
    deadline = time.monotonic() + 60
    while live_demo.ledger("SELECT status FROM cdr_webhook.delivery WHERE cdr_id = %s", cdr_id) != [
        ("delivered",)
    ]:
        assert time.monotonic() < deadline, "the cleared task did not record its delivery"
        time.sleep(1)
    ui.goto(f"{live_demo.base}/plugin/cdr-deliveries")
    frame = ui.frame_locator("iframe")
    frame.get_by_role("link", name=cdr_id).click()
    expect(frame.get_by_role("heading", name=cdr_id)).to_be_visible(timeout=60_000)
    frame.get_by_role("button", name="Redeliver", exact=True).click()
    expect(frame.get_by_text("Cleared 1 post_cdr task(s)")).to_be_visible(timeout=60_000)
    ui.screenshot(path=SCREENSHOTS / "11-demo-redelivered.png")
    lines = live_demo.wait_received(before + Counter({cdr_id: 2}))
    again = [line for line in lines if line["cdr_id"] == cdr_id][-2:]
    assert [line["webhook_id"] for line in again] == [webhook_id, webhook_id]
    assert all(line["status"] == "200" and line["signature"] == "valid" for line in again)
    ui.close()


def demo_minutes(live: LiveDemo) -> tuple[dt.datetime, dt.datetime]:
    [(first, last)] = live.ledger(
        "SELECT date_trunc('minute', min(cdr_created_at)), date_trunc('minute', max(cdr_created_at)) "
        "FROM cdr_webhook.delivery"
    )
    return first.astimezone(dt.UTC), last.astimezone(dt.UTC)


def first_webhook_ids(live: LiveDemo, cdr_ids: list[str]) -> dict[str, str]:
    """The webhook-id each CDR's first try was sent with, as its task's log (REST) says."""
    found = {}
    for cdr_id, run_id, map_index in live.ledger(
        "SELECT cdr_id, run_id, map_index FROM cdr_webhook.delivery WHERE cdr_id = ANY(%s)", cdr_ids
    ):
        log = requests.get(
            f"{live.base}/api/v2/dags/cdr_webhook/dagRuns/{quote(run_id)}/taskInstances/post_cdr/logs/1",
            params={"map_index": map_index, "full_content": True},
            headers={"accept": "application/json"},
            timeout=60,
        ).json()["content"]
        events = " ".join(str(entry.get("event", "")) for entry in log if isinstance(entry, dict))
        found[cdr_id] = re.search(rf"Sending CDR {cdr_id} .*?webhook-id (msg_\w+)", events).group(1)
    return found


def test_3_backfill_the_demos_window_with_the_trigger_form_then_the_cli(live_demo, browser):
    from playwright.sync_api import expect

    cdr_ids = sendable(live_demo)
    assert len(cdr_ids) == 8
    webhook_ids = first_webhook_ids(live_demo, cdr_ids)
    first, last = demo_minutes(live_demo)
    before = Counter(line["cdr_id"] for line in live_demo.received())

    # Dags → cdr_webhook → Trigger: Params window_start, window_end (excluded) and policy all.
    ui = browser.new_page(viewport={"width": 1400, "height": 900})
    ui.goto(f"{live_demo.base}/dags/cdr_webhook")
    ui.get_by_role("button", name="Trigger").first.click()
    dialog = ui.get_by_role("dialog")
    for moment in (first, last + dt.timedelta(minutes=1)):
        # The first empty date-time field: Window start, then Window end (Logical Date has a value).
        dialog.get_by_test_id("datetime-input").filter(has_text="Select date and time").first.click()
        ui.locator("input[placeholder='YYYY/MM/DD']:visible").fill(moment.strftime("%Y/%m/%d"))
        ui.locator("input[placeholder='HH:mm']:visible").fill(moment.strftime("%H:%M"))
        ui.keyboard.press("Escape")
        # The picker closes after a moment: the next field's picker must be the only one open.
        expect(ui.locator("input[placeholder='YYYY/MM/DD']:visible")).to_have_count(0)
    dialog.get_by_role("combobox").click()
    ui.get_by_role("option", name="all", exact=True).click()
    ui.screenshot(path=SCREENSHOTS / "12-demo-trigger-form.png")
    dialog.get_by_test_id("trigger-dag-submit").click()
    expect(dialog).to_be_hidden(timeout=30_000)
    ui.close()
    lines = live_demo.wait_received(before + Counter(cdr_ids))
    runs = requests.get(
        f"{live_demo.base}/api/v2/dags/cdr_webhook/dagRuns",
        params={"run_type": "manual", "order_by": "-run_after", "limit": 1},
        timeout=30,
    ).json()["dag_runs"]
    assert runs[0]["conf"]["policy"] == "all"
    assert runs[0]["conf"]["window_start"].startswith(first.strftime("%Y-%m-%dT%H:%M:00"))
    assert {line["cdr_id"]: line["webhook_id"] for line in lines if line["cdr_id"] in cdr_ids} == webhook_ids

    # The same minutes with the CLI, ui.env sourced, as the console and docs/demo.md give it.
    before = Counter(line["cdr_id"] for line in live_demo.received())
    command = (
        f"source {live_demo.state / 'ui.env'} && {ROOT / '.venv' / 'bin' / 'airflow'} backfill create "
        f"--dag-id cdr_webhook --from-date {first.isoformat()} --to-date {last.isoformat()} "
        """--reprocess-behavior completed --dag-run-conf '{"policy": "all"}'"""
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    created = subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert created.returncode == 0, created.stdout[-3000:] + created.stderr[-3000:]
    assert "No runs to create" not in created.stdout + created.stderr
    lines = live_demo.wait_received(before + Counter(cdr_ids))
    assert {line["cdr_id"]: line["webhook_id"] for line in lines if line["cdr_id"] in cdr_ids} == webhook_ids
    backfills = requests.get(
        f"{live_demo.base}/api/v2/backfills", params={"dag_id": "cdr_webhook"}, timeout=30
    ).json()["backfills"]
    assert len(backfills) == 1
    assert backfills[0]["dag_run_conf"] == {"policy": "all"}


def test_4_disabled_actions_say_why_and_the_endpoints_page_says_each_reason_once(live_demo, browser):
    from playwright.sync_api import expect

    held = live_demo.ledger("SELECT cdr_id FROM cdr_webhook.delivery WHERE endpoint = 'cdr_webhook_client_3'")
    skipped = live_demo.ledger("SELECT cdr_id FROM cdr_webhook.delivery WHERE status = 'skipped'")
    assert len(held) == 1
    assert len(skipped) == 2
    ui = browser.new_page(viewport={"width": 1400, "height": 900})
    frame = ui.frame_locator("iframe")
    ui.goto(f"{live_demo.base}/plugin/cdr-deliveries")
    frame.get_by_role("link", name=skipped[0][0]).click()
    redeliver = frame.get_by_role("button", name="Redeliver", exact=True)
    expect(redeliver).to_be_disabled(timeout=60_000)
    expect(redeliver).to_have_accessible_description(re.compile("this CDR was skipped.*mend the source row"))

    ui.goto(f"{live_demo.base}/plugin/cdr-deliveries")
    frame.get_by_role("link", name=held[0][0]).click()
    expect(redeliver).to_be_disabled(timeout=60_000)
    expect(redeliver).to_have_accessible_description(
        re.compile("its endpoint is paused .*mend the connection")
    )
    frame.get_by_role("link", name="Resume cdr_webhook_client_3").click()

    # The Endpoints page, at the endpoint's row: its reason once, as an automatic pause, whole words.
    row = frame.locator("#endpoint-cdr_webhook_client_3")
    expect(row).to_contain_text("paused automatically: configuration: connection 'cdr_webhook_client_3'")
    expect(row.get_by_role("button", name="Resume")).to_be_enabled()
    assert row.inner_text().count("must be a list of integers") == 1
    ui.screenshot(path=SCREENSHOTS / "13-demo-endpoints.png")
    broken = row.locator("td.why").evaluate(
        """cell => {
            // Every word of the reason on one line: a word split across lines is a line break in it.
            const text = cell.firstChild, broken = [];
            for (const m of text.data.matchAll(/\\S+/g)) {
                const range = document.createRange();
                range.setStart(text, m.index);
                range.setEnd(text, m.index + m[0].length);
                const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
                if (tops.size > 1) broken.push(m[0]);
            }
            return broken;
        }"""
    )
    assert broken == []
    ui.close()


def test_5_a_missing_cdr_db_connection_says_what_to_do(live_demo, browser):
    from playwright.sync_api import expect

    base = live_demo.base
    ui = browser.new_page(viewport={"width": 1400, "height": 800})
    # Browse → CDR deliveries opens this route; everyone is an admin in the demo's UI (no login form).
    ui.goto(f"{base}/plugin/cdr-deliveries")
    frame = ui.frame_locator("iframe")
    expect(frame.get_by_role("heading", name="Deliveries")).to_be_visible(timeout=60_000)
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
    ui.close()


def listening(base: str) -> bool:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=2):
        return True
    return False


def test_6_ctrl_c_stops_all_of_it(live_demo):
    receiver = re.search(r"Receiver: +(http://127\.0\.0\.1:\d+)", live_demo.console).group(1)
    assert listening(live_demo.base)
    assert listening(receiver)
    started = psutil.Process(live_demo.process.pid).children(recursive=True)
    assert len(started) >= 4  # the four Airflow components, at least
    live_demo.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert live_demo.process.wait(timeout=120) == 0
    assert "Stopped: Airflow, the receiver and the CDR database." in live_demo.console
    assert "outlived the stop" not in live_demo.console
    alive = [proc for proc in started if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], [proc.cmdline() for proc in alive]
    assert not listening(live_demo.base)
    assert not listening(receiver)
