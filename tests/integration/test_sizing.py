"""The run sizes its tasks (``cdrs_per_task`` auto, the default): the select step's mapping on real
PostgreSQL, and a clear of it. The tasks it makes are played in test_chunk.py."""

from __future__ import annotations

import dataclasses
import datetime as dt

from cdr_webhook.selection.step import RunInfo, claim_cdrs
from cdr_webhook.settings import AUTO_SIZED, Settings
from demo.dialer import Dialer
from tests.support.endpoint_configs import configs

T0 = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)
SETTINGS = Settings(lag_seconds=60, start_from=T0 - dt.timedelta(hours=1), reconcile_hours=0)
CONNECTIONS = configs({"cdr_webhook": {}, "cdr_webhook_client_7": {}})


def select(conn, settings: Settings = SETTINGS, run: int = 1, **kwargs) -> list[dict]:
    info = RunInfo(
        "cdr_webhook", f"scheduled__{run}", "scheduled", T0 + (run - 1) * MINUTE, T0 + run * MINUTE, {}
    )
    return claim_cdrs(conn, info, settings, now=T0 + run * MINUTE + MINUTE, connections=CONNECTIONS, **kwargs)


def make(conn, n: int, client_id: int) -> list[str]:
    dialer = Dialer(conn)
    return [
        dialer.cdr(
            client_id=client_id, created_at=T0 - dt.timedelta(minutes=30) + dt.timedelta(milliseconds=i)
        )
        for i in range(n)
    ]


def test_the_default_is_auto_a_run_of_up_to_chunk_above_cdrs_is_a_task_each(cdr_db):
    assert Settings().cdrs_per_task == AUTO_SIZED
    quiet, other = make(cdr_db, 3, client_id=7), make(cdr_db, 13, client_id=1)

    mapped = select(cdr_db, task_slots=8)

    assert sorted(item["cdr_ids"][0] for item in mapped) == sorted(quiet + other)
    assert all(len(item["cdr_ids"]) == 1 and "endpoints" not in item for item in mapped)


def test_a_bigger_run_shares_few_tasks_a_large_share_split_the_small_one_riding_along(cdr_db):
    busy, quiet = make(cdr_db, 200, client_id=1), make(cdr_db, 3, client_id=7)

    mapped = select(cdr_db, task_slots=8)

    assert len(mapped) == 8  # the run's 8 task slots
    per_task = [item.get("endpoints") or [[item["http_conn_id"], len(item["cdr_ids"])]] for item in mapped]
    assert sorted(n for task in per_task for endpoint, n in task if endpoint == "cdr_webhook") == [25] * 8
    # The quiet endpoint's 3 CDRs ride whole in one task, beside a piece of the busy one.
    [shared] = [item for item in mapped if "endpoints" in item]
    assert sorted(shared["endpoints"]) == [["cdr_webhook", 25], ["cdr_webhook_client_7", 3]]
    assert [c for c in shared["cdr_ids"] if c in quiet] == quiet
    assert sorted(c for item in mapped for c in item["cdr_ids"]) == sorted(busy + quiet)
    # Chunks side by side send the oldest first: the busy endpoint's CDRs are dealt in turn.
    [oldest] = [item for item in mapped if busy[0] in item["cdr_ids"]]
    assert [c for c in oldest["cdr_ids"] if c in busy][:2] == [busy[0], busy[8]]


def test_the_task_slots_are_the_smaller_of_max_active_posts_per_run_and_parallelism(cdr_db):
    make(cdr_db, 200, client_id=1)
    settings = dataclasses.replace(SETTINGS, max_active_posts_per_run=2)

    assert [len(item["cdr_ids"]) for item in select(cdr_db, settings, task_slots=8)] == [100, 100]


def test_a_run_in_chunks_carries_far_more_than_the_fixed_cap_of_500(cdr_db):
    made = make(cdr_db, 1200, client_id=1)

    auto = select(cdr_db, task_slots=8)

    assert sum(len(item["cdr_ids"]) for item in auto) == len(made)  # one run, not three
    assert len(auto) == 8


def test_a_fixed_cdrs_per_task_of_1_keeps_a_task_per_cdr_and_the_cap(cdr_db):
    make(cdr_db, 600, client_id=1)
    settings = dataclasses.replace(SETTINGS, cdrs_per_task=1)

    mapped = select(cdr_db, settings, cdrs_per_task=1)

    assert len(mapped) == 500
    assert all(len(item["cdr_ids"]) == 1 for item in mapped)


def test_a_cleared_select_step_maps_the_same_cdrs_again(cdr_db):
    make(cdr_db, 100, client_id=1)
    first = select(cdr_db, task_slots=8)

    again = select(cdr_db, task_slots=8)

    assert sorted(sorted(item["cdr_ids"]) for item in again) == sorted(
        sorted(item["cdr_ids"]) for item in first
    )
