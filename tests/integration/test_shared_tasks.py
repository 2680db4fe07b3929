"""A task of many endpoints (``cdrs_per_task`` auto, a run of more than ``chunk_above`` CDRs): each
endpoint keeps its own key, signature, slots and outcome, and a slow or failing one stalls none of
the others in the task; a retry and a clear send only the CDRs not delivered."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from airflow.sdk.exceptions import AirflowFailException

from cdr_webhook.adapters import load_settings
from cdr_webhook.deliver.lane import STOP_AFTER_LIMITS
from cdr_webhook.deliver.operator import CdrWebhookOperator, RetryLater
from cdr_webhook.settings import AUTO_SIZED
from cdr_webhook.signing import webhook_id
from demo.connections import http_conn
from demo.dialer import Dialer
from demo.receiver import Receiver
from tests.support.task_instances import SECRET, FakeTaskInstance

NOW = dt.datetime.now(dt.UTC)
HEALTHY, DOWN, SLOW = "cdr_webhook_client_1", "cdr_webhook_client_2", "cdr_webhook_client_3"
KEYS = {HEALTHY: "key-healthy-0001", DOWN: "key-down-0002", SLOW: "key-slow-0003"}
SLOW_MS = 1500


@pytest.fixture
def receivers(monkeypatch, settings_env):
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__ALLOWED_NETWORKS", "127.0.0.1/32")
    load_settings.cache_clear()
    with Receiver(secret=SECRET) as fast, Receiver(secret=SECRET, delay_ms=SLOW_MS) as slow:
        for endpoint, server in ((HEALTHY, fast), (DOWN, fast), (SLOW, slow)):
            url = f"{server.url}/{endpoint}"
            monkeypatch.setenv(
                f"AIRFLOW_CONN_{endpoint.upper()}",
                http_conn(url, api_key=KEYS[endpoint], signing_secret=SECRET),
            )
        yield fast, slow


def claimed(conn, endpoint: str, client_id: int, n: int, offset: int = 0) -> list[str]:
    """``n`` CDRs of the client, queued for ``endpoint`` and claimed by run scheduled__1."""
    dialer = Dialer(conn)
    made = []
    for i in range(n):
        created = NOW - dt.timedelta(minutes=30) + dt.timedelta(seconds=offset + i)
        cdr = dialer.cdr(created_at=created, client_id=client_id)
        conn.execute(
            "INSERT INTO cdr_webhook.delivery (cdr_id, endpoint, client_id, cdr_created_at, status, dag_id, "
            "run_id, claimed_at) SELECT cdr_id, %s, client_id, created_at, 'queued', 'cdr_webhook', "
            "'scheduled__1', now() FROM cdr_webhook_source WHERE cdr_id::text = %s",
            (endpoint, cdr),
        )
        made.append(cdr)
    return made


def run_task(groups: dict[str, list[str]], ti: FakeTaskInstance) -> None:
    operator = CdrWebhookOperator(
        task_id="post_cdr",
        cdr_ids=[cdr for ids in groups.values() for cdr in ids],
        http_conn_id=next(iter(groups)),
        endpoints=[[endpoint, len(ids)] for endpoint, ids in groups.items()],
        cdrs_per_task=AUTO_SIZED,
        retries=2,
    )
    operator.execute({"ti": ti})


def status_of(conn, cdr_ids: list[str]) -> dict[str, tuple[str, int]]:
    rows = conn.execute(
        "SELECT cdr_id, status, attempts FROM cdr_webhook.delivery WHERE cdr_id = ANY(%s)", (cdr_ids,)
    ).fetchall()
    return {cdr: (status, attempts) for cdr, status, attempts in rows}


def test_each_endpoint_keeps_its_own_rules_and_a_failing_or_slow_one_stalls_none_of_the_others(db, receivers):
    fast, slow = receivers
    healthy = claimed(db, HEALTHY, 1, 6)
    down = claimed(db, DOWN, 2, 3, offset=100)
    slowed = claimed(db, SLOW, 3, 2, offset=200)
    for cdr in down:
        fast.script(cdr, [503])
    groups = {HEALTHY: healthy, DOWN: down, SLOW: slowed}
    began = time.time()

    with pytest.raises(RetryLater, match=r"3 CDR\(s\) of this chunk to retry"):
        run_task(groups, FakeTaskInstance(try_number=1, max_tries=2))

    # Every CDR to its own endpoint's URL, with its own key and its own webhook-id, signed.
    for endpoint, ids in groups.items():
        server = slow if endpoint == SLOW else fast
        for cdr in ids:
            [post] = server.received(cdr)
            assert post.path.endswith(f"/{endpoint}")
            assert post.headers["x-api-key"] == KEYS[endpoint]
            assert post.headers["webhook-id"] == webhook_id(cdr, endpoint)
            assert post.signature_ok
    # The healthy endpoint's CDRs went out at once, not after the slow endpoint's answers.
    assert max(fast.received(cdr)[0].at for cdr in healthy) - began < SLOW_MS / 1000
    assert status_of(db, healthy + slowed) == {cdr: ("delivered", 1) for cdr in healthy + slowed}
    assert status_of(db, down) == {cdr: ("queued", 1) for cdr in down}

    # The retry sends only the failing endpoint's CDRs; they land this time.
    run_task(groups, FakeTaskInstance(try_number=2, max_tries=2))
    assert status_of(db, down) == {cdr: ("delivered", 2) for cdr in down}
    assert sum(len(fast.received(cdr)) for cdr in healthy) == len(healthy)
    assert sum(len(slow.received(cdr)) for cdr in slowed) == len(slowed)


def test_a_thread_goes_on_with_its_lane_only_while_no_other_lane_waits_for_one(db, receivers, monkeypatch):
    """With fewer threads than lanes, a thread whose POST was delivered gives its turn to a lane
    waiting for a thread instead of taking its own lane's next CDR: the lanes take turns."""
    from cdr_webhook.deliver import lanes

    monkeypatch.setattr(lanes, "MAX_THREADS", 2)
    fast, _ = receivers
    fast.delay_ms = 20
    groups = {HEALTHY: claimed(db, HEALTHY, 1, 6), DOWN: claimed(db, DOWN, 2, 6, offset=100)}
    third = "cdr_webhook_client_4"
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{third.upper()}",
        http_conn(f"{fast.url}/{third}", api_key="key-third-0004", signing_secret=SECRET),
    )
    groups[third] = claimed(db, third, 4, 6, offset=200)

    run_task(groups, FakeTaskInstance(try_number=1, max_tries=2))

    order = [post.path.rsplit("/", 1)[-1] for post in sorted(fast.received(), key=lambda post: post.at)]
    assert sorted(order) == sorted(endpoint for endpoint, ids in groups.items() for _ in ids)
    # Every lane had its first POST before any lane had its third: no thread kept its lane.
    first = {endpoint: order.index(endpoint) for endpoint in groups}
    third_post = min(
        [i for i, endpoint in enumerate(order) if order[: i + 1].count(endpoint) == 3], default=len(order)
    )
    assert max(first.values()) < third_post, order
    all_ids = [cdr for ids in groups.values() for cdr in ids]
    assert status_of(db, all_ids) == {cdr: ("delivered", 1) for cdr in all_ids}


