"""Event-driven pick-up through a real Airflow with a real triggerer: a commit starts a run in seconds.

The schedule is hourly, so a CDR delivered within seconds was delivered by a run the commit watcher
started (run type ``asset_triggered``). Airflow's two traps of event-driven scheduling are covered:
events while the DAG is paused (apache/airflow#49857) and events while ``max_active_runs`` is reached
(#56050) must strand no CDR. One deployment (``max_active_runs`` 1) for the module: each start of a
real Airflow costs ~20 s here.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest

from cdr_webhook.ledger import watch_health as health
from demo.connections import http_conn
from demo.dialer import Dialer
from demo.receiver import Receiver
from tests.support.deployments import API_KEY, wait_for_watcher

if TYPE_CHECKING:
    import datetime as dt

    from demo.stack import AirflowStack

pytestmark = [pytest.mark.e2e, pytest.mark.scheduler]

SLOW_CLIENT = 9
SLOW_MS = 8000


@pytest.fixture(scope="module")
def deployment(deploy):
    slow = Receiver(api_key=API_KEY, delay_ms=SLOW_MS).start()
    with deploy(
        "airflow-events",
        {
            f"AIRFLOW_CONN_CDR_WEBHOOK_CLIENT_{SLOW_CLIENT}": http_conn(slow.url, api_key=API_KEY),
            "AIRFLOW__CDR_WEBHOOK__SCHEDULE": "0 * * * *",  # hourly: every delivery here is event-started
            "AIRFLOW__CDR_WEBHOOK__MAX_ACTIVE_RUNS": "1",
        },
        slow,
    ) as (stack, receiver):
        yield stack, receiver, slow


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(what)


def delivered(conn, cdr_ids) -> dict[str, str]:
    rows = conn.execute(
        "SELECT cdr_id, run_id FROM cdr_webhook.delivery WHERE cdr_id = ANY(%s) AND status = 'delivered'",
        (list(cdr_ids),),
    ).fetchall()
    return dict(rows)


def run_types(stack: AirflowStack, run_ids) -> set[str]:
    return {run["run_type"] for run in stack.runs() if run["dag_run_id"] in set(run_ids)}


def test_a_commit_is_delivered_by_a_run_the_watcher_starts_within_seconds(deployment, cdr_conn):
    stack, receiver, _ = deployment
    wait_for_watcher(stack)
    began = time.time()
    cdr = Dialer(cdr_conn).cdr()

    owner = wait_for(lambda: delivered(cdr_conn, [cdr]), 40, "the event-started delivery")[cdr]

    posts = receiver.received(cdr)
    assert len(posts) == 1
    assert posts[0].at - began < 20  # an hourly schedule: only an event can have sent it this soon
    assert run_types(stack, [owner]) == {"asset_triggered"}
    # Idle again: no run is started without a commit.
    runs_before = len(stack.runs())
    time.sleep(5)
    assert len(stack.runs()) == runs_before
    # The watcher in the real triggerer records its heartbeat where the page and the CLI read it.
    recorded = health.read(cdr_conn, "cdr_webhook_source")
    assert recorded.state == "watching"
    assert health.assess(recorded, interval_seconds=1.0).ok


def test_commits_while_the_dag_is_paused_are_delivered_after_unpausing(deployment, cdr_conn):
    stack, receiver, _ = deployment
    stack.api("PATCH", "/dags/cdr_webhook", json={"is_paused": True})
    try:
        dialer = Dialer(cdr_conn)
        cdrs = [dialer.cdr() for _ in range(3)]
        time.sleep(4)  # the watcher does not run while the DAG is paused (#49857): nothing starts
        assert not delivered(cdr_conn, cdrs)
    finally:
        stack.unpause()

    owners = wait_for(lambda: len(delivered(cdr_conn, cdrs)) == 3 and delivered(cdr_conn, cdrs), 60, "3")
    assert run_types(stack, owners.values()) == {"asset_triggered"}
    assert sorted(r.cdr_id for r in receiver.received() if r.cdr_id in cdrs) == sorted(cdrs)


def test_commits_while_max_active_runs_is_reached_are_delivered_by_a_later_run(deployment, cdr_conn):
    stack, receiver, slow = deployment
    dialer = Dialer(cdr_conn)
    held = dialer.cdr(client_id=SLOW_CLIENT)  # its POST takes 8 s: its run holds the only run slot
    wait_for(lambda: slow.received(held), 40, "the slow run to POST")
    cdrs = []
    for _ in range(3):  # events while the one active run is busy (#56050)
        cdrs.append(dialer.cdr())
        time.sleep(1)
    assert not delivered(cdr_conn, cdrs)

    owners = wait_for(lambda: len(delivered(cdr_conn, cdrs)) == 3 and delivered(cdr_conn, cdrs), 90, "3")
    assert run_types(stack, owners.values()) == {"asset_triggered"}
    assert sorted(r.cdr_id for r in receiver.received() if r.cdr_id in cdrs) == sorted(cdrs)


def runs_since(stack: AirflowStack, since: dt.datetime) -> list[dict[str, Any]]:
    """The runs created (``run_after``) since ``since``: every run the watcher or the schedule asked for."""
    query = {"run_after_gte": since.isoformat(), "limit": 100}
    return stack.api("GET", "/dags/cdr_webhook/dagRuns", params=query)["dag_runs"]


def db_clock(conn) -> dt.datetime:
    return conn.execute("SELECT clock_timestamp()").fetchone()[0]


def test_the_watcher_survives_an_infinity_row_and_idles_past_a_future_created_at(deployment, cdr_conn):
    stack, receiver, _ = deployment
    wait_for_watcher(stack)
    dialer = Dialer(cdr_conn)
    odd = [dialer.cdr(), dialer.cdr()]
    future = 20  # seconds ahead of the database's clock
    cdr_conn.execute("UPDATE dialer.cdr SET created_at = 'infinity' WHERE id = %s", (odd[0],))
    cdr_conn.execute(
        "UPDATE dialer.cdr SET created_at = clock_timestamp() + make_interval(secs => %s) WHERE id = %s",
        (future, odd[1]),
    )
    try:
        # The watcher still fires for the next commit (an 'infinity' created_at stopped it for good).
        cdr = dialer.cdr()
        owner = wait_for(lambda: delivered(cdr_conn, [cdr]), 40, "the event-started delivery")[cdr]
        assert run_types(stack, [owner]) == {"asset_triggered"}

        # An idle minute: the row dated ahead makes one run when its time comes (it is delivered then),
        # not one every 15 s; the hourly schedule may add one. At most two runs.
        began = db_clock(cdr_conn)
        time.sleep(60)
        assert len(runs_since(stack, began)) <= 2
        assert delivered(cdr_conn, [odd[1]])
        assert not delivered(cdr_conn, [odd[0]])  # 'infinity' is never reached by a scan
        assert len(receiver.received(cdr)) == 1
    finally:
        cdr_conn.execute("DELETE FROM dialer.cdr WHERE id = ANY(%s)", (odd,))


def test_a_failing_source_view_starts_no_run_per_commit_and_delivers_once_corrected(deployment, cdr_conn):
    from tests.integration.test_source_check import FAILING_CAST, replace_view

    stack, _, _ = deployment
    wait_for_watcher(stack)
    dialer = Dialer(cdr_conn)
    began = db_clock(cdr_conn)
    cdrs = [dialer.cdr(cost=Decimal("0"))]  # the row the broken view's cast fails on
    replace_view(cdr_conn, *FAILING_CAST)
    try:
        for _ in range(20):  # a commit a second: a run per commit would be 20 failing runs
            cdrs.append(dialer.cdr())
            time.sleep(1)
        # The schedule (hourly here) makes at most one run per interval; the watcher none.
        assert len(runs_since(stack, began)) <= 1
        assert "the source check fails, so every run would fail at it" in stack.log_tail("triggerer", 200_000)
        assert health.read(cdr_conn, "cdr_webhook_source").state == "source_failing"  # the page's banner
    finally:
        replace_view(cdr_conn, FAILING_CAST[0], FAILING_CAST[0])  # corrected: the reference view again

    # Corrected, the watcher's next check passes (within 30 s) and its run delivers every CDR.
    owners = wait_for(
        lambda: len(delivered(cdr_conn, cdrs)) == len(cdrs) and delivered(cdr_conn, cdrs), 60, "all"
    )
    assert run_types(stack, owners.values()) == {"asset_triggered"}
