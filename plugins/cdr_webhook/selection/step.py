"""The select step of a run: queue the CDRs it selects, take at most ``max_cdrs_per_run``, check them,
and map them to tasks; the order of those stages, each in its own module of :mod:`cdr_webhook.selection`.

Scheduled runs scan from the watermark; backfill and manual runs use a window and a policy (see
:mod:`cdr_webhook.window`). What a run returns is what its ``post_cdr`` tasks are mapped over.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from cdr_webhook import ledger
from cdr_webhook.adapters import notify_endpoint_event
from cdr_webhook.db import database_now
from cdr_webhook.ledger import schema
from cdr_webhook.selection import tasks as task_plans
from cdr_webhook.selection.checks import drop_invalid
from cdr_webhook.selection.claiming import claim_scan, claim_window, plan_run_window
from cdr_webhook.selection.endpoint_view import hold_misconfigured, known_endpoints
from cdr_webhook.selection.source import check_source
from cdr_webhook.selection.upkeep import prune, snapshot_backlog
from cdr_webhook.window import SCANNING

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Mapping

    import psycopg

    from cdr_webhook.selection.endpoint_view import Connections
    from cdr_webhook.settings import Settings
    from cdr_webhook.window import Window

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What the select step needs to know about its DAG run."""

    dag_id: str
    run_id: str
    run_type: str
    interval_start: dt.datetime | None
    interval_end: dt.datetime | None
    params: Mapping[str, Any]


def claim_cdrs(
    conn: psycopg.Connection[Any],
    run: RunInfo,
    settings: Settings,
    *,
    now: dt.datetime | None = None,
    connections: Connections,
    cdrs_per_task: int | None = None,
    max_tasks: int | None = None,
    task_slots: int | None = None,
) -> list[dict[str, Any]]:
    """
    Claim this run's CDRs and return what ``post_cdr`` is mapped over, ``{"cdr_ids", "http_conn_id"}``
    per task. ``cdrs_per_task`` is the DAG's (read at parse time), else the settings': with 1, one
    CDR each; above 1, each endpoint's CDRs, oldest first, in lists of at most ``cdrs_per_task``
    (see :func:`chunked`); auto (the default), sized by
    :func:`cdr_webhook.selection.sizing.plan` from the run's share of each endpoint's queue, the
    endpoint's in-flight limit and ``task_slots`` (the run's chunks that can send at once: the DAG
    passes the smaller of ``[core] parallelism`` and :func:`worker_cores`). At most ``max_tasks``
    of them, the claims of any further task going back to the queue.

    A run cleared and run again with the same request (the same kind of run, window, policy and
    client) gets exactly the CDRs it had claimed; a run cleared with new Params, as a reprocessing
    backfill does, selects anew.

    ``now`` (the end of an event-started run's scan, and the clock of retention and reconciliation)
    is the CDR database's clock unless given: ``created_at`` and the commit watcher use that clock,
    and a worker's clock ahead of it by more than ``lag_seconds`` would end a scan after rows not yet
    committed, which every later scan then starts after.
    """
    schema.migrate(conn)
    if now is None:
        now = database_now(conn)
    check_source(conn, settings.source_relation)
    tasks = task_plans.task_plan(settings, connections, cdrs_per_task, max_tasks, task_slots)
    window = None if run.run_type in SCANNING else plan_run_window(conn, run, settings, now)
    request = _run_request(window)
    if ledger.recorded_request(conn, dag_id=run.dag_id, run_id=run.run_id) == request:
        owned = ledger.owned_claims(conn, dag_id=run.dag_id, run_id=run.run_id)
        log.info("Run %s was cleared: mapping again the %d CDR(s) it had claimed", run.run_id, len(owned))
        return task_plans.mapped(conn, owned, tasks)
    known = known_endpoints(conn, settings, connections)
    with conn.transaction():
        if window is None:
            claims = claim_scan(conn, run, settings, known, now)
        else:
            claims = claim_window(conn, run, settings, known, window)
        checked = hold_misconfigured(conn, claims, known)
        # A task of one CDR is checked now: no task is mapped for a CDR that cannot be sent. A task of
        # several reads and checks its rows as it builds their bodies (the engine skips the same ones,
        # for the same reasons): checking them here too would read and build every row twice.
        groups = task_plans.grouped(conn, checked, tasks)
        singles = drop_invalid(conn, settings, [group[0] for group in groups if len(group) == 1], known)
        groups = task_plans.without_skipped(groups, singles)
        ledger.record_request(conn, dag_id=run.dag_id, run_id=run.run_id, request=request)
    for event in known.held:
        notify_endpoint_event(event)  # once the pause is committed
    prune(conn, settings, now)
    snapshot_backlog(conn, now)
    _log_claimed(conn, groups)
    return [task_plans.task_kwargs(group) for group in groups]


def _run_request(window: Window | None) -> dict[str, Any]:
    """What a run asks for, as stored with its claims: the watermark scan, or a window and policy."""
    if window is None:
        return {"mode": "scan"}
    return {
        "mode": "window",
        "start": window.start.isoformat(),
        "end": window.end.isoformat(),
        "policy": window.policy,
        "client_id": window.client_id,
    }


def _log_claimed(conn: psycopg.Connection[Any], groups: list[list[ledger.Claim]]) -> None:
    waiting = ledger.queued_backlog(conn)
    singles = sum(1 for group in groups if len(group) == 1)
    log.info(
        "Mapped %d CDR(s) to %d task(s) (%d of one CDR, checked; the others check their rows as they "
        "build them); %s queued CDR(s) wait for later runs",
        sum(len(group) for group in groups),
        len(groups),
        singles,
        f"at least {waiting}" if waiting >= ledger.assignment.BACKLOG_COUNT_LIMIT else waiting,
    )


def run_info(context: Mapping[str, Any]) -> RunInfo:
    """Extract the :class:`RunInfo` of the running task's DAG run from its Airflow context."""
    dag_run = context["dag_run"]
    return RunInfo(
        dag_id=dag_run.dag_id,
        run_id=dag_run.run_id,
        run_type=str(getattr(dag_run.run_type, "value", dag_run.run_type)),
        interval_start=context.get("data_interval_start"),
        interval_end=context.get("data_interval_end"),
        params=dict(context.get("params") or {}),
    )