def test_a_cleared_task_of_many_endpoints_sends_again_only_what_is_not_delivered(db, receivers):
    fast, _ = receivers
    healthy = claimed(db, HEALTHY, 1, 4)
    refused = claimed(db, DOWN, 2, 2, offset=100)
    for cdr in refused:
        fast.script(cdr, [400])
    groups = {HEALTHY: healthy, DOWN: refused}

    with pytest.raises(AirflowFailException, match=r"2 CDR\(s\) of this chunk failed for good"):
        run_task(groups, FakeTaskInstance(try_number=1, max_tries=2))
    assert status_of(db, refused) == {cdr: ("failed", 1) for cdr in refused}

    # Cleared (Airflow sets max_tries to try_number + retries): the failed CDRs go again, the
    # delivered ones do not.
    run_task(groups, FakeTaskInstance(try_number=2, max_tries=1 + 2))
    assert status_of(db, refused) == {cdr: ("delivered", 2) for cdr in refused}
    assert all(len(fast.received(cdr)) == 1 for cdr in healthy)


def test_a_dead_endpoints_lane_stops_after_twice_its_limit_and_its_other_cdrs_wait_unsent(
    db, receivers, settings_env
):
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__MAX_IN_FLIGHT_PER_ENDPOINT", "2")
    load_settings.cache_clear()
    fast, _ = receivers
    dead = claimed(db, DOWN, 2, 40)
    healthy = claimed(db, HEALTHY, 1, 3, offset=100)
    for cdr in dead:
        fast.script(cdr, [503])

    with pytest.raises(RetryLater, match=f"endpoint\\(s\\) not sent to in this try: {DOWN}"):
        run_task({DOWN: dead, HEALTHY: healthy}, FakeTaskInstance(try_number=1, max_tries=2))

    tried = [cdr for cdr in dead if fast.received(cdr)]
    # POSTs already in flight when the lane stops still land: at most its limit more.
    assert STOP_AFTER_LIMITS * 2 <= len(tried) <= STOP_AFTER_LIMITS * 2 + 2
    assert status_of(db, healthy) == {cdr: ("delivered", 1) for cdr in healthy}
    untried = [cdr for cdr in dead if cdr not in tried]
    assert status_of(db, untried) == {cdr: ("queued", 0) for cdr in untried}  # kept for the retry


def test_a_dead_endpoint_failing_every_attempt_for_pause_after_minutes_is_paused_mid_task(db, receivers):
    from cdr_webhook.ledger import endpoints

    fast, _ = receivers
    dead = claimed(db, DOWN, 2, 30)
    healthy = claimed(db, HEALTHY, 1, 2, offset=100)
    for cdr in dead:
        fast.script(cdr, [503])
    # Its attempts have failed for 31 minutes already (the first try of an earlier run, say).
    db.execute(
        "INSERT INTO cdr_webhook.endpoint_state (endpoint, failed_attempts, attempts_failing_since) "
        "VALUES (%s, 3, now() - interval '31 minutes')",
        (DOWN,),
    )

    with pytest.raises(RetryLater):
        run_task({DOWN: dead, HEALTHY: healthy}, FakeTaskInstance(try_number=1, max_tries=2))

    assert endpoints.is_paused(db, DOWN)
    reason = db.execute(
        "SELECT reason FROM cdr_webhook.endpoint_state WHERE endpoint = %s", (DOWN,)
    ).fetchone()[0]
    assert reason.startswith("every attempt failed for 31 min, retries included")
    # Its first outcomes paused it: the rest of its CDRs were not sent and wait queued (the task's
    # retry finds the endpoint paused and gives them back to the queue); the healthy endpoint's went out.
    sent = [cdr for cdr in dead if fast.received(cdr)]
    assert len(sent) < len(dead)
    assert status_of(db, healthy) == {cdr: ("delivered", 1) for cdr in healthy}
    unsent = db.execute(
        "SELECT count(*) FROM cdr_webhook.delivery "
        "WHERE endpoint = %s AND status = 'queued' AND attempts = 0",
        (DOWN,),
    ).fetchone()[0]
    assert unsent == len(dead) - len(sent)
