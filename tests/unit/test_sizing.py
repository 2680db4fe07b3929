"""The run sizes its tasks: a task per CDR for a small run, a few tasks carrying many endpoints beyond."""

from __future__ import annotations

import dataclasses

from cdr_webhook.selection.sizing import Sizing, plan


@dataclasses.dataclass(frozen=True)
class Claim:
    cdr_id: str
    endpoint: str


def claims(**per_endpoint: int) -> list[Claim]:
    """Round robin, as the ledger hands them out: each endpoint's oldest first, in turn."""
    queues = {
        endpoint: [Claim(f"{endpoint}-{i:05d}", endpoint) for i in range(n)]
        for endpoint, n in per_endpoint.items()
    }
    out = []
    while any(queues.values()):
        for queue in queues.values():
            if queue:
                out.append(queue.pop(0))
    return out


def sizing(chunk_above: int = 16, task_slots: int = 8, in_flight: dict[str, int] | None = None) -> Sizing:
    """The run's rule; every endpoint's in-flight limit 8 unless ``in_flight`` names it."""
    return Sizing(chunk_above, task_slots, lambda endpoint: (in_flight or {}).get(endpoint, 8))


def endpoints_of(task) -> set[str]:
    return {claim.endpoint for claim in task}


def test_a_run_of_up_to_chunk_above_cdrs_is_a_task_per_cdr():
    run = claims(a=3, b=13)

    tasks, surplus = plan(run, sizing())

    assert tasks == [[claim] for claim in run]
    assert surplus == []


def test_spread_traffic_shares_few_tasks_each_carrying_many_endpoints():
    run = claims(**{f"e{i:03d}": 1 for i in range(200)})  # 200 endpoints with a CDR each

    tasks, surplus = plan(run, sizing(task_slots=2))

    assert surplus == []
    assert [len(task) for task in tasks] == [100, 100]
    assert [len(endpoints_of(task)) for task in tasks] == [100, 100]
    assert sorted(c.cdr_id for task in tasks for c in task) == sorted(c.cdr_id for c in run)


def test_just_over_the_threshold_is_few_tasks_not_one_per_slot():
    tasks, _ = plan(claims(a=17), sizing(chunk_above=16))
    assert [len(task) for task in tasks] == [9, 8]
    tasks, _ = plan(claims(a=10, b=7), sizing(chunk_above=16))
    assert sorted(len(task) for task in tasks) == [7, 10]  # an endpoint's CDRs stay in one task
    assert sorted(len(endpoints_of(task)) for task in tasks) == [1, 1]


def test_a_burst_goes_in_as_many_chunks_as_the_run_has_task_slots_dealt_oldest_first():
    run = claims(a=5000)

    tasks, _ = plan(run, sizing(task_slots=8))

    assert [len(task) for task in tasks] == [625] * 8
    # Dealt in turn: the chunks sending side by side send the oldest first together.
    assert [task[0].cdr_id for task in tasks] == [f"a-{i:05d}" for i in range(8)]
    assert tasks[0][:3] == [run[0], run[8], run[16]]
    assert sorted(c.cdr_id for task in tasks for c in task) == sorted(c.cdr_id for c in run)


def test_an_endpoint_is_never_split_over_more_tasks_than_its_in_flight_limit():
    tasks, _ = plan(claims(a=1000, b=1000), sizing(task_slots=8, in_flight={"a": 1, "b": 8}))
    assert sum(1 for task in tasks if "a" in endpoints_of(task)) == 1
    assert sum(1 for task in tasks if "b" in endpoints_of(task)) == 4  # its share of 8 tasks: 1000 of 2000


def test_a_mixed_run_splits_the_busy_endpoint_and_packs_the_quiet_ones_into_the_lightest_tasks():
    run = claims(busy=300, quiet=2, other=1)

    tasks, _ = plan(run, sizing())

    assert len(tasks) == 8
    busy = [sum(1 for claim in task if claim.endpoint == "busy") for task in tasks]
    assert sorted(busy) == [37] * 4 + [38] * 4  # dealt evenly
    assert sum(len(task) for task in tasks) == 303
    # The quiet endpoints go whole, each into one task, and every endpoint's oldest goes out early:
    # the tasks are ordered by their first claim, which keeps the ledger's round-robin order.
    assert sum(1 for task in tasks if "quiet" in endpoints_of(task)) == 1
    assert {claim.endpoint for claim in tasks[0][:1] + tasks[1][:1] + tasks[2][:1]} == {
        "busy",
        "quiet",
        "other",
    }
    for task in tasks:
        order = [run.index(claim) for claim in task]
        assert order == sorted(order)


def test_many_endpoints_with_backlogs_share_the_slots():
    tasks, _ = plan(claims(**{f"e{i}": 100 for i in range(12)}), sizing(task_slots=8))
    assert len(tasks) == 8
    assert sorted(len(task) for task in tasks) == [100, 100, 100, 100, 200, 200, 200, 200]
    assert all(len([t for t in tasks if f"e{i}" in endpoints_of(t)]) == 1 for i in range(12))


def test_more_cdrs_than_max_tasks_in_a_light_run_gives_the_last_ones_back():
    run = claims(**{f"e{i}": 1 for i in range(5)})

    tasks, surplus = plan(run, sizing(), max_tasks=3)

    assert len(tasks) == 3
    assert [c.endpoint for c in surplus] == ["e3", "e4"]


def test_the_worker_cores_are_its_containers_cpu_limit_when_it_has_one(tmp_path):
    from cdr_webhook.selection.tasks import cgroup_cpu_quota, worker_cores

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # a Kubernetes limit of 1.5 CPUs
    assert cgroup_cpu_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("50000 100000\n")  # half a CPU: one chunk, whatever the node has
    assert worker_cores(v2) == 1
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(v2) is None

    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert worker_cores(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(v1) is None
    assert cgroup_cpu_quota(tmp_path / "nothing") is None
