"""How a run's claims become ``post_cdr`` tasks: a fixed ``cdrs_per_task`` or sized by the run, within
the run's task slots (the worker's cores among them), and each task's mapped kwargs."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdr_webhook import ledger
from cdr_webhook.endpoint_config import EndpointConfigError
from cdr_webhook.selection import sizing
from cdr_webhook.settings import AUTO_SIZED, Settings

if TYPE_CHECKING:
    from collections.abc import Sequence

    import psycopg

    from cdr_webhook.selection.endpoint_view import Connections

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TaskPlan:
    """How this run groups its CDRs into tasks: a fixed ``cdrs_per_task``, or sized (``sizing``)."""

    cdrs_per_task: int
    max_tasks: int | None
    sizing: sizing.Sizing


def task_plan(
    settings: Settings,
    connections: Connections,
    cdrs_per_task: int | None,
    max_tasks: int | None,
    task_slots: int | None,
) -> TaskPlan:
    """The run's grouping of CDRs into tasks; the sizing reads each endpoint's in-flight limit once."""
    default = settings.max_in_flight_per_endpoint

    def in_flight(endpoint: str) -> int:
        try:
            config = connections(endpoint)
        except EndpointConfigError:  # held by the select step, or failed at send: one slot is enough
            return 1
        return config.in_flight_limit(default) if config is not None else default

    slots = settings.max_active_posts_per_run
    if task_slots is not None and task_slots > 0:
        slots = min(slots, task_slots)
    return TaskPlan(
        settings.cdrs_per_task if cdrs_per_task is None else cdrs_per_task,
        max_tasks,
        sizing.Sizing(settings.chunk_above, slots, in_flight),
    )


def chunked(
    claims: Sequence[ledger.Claim], size: int, max_chunks: int | None = None
) -> tuple[list[list[ledger.Claim]], list[ledger.Claim]]:
    """
    Group claims into chunks of one endpoint each, at most ``size`` CDRs, in the claims' order.

    Claims come in round-robin order (every endpoint's oldest first); each endpoint's claims fill its
    chunks in that order, and the chunks are ordered by their first claim, so every endpoint gets an
    early task. Beyond ``max_chunks`` chunks (many endpoints with a few CDRs each), the later chunks
    are returned apart, as the claims to give back to the queue.
    """
    chunks: list[list[ledger.Claim]] = []
    open_chunk: dict[str, list[ledger.Claim]] = {}
    for claim in claims:
        chunk = open_chunk.get(claim.endpoint)
        if chunk is None or len(chunk) >= size:
            chunk = open_chunk[claim.endpoint] = []
            chunks.append(chunk)
        chunk.append(claim)
    return sizing.split_surplus(chunks, max_chunks)


def mapped(
    conn: psycopg.Connection[Any], claims: list[ledger.Claim], tasks: TaskPlan
) -> list[dict[str, Any]]:
    """What the post tasks are mapped over: each task's CDRs by endpoint, as ``tasks`` groups them."""
    return [task_kwargs(group) for group in grouped(conn, claims, tasks)]


def without_skipped(
    groups: list[list[ledger.Claim]], sendable: list[ledger.Claim]
) -> list[list[ledger.Claim]]:
    """The groups less the tasks of one CDR whose CDR is not in ``sendable`` (the check skipped it)."""
    kept = {claim.cdr_id for claim in sendable}
    return [group for group in groups if len(group) > 1 or group[0].cdr_id in kept]


def grouped(
    conn: psycopg.Connection[Any], claims: list[ledger.Claim], tasks: TaskPlan
) -> list[list[ledger.Claim]]:
    """The claims grouped into tasks as ``tasks`` says; those beyond ``max_tasks`` go back to the queue."""
    if tasks.cdrs_per_task == AUTO_SIZED:
        chunks, surplus = sizing.plan(claims, tasks.sizing, tasks.max_tasks)
        _log_chunked(chunks, tasks.sizing)
    else:
        chunks, surplus = chunked(claims, tasks.cdrs_per_task, tasks.max_tasks)
    if surplus:
        ledger.release_many(conn, surplus)
        log.info(
            "%d task(s) reach max_map_length: %d CDR(s) go back to the queue for the next runs",
            len(chunks),
            len(surplus),
        )
    return chunks


def task_kwargs(claims: list[ledger.Claim]) -> dict[str, Any]:
    """
    One ``post_cdr`` task's kwargs: its CDRs by endpoint (ids only), oldest first within each; a task
    of several endpoints also names each endpoint and how many of the ids are its (``endpoints``).
    """
    by_endpoint: dict[str, list[str]] = {}
    for claim in claims:
        by_endpoint.setdefault(claim.endpoint, []).append(claim.cdr_id)
    kwargs: dict[str, Any] = {
        "cdr_ids": [cdr_id for ids in by_endpoint.values() for cdr_id in ids],
        "http_conn_id": claims[0].endpoint,
    }
    if len(by_endpoint) > 1:
        kwargs["endpoints"] = [[endpoint, len(ids)] for endpoint, ids in by_endpoint.items()]
    return kwargs


def _log_chunked(tasks: list[list[ledger.Claim]], rule: sizing.Sizing) -> None:
    """Say how the run shared its CDRs among tasks, and why (the sizing is the run's own choice)."""
    if not any(len(task) > 1 for task in tasks):
        return
    cdrs = sum(len(task) for task in tasks)
    log.info(
        "%d CDR(s) in this run, more than chunk_above (%d): %d task(s) (run task slots %d), of %s CDR(s) "
        "to %s endpoint(s)",
        cdrs,
        rule.chunk_above,
        len(tasks),
        rule.task_slots,
        "/".join(str(len(task)) for task in tasks),
        "/".join(str(len({claim.endpoint for claim in task})) for task in tasks),
    )


def worker_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """
    The CPU cores this worker may run on: a bound on the chunks of a run sending at once.

    A chunk sending to a fast receiver keeps one core busy (its POSTs are our Python, one process);
    more chunks than cores only add task starts, each far dearer than a POST. A container's CPU
    limit (its cgroup's quota, as Kubernetes sets it) counts, not the node's cores it can see.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(cores, 1)


def cgroup_cpu_quota(root: Path) -> float | None:
    """The cgroup's CPU limit in cores (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``); None when unlimited."""
    try:
        if (root / "cpu.max").exists():
            quota, _, period = (root / "cpu.max").read_text().strip().partition(" ")
        else:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1") or not period:
            return None
        return int(quota) / int(period) if int(quota) > 0 and int(period) > 0 else None
    except (OSError, ValueError):  # no cgroup files (not Linux, or not mounted): the cores seen
        return None
