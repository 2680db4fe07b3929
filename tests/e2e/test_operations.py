"""Operators' workflows against a real scheduler: backfill, clearing, redelivery, monitoring.

One Airflow deployment (hourly schedule, so scheduled runs stay out of the way) serves the module.
Each test works in hours of its own two days back, so tests never see each other's CDRs.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING
from urllib.parse import quote

import pytest

from cdr_webhook.signing import webhook_id
from demo.dialer import Dialer
from tests.conftest import ROOT

if TYPE_CHECKING:
    from demo.stack import AirflowStack

pytestmark = [pytest.mark.e2e, pytest.mark.scheduler]

HOUR = dt.timedelta(hours=1)
BASE = (dt.datetime.now(dt.UTC) - dt.timedelta(days=2)).replace(minute=0, second=0, microsecond=0)


class StatsdListener:
    """Collects the StatsD datagrams Airflow's components send to 127.0.0.1."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            self.lines.extend(data.decode(errors="replace").splitlines())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def deployment(deploy, tmp_path_factory):
    statsd = StatsdListener()
    home = tmp_path_factory.mktemp("airflow-operations")
    with deploy(
        home,
        {
            "PYTHONPATH": str(ROOT),
            "AIRFLOW__CDR_WEBHOOK__FAILURE_NOTIFIER": "tests.support.notifier_probe:notifier",
            "CDR_NOTIFIER_PROBE": str(home / "notified.jsonl"),
            # The triggerer runs, the commit watcher does not: these tests start their runs by hand.
            "AIRFLOW__CDR_WEBHOOK__WATCH_INTERVAL_SECONDS": "0",
            "AIRFLOW__CDR_WEBHOOK__SCHEDULE": "0 * * * *",
            "AIRFLOW__CDR_WEBHOOK__RETRY_DELAY_SECONDS": "1",
            "AIRFLOW__CDR_WEBHOOK__MAX_RETRY_DELAY_SECONDS": "2",
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(statsd.port),
            "AIRFLOW__METRICS__STATSD_INFLUXDB_ENABLED": "True",
        },
        statsd,
    ) as (stack, receiver):
        # Unpausing starts a scheduled run for the last complete hour at once: let it settle the watermark.
        deadline = time.monotonic() + 120
        while not [r for r in stack.runs(run_type="scheduled") if r["state"] in ("success", "failed")]:
            assert time.monotonic() < deadline, stack.dump()
            time.sleep(1)
        yield stack, receiver, statsd


def hours(n: int) -> dt.datetime:
    """The start of this test's own hour: BASE + n hours."""
    return BASE + n * HOUR


def ledger(conn, cdr_ids) -> dict[str, dict]:
    rows = conn.execute(
        "SELECT cdr_id, status, attempts, http_status, run_id FROM cdr_webhook.delivery "
        "WHERE cdr_id = ANY(%s)",
        (list(cdr_ids),),
    ).fetchall()
    return {r[0]: {"status": r[1], "attempts": r[2], "http_status": r[3], "run_id": r[4]} for r in rows}


def record(conn, cdr_id: str, status: str, attempts: int = 1) -> None:
    """Write a ledger row as an earlier run would have left it."""
    conn.execute(
        "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status, attempts, "
        "dag_id, run_id) SELECT cdr_id, 'cdr_webhook', client_id, created_at, %s, %s, 'cdr_webhook', "
        "'scheduled__earlier' FROM cdr_webhook_source WHERE cdr_id = %s",
        (status, attempts, cdr_id),
    )


def watermark(conn):
    row = conn.execute("SELECT created_at FROM cdr_webhook.watermark").fetchone()
    return row[0] if row else None


def wait_backfill_runs(stack: AirflowStack, start: dt.datetime, end: dt.datetime, count: int) -> list[dict]:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        runs = [
            run
            for run in stack.runs(run_type="backfill")
            if start <= dt.datetime.fromisoformat(run["logical_date"]) <= end
        ]
        if len(runs) == count and all(run["state"] in ("success", "failed") for run in runs):
            stack.wait_backfills()
            return runs
        time.sleep(1)
    raise TimeoutError(f"backfill runs not finished: {stack.runs(run_type='backfill')}")


