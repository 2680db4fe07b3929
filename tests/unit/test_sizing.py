"""The run sizes its tasks: a task per CDR for a small share of an endpoint's queue, chunks beyond."""

from __future__ import annotations

import dataclasses

from cdr_webhook.selection.sizing import Sizing, chunk_counts, plan


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


def test_steady_traffic_is_a_task_per_cdr():
    run = claims(a=3, b=16)

    tasks, surplus = plan(run, sizing())

    assert tasks == [[claim] for claim in run]
    assert surplus == []


def test_a_burst_goes_in_as_many_chunks_as_the_run_has_task_slots_dealt_oldest_first():
    run = claims(a=5000)

    tasks, _ = plan(run, sizing(task_slots=8))

    assert [len(task) for task in tasks] == [625] * 8
    # Dealt in turn: the chunks sending side by side send the oldest first together.
    assert [task[0].cdr_id for task in tasks] == [f"a-{i:05d}" for i in range(8)]
    assert tasks[0][:3] == [run[0], run[8], run[16]]
    assert sorted(c.cdr_id for task in tasks for c in task) == sorted(c.cdr_id for c in run)


def test_just_over_the_threshold_is_few_chunks_not_one_per_slot():
    tasks, _ = plan(claims(a=17), sizing(chunk_above=16))
    assert [len(task) for task in tasks] == [9, 8]


def test_chunks_never_outnumber_the_endpoints_in_flight_limit():
    assert chunk_counts(claims(a=1000, b=1000), sizing(task_slots=8, in_flight={"a": 1, "b": 8})) == {
        "a": 1,
        "b": 4,
    }


def test_a_mixed_run_chunks_the_busy_endpoint_and_sends_the_others_one_task_each():
    run = claims(busy=300, quiet=2, other=1)

    tasks, _ = plan(run, sizing())

    singles = [task for task in tasks if task[0].endpoint != "busy"]
    chunks = [task for task in tasks if task[0].endpoint == "busy"]
    assert [len(task) for task in singles] == [1, 1, 1]
    assert [len(task) for task in chunks] == [38] * 4 + [37] * 4  # dealt evenly
    # Every endpoint gets an early task: tasks are ordered by their first claim.
    assert {task[0].endpoint for task in tasks[:3]} == {"busy", "quiet", "other"}


def test_many_endpoints_share_the_slots_at_least_one_chunk_each():
    counts = chunk_counts(claims(**{f"e{i}": 100 for i in range(12)}), sizing(task_slots=8))
    assert counts == {f"e{i}": 1 for i in range(12)}


def test_a_run_that_would_pass_max_tasks_lowers_the_threshold_instead_of_giving_cdrs_back():
    run = claims(**{f"e{i}": 10 for i in range(30)})  # 300 tasks of one CDR each

    tasks, surplus = plan(run, sizing(task_slots=8), max_tasks=100)

    assert surplus == []
    assert len(tasks) <= 100
    assert sorted(c.cdr_id for task in tasks for c in task) == sorted(c.cdr_id for c in run)


def test_more_endpoints_than_max_tasks_gives_the_last_ones_back():
    run = claims(**{f"e{i}": 1 for i in range(5)})

    tasks, surplus = plan(run, sizing(), max_tasks=3)

    assert len(tasks) == 3
    assert [c.endpoint for c in surplus] == ["e3", "e4"]


def test_the_worker_cores_are_its_containers_cpu_limit_when_it_has_one(tmp_path):
    from cdr_webhook.selection.step import cgroup_cpu_quota, worker_cores

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
