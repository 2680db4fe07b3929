"""The Deliveries page inside a running Airflow: the plugin loaded by the api-server, its auth over
HTTP with the SimpleAuthManager's real users, and a support engineer's path in headless Chromium.

Users: ``admin`` (everything), ``viewer`` (reads every DAG, changes none), ``nobody`` (no role: the
SimpleAuthManager grants a role-less user nothing, so it stands for a user without access to the
``cdr_webhook`` DAG; per-DAG grants need an auth manager that has them, such as FAB's).
Screenshots go to ``test-artifacts/deliveries-page/`` (git-ignored).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest
import requests

from demo.dialer import Dialer
from tests.conftest import ROOT
from tests.support.deployments import API_KEY

if TYPE_CHECKING:
    from demo.stack import AirflowStack

pytestmark = [pytest.mark.e2e, pytest.mark.scheduler]

PASSWORDS = {"admin": "admin-pass-7731", "viewer": "viewer-pass-7731", "nobody": "nobody-pass-7731"}
START = (dt.datetime.now(dt.UTC) - dt.timedelta(days=2)).replace(hour=9, minute=0, second=0, microsecond=0)
SCREENSHOTS = ROOT / "test-artifacts" / "deliveries-page"


@pytest.fixture(scope="module")
def deployment(deploy, tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-deliveries-page")
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps(PASSWORDS))
    with deploy(
        home,
        {
            "PYTHONPATH": str(ROOT),
            # The triggerer runs, the commit watcher does not: these tests start their runs by hand.
            "AIRFLOW__CDR_WEBHOOK__WATCH_INTERVAL_SECONDS": "0",
            "AIRFLOW__CDR_WEBHOOK__SCHEDULE": "0 * * * *",
            "AIRFLOW__CDR_WEBHOOK__RETRY_DELAY_SECONDS": "1",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer,nobody:",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        },
        login=("admin", PASSWORDS["admin"]),
    ) as (stack, receiver):
        yield stack, receiver


@pytest.fixture(scope="module")
def failed_run(deployment, cdr_dsn):
    """A run of two CDRs, one refused by the receiver (400): the run fails; and a CDR no run has queued."""
    import psycopg

    stack, receiver = deployment
    with psycopg.connect(cdr_dsn, autocommit=True) as conn:
        dialer = Dialer(conn)
        dialer.cdr(client_id=1, created_at=START + dt.timedelta(minutes=6))  # delivered
        refused = dialer.cdr(
            client_id=1, created_at=START + dt.timedelta(minutes=7), phone_number="+15550107007"
        )
        never = dialer.cdr(client_id=5, created_at=START + dt.timedelta(minutes=9))
    receiver.script(refused, [400])
    conf = {"window_start": START.isoformat(), "window_end": (START + dt.timedelta(minutes=8)).isoformat()}
    run_id = stack.trigger(conf=conf)
    assert stack.wait_run(run_id) == "failed"
    return run_id, refused, never


def token(stack: AirflowStack, user: str) -> str:
    response = requests.post(
        f"{stack.base}/auth/token", json={"username": user, "password": PASSWORDS[user]}, timeout=10
    )
    response.raise_for_status()
    return response.json()["access_token"]


def page(stack: AirflowStack, path: str, user: str | None, method: str = "GET", **kwargs):
    headers = kwargs.pop("headers", {}) | ({"authorization": f"Bearer {token(stack, user)}"} if user else {})
    return requests.request(
        method,
        f"{stack.base}/cdr-webhook{path}",
        headers=headers,
        timeout=30,
        allow_redirects=False,
        **kwargs,
    )


def test_the_api_server_loads_the_plugin_with_its_app_and_views(deployment):
    stack, _ = deployment
    plugins = stack.api("GET", "/plugins")["plugins"]
    [ours] = [p for p in plugins if p["name"] == "cdr_webhook"]
    assert [app["url_prefix"] for app in ours["fastapi_apps"]] == ["/cdr-webhook"]
    views = {view["destination"]: view for view in ours["external_views"]}
    assert views["nav"]["url_route"] == "cdr-deliveries"
    assert "{RUN_ID}" in views["task_instance"]["href"]
    assert "{MAP_INDEX}" in views["task_instance"]["href"]


def test_auth_over_http_401_403_and_read_only_viewers(deployment, failed_run):
    stack, _ = deployment
    _, refused, _ = failed_run
    assert page(stack, "/", None).status_code == 401
    denied = page(stack, "/", "nobody")
    assert denied.status_code == 403
    assert refused not in denied.text
    viewed = page(stack, "/", "viewer")
    assert viewed.status_code == 200
    assert refused in viewed.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', viewed.text).group(1)
    pause = {"csrf": csrf, "endpoint": "cdr_webhook"}
    assert page(stack, "/endpoints/pause", "viewer", "POST", data=pause).status_code == 403
    # A cross-site POST is refused even with a valid token and form.
    admin_csrf = re.search(r'name="csrf" value="([^"]+)"', page(stack, "/", "admin").text).group(1)
    cross = page(
        stack, "/endpoints/pause", "admin", "POST", data=pause | {"csrf": admin_csrf},
        headers={"origin": "https://evil.example"},
    )  # fmt: skip
    assert cross.status_code == 403
    assert "paused" not in page(stack, "/endpoints", "admin").text.split("<tbody>")[1].split("</tbody>")[0]


def signed_in(browser: Any, stack: AirflowStack) -> Any:
    """A browser page of a new context, signed in to Airflow's UI as ``admin``."""
    from playwright.sync_api import expect

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    ui = browser.new_context(viewport={"width": 1500, "height": 950}).new_page()
    ui.goto(f"{stack.base}/")
    ui.get_by_label("Username").fill("admin")
    ui.get_by_label("Password").fill(PASSWORDS["admin"])
    ui.get_by_role("button", name="Sign in").click()
    expect(ui.get_by_role("link", name="Dags").first).to_be_visible(timeout=30_000)
    return ui


