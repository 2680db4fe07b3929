"""Scheduled delivery against a real scheduler: new CDRs, late commits, and a burst above the cap.

The deployment has no triggerer (the commit watcher cannot run, though it is configured): the
schedule alone delivers everything, as it does when a triggerer is down.
"""

from __future__ import annotations

import time
from collections import Counter

import psycopg
import pytest

from demo.dialer import Dialer

pytestmark = [pytest.mark.e2e, pytest.mark.scheduler]


@pytest.fixture(scope="module")
def deployment(deploy):
    with deploy(
        "airflow-scheduled",
        {
            "AIRFLOW__CDR_WEBHOOK__SCHEDULE": "10s",
            "AIRFLOW__CDR_WEBHOOK__LAG_SECONDS": "30",
            "AIRFLOW__CDR_WEBHOOK__MAX_CDRS_PER_RUN": "4",
            "AIRFLOW__CDR_WEBHOOK__RETRY_DELAY_SECONDS": "1",
            "AIRFLOW__CDR_WEBHOOK__MAX_RETRY_DELAY_SECONDS": "2",
        },
        triggerer=False,
    ) as (stack, receiver):
        yield stack, receiver


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(what)


def owners(conn, cdr_ids) -> dict[str, str]:
    rows = conn.execute(
        "SELECT cdr_id, run_id FROM cdr_webhook.delivery WHERE cdr_id = ANY(%s) AND status = 'delivered'",
        (list(cdr_ids),),
    ).fetchall()
    return dict(rows)


def test_cdrs_inserted_while_it_runs_are_delivered_by_the_following_runs(deployment, cdr_conn):
    stack, receiver = deployment
    cdrs = [Dialer(cdr_conn).cdr() for _ in range(3)]

    delivered = wait_for(lambda: len(owners(cdr_conn, cdrs)) == 3 and owners(cdr_conn, cdrs), 90, "delivery")

    assert all(run_id.startswith("scheduled__") for run_id in delivered.values())
    assert sorted(r.cdr_id for r in receiver.received() if r.cdr_id in cdrs) == sorted(cdrs)


def test_a_late_commit_with_an_earlier_created_at_is_still_delivered(deployment, cdr_conn, cdr_dsn):
    stack, receiver = deployment
    with psycopg.connect(cdr_dsn) as late_conn:  # one open transaction: the CDR is invisible for now
        cdr = Dialer(late_conn).cdr()
        created_at = late_conn.execute("SELECT created_at FROM dialer.cdr WHERE id = %s", (cdr,)).fetchone()[
            0
        ]
        wait_for(
            lambda: (
                (cdr_conn.execute("SELECT created_at FROM cdr_webhook.watermark").fetchone() or [None])[0]
                and cdr_conn.execute("SELECT created_at FROM cdr_webhook.watermark").fetchone()[0]
                > created_at
            ),
            60,
            "the watermark to pass the uncommitted CDR",
        )
        late_conn.commit()

    delivered = wait_for(lambda: owners(cdr_conn, [cdr]), 60, "the late CDR to be delivered")
    assert delivered[cdr].startswith("scheduled__")
    assert [r.cdr_id for r in receiver.received(cdr)] == [cdr]


def test_a_burst_above_the_cap_drains_over_the_next_runs(deployment, cdr_conn):
    stack, receiver = deployment
    dialer = Dialer(cdr_conn)
    with cdr_conn.transaction():
        cdrs = [dialer.cdr() for _ in range(10)]

    delivered = wait_for(
        lambda: len(owners(cdr_conn, cdrs)) == 10 and owners(cdr_conn, cdrs), 120, "the burst"
    )

    per_run = Counter(delivered.values())
    assert len(per_run) >= 3
    assert max(per_run.values()) <= 4
    assert Counter(r.cdr_id for r in receiver.received() if r.cdr_id in cdrs) == Counter(cdrs)
