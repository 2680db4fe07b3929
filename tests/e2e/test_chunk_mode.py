"""Chunk mode (``cdrs_per_task`` = 5) against a real scheduler: chunks, a partial failure, a clear.

One Airflow deployment (hourly schedule, so scheduled runs stay out of the way) serves the module;
each test works in an hour of its own, two days back.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter

import pytest

from cdr_webhook.signing import webhook_id
from demo.dialer import Dialer

pytestmark = [pytest.mark.e2e, pytest.mark.scheduler]

HOUR = dt.timedelta(hours=1)
BASE = (dt.datetime.now(dt.UTC) - dt.timedelta(days=2)).replace(minute=0, second=0, microsecond=0)


@pytest.fixture(scope="module")
def deployment(deploy):
    with deploy(
        "airflow-chunks",
        {
            # The triggerer runs, the commit watcher does not: these tests start their runs by hand.
            "AIRFLOW__CDR_WEBHOOK__WATCH_INTERVAL_SECONDS": "0",
            "AIRFLOW__CDR_WEBHOOK__SCHEDULE": "0 * * * *",
            "AIRFLOW__CDR_WEBHOOK__CDRS_PER_TASK": "5",
            "AIRFLOW__CDR_WEBHOOK__MAX_CDRS_PER_RUN": "20",
            "AIRFLOW__CDR_WEBHOOK__RETRY_DELAY_SECONDS": "1",
            "AIRFLOW__CDR_WEBHOOK__MAX_RETRY_DELAY_SECONDS": "2",
        },
    ) as (stack, receiver):
        yield stack, receiver


def ledger(conn, cdr_ids) -> dict[str, tuple[str, int]]:
    rows = conn.execute(
        "SELECT cdr_id, status, attempts FROM cdr_webhook.delivery WHERE cdr_id = ANY(%s)", (list(cdr_ids),)
    ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def test_chunks_deliver_a_refused_cdr_fails_alone_and_a_clear_resends_only_it(deployment, cdr_conn):
    stack, receiver = deployment
    start = BASE
    dialer = Dialer(cdr_conn)
    cdrs = [dialer.cdr(created_at=start + dt.timedelta(minutes=1 + i)) for i in range(12)]
    refused, flaky = cdrs[6], cdrs[2]
    receiver.script(refused, [400])
    receiver.script(flaky, [503])

    run_id = stack.trigger(conf={"window_start": start.isoformat(), "window_end": (start + HOUR).isoformat()})
    assert stack.wait_run(run_id, timeout=180) == "failed"

    # The grid names each chunk by its first cdr_id and its size: 12 CDRs in chunks of 5.
    tasks = {t["rendered_map_index"]: t for t in stack.task_instances(run_id) if t["task_id"] == "post_cdr"}
    assert set(tasks) == {f"{cdrs[0]} (5 CDRs)", f"{cdrs[5]} (5 CDRs)", f"{cdrs[10]} (2 CDRs)"}
    first, second, third = (tasks[f"{cdrs[i]} ({n} CDRs)"] for i, n in ((0, 5), (5, 5), (10, 2)))
    assert (first["state"], first["try_number"]) == ("success", 2)  # the 503 was retried, alone
    assert (second["state"], second["try_number"]) == ("failed", 1)  # the 400: no retry can help
    assert third["state"] == "success"
    assert ledger(cdr_conn, cdrs) == {
        **{cdr: ("delivered", 1) for cdr in cdrs},
        flaky: ("delivered", 2),
        refused: ("failed", 1),
    }
    assert Counter(r.cdr_id for r in receiver.received() if r.cdr_id in cdrs) == Counter([*cdrs, flaky])
    # The failed chunk's log: a line per CDR, and the task's failure naming the refused one.
    log = stack.task_log(run_id, second["map_index"])
    for cdr in cdrs[5:10]:
        assert any(line.startswith(f"CDR {cdr} ") for line in log), log
    assert any(f"CDR {refused} to endpoint cdr_webhook failed: HTTP 400" in line for line in log)
    assert any("Chunk of 5 CDR(s) to cdr_webhook, try 1: 4 delivered" in line for line in log), log

    stack.clear_mapped_task(run_id, second["map_index"])
    deadline = time.monotonic() + 120
    while len(receiver.received(refused)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert stack.wait_run(run_id) == "success"
    assert ledger(cdr_conn, [refused]) == {refused: ("delivered", 2)}
    # Only the undelivered CDR went again, with its one webhook-id; its neighbours were not re-sent.
    assert Counter(r.cdr_id for r in receiver.received() if r.cdr_id in cdrs) == Counter(
        [*cdrs, flaky, refused]
    )
    assert {r.headers["webhook-id"] for r in receiver.received(refused)} == {
        webhook_id(refused, "cdr_webhook")
    }


def test_a_run_above_the_cap_maps_at_most_max_cdrs_per_run_in_chunks(deployment, cdr_conn):
    stack, receiver = deployment
    start = BASE + 2 * HOUR
    dialer = Dialer(cdr_conn)
    with cdr_conn.transaction():
        cdrs = [dialer.cdr(created_at=start + dt.timedelta(seconds=10 + i)) for i in range(23)]

    run_id = stack.trigger(conf={"window_start": start.isoformat(), "window_end": (start + HOUR).isoformat()})
    assert stack.wait_run(run_id, timeout=180) == "success"

    names = sorted(
        t["rendered_map_index"] for t in stack.task_instances(run_id) if t["task_id"] == "post_cdr"
    )
    assert names == sorted(f"{cdrs[i]} (5 CDRs)" for i in (0, 5, 10, 15))  # 20: the oldest, in 4 chunks
    statuses = ledger(cdr_conn, cdrs)
    assert [statuses[cdr][0] for cdr in cdrs] == ["delivered"] * 20 + ["queued"] * 3  # wait for the next run