@pytest.mark.browser
def test_a_support_engineer_finds_a_failed_delivery_and_redelivers_it(deployment, failed_run, browser):
    """Log in, open the page in Airflow's nav, filter to the failure, open it, redeliver, see attempt 2."""
    from playwright.sync_api import expect

    stack, receiver = deployment
    run_id, refused, never = failed_run
    ui = signed_in(browser, stack)

    # The nav entry opens the page inside Airflow's UI.
    ui.goto(f"{stack.base}/plugin/cdr-deliveries")
    frame = ui.frame_locator("iframe")
    expect(frame.get_by_role("heading", name="Deliveries")).to_be_visible(timeout=30_000)
    frame.get_by_label("Status").select_option("failed")
    day = START.date().isoformat()
    frame.get_by_label("From").fill(day)
    frame.get_by_label("To").fill(day)
    expect(frame.get_by_role("row")).to_have_count(3)  # the header, the delivered CDR and the refused one
    frame.get_by_role("button", name="Filter").click()
    expect(frame.get_by_role("button", name="Redeliver this filter's result with a run")).to_be_visible()
    row = frame.get_by_role("row").filter(has_text=refused)
    expect(row).to_be_visible()
    expect(row).to_contain_text("HTTP 400 Bad Request")
    expect(frame.get_by_role("row")).to_have_count(2)  # the header and the one failure
    ui.screenshot(
        path=SCREENSHOTS / "1-list-filtered-to-the-failure.png",
        clip={"x": 0, "y": 0, "width": 1500, "height": 420},
    )

    row.get_by_role("link", name=refused).click()
    expect(frame.get_by_role("heading", name=refused)).to_be_visible()
    attempts = frame.get_by_role("table").nth(0)
    expect(attempts).to_contain_text("HTTP 400 Bad Request")
    expect(frame.get_by_text('"phone_number": "+15550107007"')).to_be_visible()
    expect(frame.locator("body")).not_to_contain_text(API_KEY)
    ui.screenshot(path=SCREENSHOTS / "2-delivery-detail-attempt-1-refused.png", full_page=True)

    frame.get_by_role("button", name="Redeliver").click()
    expect(frame.get_by_text("Cleared 1 post_cdr task(s) of run")).to_be_visible()
    expect(frame.get_by_role("link", name=run_id)).to_have_attribute(
        "href", f"/dags/cdr_webhook/runs/{quote(run_id, safe='')}"
    )
    ui.screenshot(path=SCREENSHOTS / "3-redelivery-cleared-the-task.png")

    assert stack.wait_run(run_id) == "success"
    assert [r.answered for r in receiver.received(refused)] == [400, 200]
    frame.get_by_role("link", name="back to the delivery").click()
    history = frame.get_by_role("row").filter(has_text="delivered")
    expect(history.first).to_be_visible()
    expect(frame.get_by_role("cell", name="2", exact=True)).to_be_visible()  # attempt 2
    ui.screenshot(path=SCREENSHOTS / "4-delivery-detail-attempt-2-delivered.png", full_page=True)

    # The task instance's own tab shows its delivery.
    [ti] = [t for t in stack.task_instances(run_id) if t["rendered_map_index"] == refused]
    ui.goto(
        f"{stack.base}/dags/cdr_webhook/runs/{quote(run_id)}/tasks/post_cdr/mapped/{ti['map_index']}/plugin/cdr-delivery"
    )
    expect(ui.frame_locator("iframe").get_by_role("heading", name=refused)).to_be_visible(timeout=30_000)
    ui.screenshot(path=SCREENSHOTS / "5-task-instance-tab.png")

    # Completeness: client 5's CDR was never queued; one click runs the DAG for that day and client.
    ui.goto(f"{stack.base}/plugin/cdr-deliveries")
    frame = ui.frame_locator("iframe")
    frame.get_by_role("link", name="Completeness").click()
    expect(frame.get_by_role("heading", name="Completeness")).to_be_visible()
    frame.get_by_label("From").fill(day)
    frame.get_by_label("To").fill(day)
    frame.get_by_role("button", name="Show").click()
    expect(frame.get_by_role("heading", name=f"Completeness {day} – {day} (UTC)")).to_be_visible()
    five = frame.get_by_role("row").filter(has=frame.get_by_role("cell", name="5", exact=True))
    ui.screenshot(path=SCREENSHOTS / "6-completeness.png")
    five.get_by_role("button", name="send never queued").click()
    expect(frame.get_by_text("Triggered run")).to_be_visible()
    new_run = [r for r in stack.runs(run_type="manual") if r["conf"].get("client_id") == 5]
    assert [r["conf"]["policy"] for r in new_run] == ["missing"]
    assert stack.wait_run(new_run[0]["dag_run_id"]) == "success"
    assert [r.answered for r in receiver.received(never)] == [200]
    ui.context.close()