def post_cdr_index(stack: AirflowStack, run_id: str, cdr_id: str) -> dict:
    [ti] = [t for t in stack.task_instances(run_id) if t["rendered_map_index"] == cdr_id]
    return ti


def window_conf(start: dt.datetime, end: dt.datetime, **more) -> dict:
    return {"window_start": start.isoformat(), "window_end": end.isoformat(), **more}


def run_with_one_refused_cdr(stack, receiver, cdr_conn, start: dt.datetime) -> tuple[str, str, str, dict]:
    """Two CDRs in the hour from start, the receiver refusing one once (400): the run fails on it.

    Return the run id, the delivered CDR, the refused CDR and its failed post_cdr task instance.
    """
    dialer = Dialer(cdr_conn)
    good = dialer.cdr(created_at=start + dt.timedelta(minutes=1))
    refused = dialer.cdr(created_at=start + dt.timedelta(minutes=2))
    receiver.script(refused, [400])
    run_id = stack.trigger(conf=window_conf(start, start + HOUR))
    assert stack.wait_run(run_id) == "failed"
    ti = post_cdr_index(stack, run_id, refused)
    assert (ti["state"], ti["try_number"]) == ("failed", 1)
    return run_id, good, refused, ti


def assert_sent_again_once(stack, receiver, cdr_conn, run_id: str, good: str, refused: str) -> None:
    """After the refused CDR's task was cleared: sent once more, same webhook-id, the run succeeds."""
    deadline = time.monotonic() + 120
    while len(receiver.received(refused)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert stack.wait_run(run_id) == "success"
    requests = receiver.received(refused)
    assert [r.answered for r in requests] == [400, 200]
    assert {r.headers["webhook-id"] for r in requests} == {webhook_id(refused, "cdr_webhook")}
    assert len(receiver.received(good)) == 1
    assert post_cdr_index(stack, run_id, refused)["try_number"] == 2
    assert ledger(cdr_conn, [refused])[refused] == {
        "status": "delivered",
        "attempts": 2,
        "http_status": 200,
        "run_id": run_id,
    }


def test_backfill_delivers_exactly_the_missing_ones_then_the_failed_ones(deployment, cdr_conn):
    stack, receiver, _ = deployment
    start = hours(0)
    dialer = Dialer(cdr_conn)
    delivered = dialer.cdr(created_at=start + dt.timedelta(minutes=5))
    failed = dialer.cdr(created_at=start + dt.timedelta(minutes=10))
    never = [
        dialer.cdr(created_at=start + dt.timedelta(minutes=15)),
        dialer.cdr(created_at=start + dt.timedelta(minutes=75)),
    ]
    outside = dialer.cdr(created_at=start + 2 * HOUR + dt.timedelta(minutes=5))
    record(cdr_conn, delivered, "delivered")
    record(cdr_conn, failed, "failed", attempts=7)
    mark = watermark(cdr_conn)

    stack.airflow(
        "backfill", "create", "--dag-id", "cdr_webhook",
        "--from-date", start.isoformat(), "--to-date", (start + HOUR).isoformat(),
    )  # fmt: skip
    runs = wait_backfill_runs(stack, start, start + HOUR, count=2)

    assert {run["state"] for run in runs} == {"success"}
    assert sorted(r.cdr_id for r in receiver.received() if r.cdr_id in {*never, delivered, failed}) == sorted(
        never
    )
    assert ledger(cdr_conn, [failed])[failed]["status"] == "failed"
    assert outside not in ledger(cdr_conn, [outside])
    assert watermark(cdr_conn) == mark  # backfill runs never move it

    # The same range again with policy=failed: the existing runs are reprocessed with the new Params.
    stack.airflow(
        "backfill", "create", "--dag-id", "cdr_webhook",
        "--from-date", start.isoformat(), "--to-date", (start + HOUR).isoformat(),
        "--dag-run-conf", json.dumps({"policy": "failed"}), "--reprocess-behavior", "completed",
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not receiver.received(failed) and time.monotonic() < deadline:
        time.sleep(1)
    wait_backfill_runs(stack, start, start + HOUR, count=2)

    sent = Counter(r.cdr_id for r in receiver.received() if r.cdr_id in {*never, delivered, failed})
    assert sent == Counter({never[0]: 1, never[1]: 1, failed: 1})
    assert ledger(cdr_conn, [failed])[failed] | {"run_id": None} == {
        "status": "delivered",
        "attempts": 8,
        "http_status": 200,
        "run_id": None,
    }
    assert watermark(cdr_conn) == mark


def test_clearing_one_failed_task_resends_its_cdr_once_with_the_same_webhook_id(deployment, cdr_conn):
    stack, receiver, statsd = deployment
    run_id, good, refused, ti = run_with_one_refused_cdr(stack, receiver, cdr_conn, hours(3))

    # Monitoring: the grid names tasks by cdr_id; the failed try's log says what happened, first.
    assert {t["rendered_map_index"] for t in stack.task_instances(run_id) if t["task_id"] == "post_cdr"} == {
        good,
        refused,
    }
    # The DAG's failure notifier was told about the failed run.
    probe = stack.home / "notified.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and run_id not in (probe.read_text() if probe.exists() else ""):
        time.sleep(0.5)
    assert {"run_id": run_id} in [json.loads(line) for line in probe.read_text().splitlines()]
    ours = [line for line in stack.task_log(run_id, ti["map_index"]) if refused in line]
    assert ours[0].startswith(f"Sending CDR {refused} to endpoint cdr_webhook")
    assert f"CDR {refused} to endpoint cdr_webhook failed: HTTP 400, HTTP 400 Bad Request" in ours[1]

    stack.clear_mapped_task(run_id, ti["map_index"])
    assert_sent_again_once(stack, receiver, cdr_conn, run_id, good, refused)
    # Airflow's own metrics carry ours, tagged by endpoint.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any("cdr_webhook.failed" in line for line in statsd.lines):
        time.sleep(0.5)
    ours = [line for line in statsd.lines if "cdr_webhook." in line]
    assert any(line.startswith("airflow.cdr_webhook.delivered,endpoint=cdr_webhook:1|c") for line in ours), (
        ours
    )
    assert any(line.startswith("airflow.cdr_webhook.failed,endpoint=cdr_webhook:1|c") for line in ours), ours
    assert any(line.startswith("airflow.cdr_webhook.latency,endpoint=cdr_webhook:") for line in ours), ours


@pytest.mark.browser
def test_clearing_a_failed_task_from_the_ui(deployment, cdr_conn, browser):
    """The operator's path: the task's page in the UI, its log, the Clear button, Confirm."""
    from playwright.sync_api import expect

    stack, receiver, _ = deployment
    run_id, good, refused, ti = run_with_one_refused_cdr(stack, receiver, cdr_conn, hours(13))

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{stack.base}/dags/cdr_webhook/runs/{quote(run_id)}/tasks/post_cdr/mapped/{ti['map_index']}")
    # The page names the task by its cdr_id, and its log says what failed.
    expect(page.get_by_role("heading", name=f"post_cdr [{refused}]")).to_be_visible(timeout=30_000)
    expect(page.get_by_text(f"CDR {refused} to endpoint cdr_webhook failed: HTTP 400")).to_be_visible()

    page.get_by_role("button", name="Press shift+c to clear").click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_role("button", name="Affected Tasks: 1")).to_be_visible()
    expect(dialog.get_by_role("cell", name=str(ti["map_index"]), exact=True)).to_be_visible()
    dialog.get_by_role("button", name="Confirm").click()
    expect(dialog).to_be_hidden()

    assert_sent_again_once(stack, receiver, cdr_conn, run_id, good, refused)
    # The task's page now shows the delivered try.
    page.reload()
    delivered = page.get_by_text(f"CDR {refused} delivered to cdr_webhook: HTTP 200")
    expect(delivered).to_be_visible(timeout=30_000)


def test_clearing_failed_tasks_of_a_date_range_and_a_whole_run(deployment, cdr_conn):
    stack, receiver, _ = deployment
    start = hours(6)
    dialer = Dialer(cdr_conn)
    first = [dialer.cdr(created_at=start + dt.timedelta(minutes=m)) for m in (1, 2)]
    second = [dialer.cdr(created_at=start + HOUR + dt.timedelta(minutes=m)) for m in (1, 2)]
    receiver.script(first[1], [400])
    receiver.script(second[1], [400])
    run_ids = [
        stack.trigger(conf=window_conf(start, start + HOUR), logical_date=(start + 2 * HOUR).isoformat()),
        stack.trigger(
            conf=window_conf(start + HOUR, start + 2 * HOUR), logical_date=(start + 3 * HOUR).isoformat()
        ),
    ]
    assert [stack.wait_run(run_id) for run_id in run_ids] == ["failed", "failed"]

    # All failed post_cdr tasks of runs whose logical date falls in the range.
    stack.api(
        "POST",
        "/dags/cdr_webhook/clearTaskInstances",
        json={
            "dry_run": False,
            "only_failed": True,
            "task_ids": ["post_cdr"],
            "start_date": (start + 2 * HOUR).isoformat(),
            "end_date": (start + 3 * HOUR).isoformat(),
            "reset_dag_runs": True,
        },
    )
    assert [stack.wait_run(run_id) for run_id in run_ids] == ["success", "success"]
    assert Counter(r.cdr_id for r in receiver.received() if r.cdr_id in first + second) == Counter(
        {first[0]: 1, first[1]: 2, second[0]: 1, second[1]: 2}
    )

    # A whole run cleared: it maps again exactly what it had claimed, not what arrived since.
    late = dialer.cdr(created_at=start + dt.timedelta(minutes=30))
    stack.api(
        "POST",
        "/dags/cdr_webhook/clearTaskInstances",
        json={
            "dry_run": False,
            "dag_run_id": run_ids[0],
            "task_ids": ["select_cdrs"],
            "include_downstream": True,
            "only_failed": False,  # the API's default is True: a successful task would not be cleared
            "reset_dag_runs": True,
        },
    )
    assert stack.wait_run(run_ids[0]) == "success"
    mapped = {t["rendered_map_index"] for t in stack.task_instances(run_ids[0]) if t["task_id"] == "post_cdr"}
    assert mapped == set(first)
    assert late not in {r.cdr_id for r in receiver.received()}
    assert Counter(r.cdr_id for r in receiver.received() if r.cdr_id in first) == Counter(
        {first[0]: 2, first[1]: 3}
    )


def test_redelivery_from_the_trigger_form(deployment, cdr_conn):
    stack, receiver, _ = deployment
    start = hours(10)
    dialer = Dialer(cdr_conn)
    mine = [dialer.cdr(client_id=8, created_at=start + dt.timedelta(minutes=m)) for m in (1, 2)]
    other = dialer.cdr(client_id=9, created_at=start + dt.timedelta(minutes=3))
    for cdr in (*mine, other):
        record(cdr_conn, cdr, "delivered")

    run_id = stack.trigger(conf=window_conf(start, start + HOUR, client_id=8, policy="all"))
    assert stack.wait_run(run_id) == "success"
    assert sorted(r.cdr_id for r in receiver.received() if r.cdr_id in (*mine, other)) == sorted(mine)

    # Params are validated when the run is triggered: a bad one is refused, saying why.
    refused = stack.api(
        "POST",
        "/dags/cdr_webhook/dagRuns",
        expect=400,
        json={"logical_date": None, "conf": {"policy": "everything"}},
    )
    assert "everything" in json.dumps(refused)
    refused = stack.api(
        "POST",
        "/dags/cdr_webhook/dagRuns",
        expect=400,
        json={"logical_date": None, "conf": {"window_start": "yesterday", "window_end": "today"}},
    )
    assert "yesterday" in json.dumps(refused)
    # Rules that tie Params together are checked by select_cdrs: the run fails, its log says why.
    run_id = stack.trigger(conf=window_conf(start + HOUR, start))
    assert stack.wait_run(run_id) == "failed"
    log = stack.api(
        "GET",
        f"/dags/cdr_webhook/dagRuns/{run_id}/taskInstances/select_cdrs/logs/1",
        params={"full_content": True},
        headers={"accept": "application/json"},
    )
    assert "must be after window_start" in json.dumps(log)