@pytest.mark.browser
def test_an_operator_tests_an_endpoint_and_reads_its_health(deployment, failed_run, browser, cdr_dsn):
    """Endpoints → Test → confirm: the verdict; then the endpoint's health page, its charts the ledger's."""
    import psycopg
    from playwright.sync_api import expect

    stack, receiver = deployment
    ui = signed_in(browser, stack)
    ui.goto(f"{stack.base}/plugin/cdr-deliveries")
    frame = ui.frame_locator("iframe")
    frame.get_by_role("link", name="Endpoints").click()
    expect(frame.get_by_role("heading", name="Endpoints")).to_be_visible(timeout=30_000)
    expect(frame.locator('svg[data-chart="trend"]').first).to_be_visible()
    frame.get_by_role("button", name="send a test CDR to cdr_webhook").click()
    expect(frame.get_by_role("heading", name="Send a test CDR to cdr_webhook")).to_be_visible()
    before = len(receiver.received())
    frame.get_by_role("button", name="Send the test CDR").click()
    verdict = frame.locator("#verdict")
    expect(verdict).to_have_text("delivered", timeout=30_000)
    tests = receiver.received()[before:]
    assert len(tests) == 1
    assert tests[0].headers.get("cdr-webhook-test") == "true"
    assert tests[0].signature_ok is True
    expect(frame.get_by_text(tests[0].cdr_id)).to_be_visible()
    ui.screenshot(
        path=SCREENSHOTS / "7-test-cdr-delivered.png", clip={"x": 0, "y": 0, "width": 1500, "height": 520}
    )

    frame.get_by_role("link", name="cdr_webhook's health").click()
    expect(frame.get_by_role("heading", name="cdr_webhook")).to_be_visible()
    attempts = frame.locator('svg[data-chart="attempts"]')
    expect(attempts).to_be_visible()
    expect(frame.locator('svg[data-chart="latency"]')).to_be_visible()
    expect(frame.locator('svg[data-chart="pickup"]')).to_be_visible()
    expect(frame.locator("#events")).to_contain_text("test CDR")
    bars = attempts.locator("g.point").evaluate_all(
        "gs => gs.map(g => [Number(g.dataset.delivered), Number(g.dataset.failures)])"
    )
    with psycopg.connect(cdr_dsn, autocommit=True) as conn:
        held = conn.execute(
            # Every attempt this module's runs made (minutes ago: all inside the last 24 hours).
            "SELECT count(*) FILTER (WHERE status = 'delivered'), count(*) FILTER (WHERE status <> "
            "'delivered') FROM cdr_webhook.delivery_attempt WHERE endpoint = 'cdr_webhook'"
        ).fetchone()
    assert (sum(d for d, _ in bars), sum(f for _, f in bars)) == held
    assert held[0] >= 1
    assert held[1] >= 1  # the receiver's 400
    # The page on its own (the UI's cookie signs it in), for a screenshot of the whole page.
    ui.goto(f"{stack.base}/cdr-webhook/endpoint?endpoint=cdr_webhook")
    expect(ui.locator('svg[data-chart="pickup"]')).to_be_visible()
    ui.screenshot(path=SCREENSHOTS / "8-endpoint-health.png", full_page=True)
