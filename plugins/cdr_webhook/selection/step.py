"""The select step of a run: queue the CDRs it selects, take at most ``max_cdrs_per_run``, check them.

Scheduled runs scan from the watermark; backfill and manual runs use a window and a policy (see
:mod:`cdr_webhook.window`). What a run returns is what its ``post_cdr`` tasks are mapped over.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdr_webhook import ledger
from cdr_webhook.config import EndpointConfig, EndpointConfigError, from_connection
from cdr_webhook.ledger import endpoints, schema
from cdr_webhook.payload import InvalidCdr, build_payload, sized_body
from cdr_webhook.selection import sizing
from cdr_webhook.selection.routing import Route, Router
from cdr_webhook.selection.source import check_source, distinct_clients, fetch_rows
from cdr_webhook.settings import AUTO_SIZED, DEFAULT_ENDPOINT_CONN_ID, Settings
from cdr_webhook.watch import state as watch_state
from cdr_webhook.window import (
    ASSET_TRIGGERED,
    SCANNING,
    InvalidRunRequest,
    Window,
    event_scan_bounds,
    plan_scan,
    plan_window,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    import psycopg

    #: ``conn_id -> its endpoint configuration``, None when no such connection exists; raises
    #: :class:`~cdr_webhook.config.EndpointConfigError` when the connection cannot be used.
    Connections = Callable[[str], EndpointConfig | None]

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


@dataclasses.dataclass
class _Endpoints:
    """Per-run knowledge of endpoints: client routes and configurations, each connection read once."""

    connections: Connections
    router: Router
    paused: set[str]
    held: list[endpoints.EndpointEvent] = dataclasses.field(default_factory=list)

    def routes(self, clients: list[int | None]) -> dict[int | None, Route]:
        return {client: self.router.route(client) for client in clients}

    def config(self, endpoint: str) -> EndpointConfig:
        """The endpoint's configuration; :class:`EndpointConfigError` when it cannot be used or is gone."""
        config = self.connections(endpoint)
        if config is None:
            raise EndpointConfigError(endpoint, None, "does not exist (was it deleted or renamed?)")
        return config

    def exists(self, endpoint: str) -> bool:
        """Whether the connection exists, usable or not (a malformed one is held, not re-routed)."""
        try:
            return self.connections(endpoint) is not None
        except EndpointConfigError:
            return True

    def throttles(self, conn: psycopg.Connection[Any], settings: Settings) -> dict[str, int]:
        """
        Failing endpoints and the claims each may have in flight: one probe's worth, its in-flight limit.

        An endpoint whose last attempt failed gets no more CDRs claimed than it can have POSTs in
        flight, across all live runs: its retries hold up the run that owns them, and a run per
        schedule interval must not be added to them while others' CDRs wait.
        """
        limits = {}
        for endpoint in endpoints.failing_endpoints(conn):
            try:
                limits[endpoint] = self.config(endpoint).in_flight_limit(settings.max_in_flight_per_endpoint)
            except EndpointConfigError:  # held when its CDRs are claimed
                limits[endpoint] = settings.max_in_flight_per_endpoint
        return limits


@dataclasses.dataclass(frozen=True)
class _Tasks:
    """How this run groups its CDRs into tasks: a fixed ``cdrs_per_task``, or sized (``sizing``)."""

    cdrs_per_task: int
    max_tasks: int | None
    sizing: sizing.Sizing


def select_cdrs(
    conn: psycopg.Connection[Any],
    run: RunInfo,
    settings: Settings,
    *,
    now: dt.datetime,
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
    """
    schema.migrate(conn)
    check_source(conn, settings.source_relation)
    tasks = _task_plan(settings, connections, cdrs_per_task, max_tasks, task_slots)
    window = None if run.run_type in SCANNING else _plan_window(conn, run, settings, now)
    request = _request(window)
    if ledger.recorded_request(conn, dag_id=run.dag_id, run_id=run.run_id) == request:
        owned = ledger.owned_claims(conn, dag_id=run.dag_id, run_id=run.run_id)
        log.info("Run %s was cleared: mapping again the %d CDR(s) it had claimed", run.run_id, len(owned))
        return _mapped_all(conn, owned, tasks)
    known = _known_endpoints(conn, settings, connections)
    with conn.transaction():
        if window is None:
            claims = _claim_scan(conn, run, settings, known, now)
        else:
            claims = _claim_window(conn, run, settings, known, window)
        checked = _hold_misconfigured(conn, claims, known)
        sendable = _drop_invalid(conn, settings, checked, known)
        ledger.record_request(conn, dag_id=run.dag_id, run_id=run.run_id, request=request)
    for event in known.held:
        endpoints.notify(event)  # once the pause is committed
    _prune(conn, settings, now)
    _log_claimed(conn, claimed=len(checked), sendable=len(sendable))
    return _mapped_all(conn, sendable, tasks)


def _task_plan(
    settings: Settings,
    connections: Connections,
    cdrs_per_task: int | None,
    max_tasks: int | None,
    task_slots: int | None,
) -> _Tasks:
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
    return _Tasks(
        settings.cdrs_per_task if cdrs_per_task is None else cdrs_per_task,
        max_tasks,
        sizing.Sizing(settings.chunk_above, slots, in_flight),
    )


def _plan_window(conn: psycopg.Connection[Any], run: RunInfo, settings: Settings, now: dt.datetime) -> Window:
    """A backfill or manual run's window (its Params, else its data interval), within the retention."""
    window = plan_window(
        params=run.params, interval_start=run.interval_start, interval_end=run.interval_end, now=now
    )
    _check_retention(conn, window, settings, now)
    return window


def _known_endpoints(
    conn: psycopg.Connection[Any], settings: Settings, connections: Connections
) -> _Endpoints:
    """This run's view of the endpoints: the router over the connections, and the paused ones."""
    known = _Endpoints(
        connections=connections,
        router=Router(
            lambda conn_id: known.exists(conn_id),
            unrouted=settings.unrouted_clients,
            default_endpoint=DEFAULT_ENDPOINT_CONN_ID,
        ),
        paused=endpoints.paused_endpoints(conn),
    )
    if known.paused:
        log.warning("Paused endpoints (their CDRs wait, queued): %s", ", ".join(sorted(known.paused)))
    return known


def _log_claimed(conn: psycopg.Connection[Any], *, claimed: int, sendable: int) -> None:
    waiting = ledger.queued_backlog(conn)
    log.info(
        "Claimed %d CDR(s), %d to send, %d skipped as invalid; %s queued CDR(s) wait for later runs",
        claimed,
        sendable,
        claimed - sendable,
        f"at least {waiting}" if waiting >= ledger.queue.BACKLOG_COUNT_LIMIT else waiting,
    )


def _check_retention(
    conn: psycopg.Connection[Any], window: Window, settings: Settings, now: dt.datetime
) -> None:
    """Refuse a ``missing`` window reaching before what retention pruned: it would resend all of it."""
    if window.policy != "missing":
        return
    state = ledger.pruned(conn)
    if state.known:
        bound, why = state.before, "pruned by retention"
    elif settings.retention_days:  # pruning of unknown extent (an install from before it was recorded)
        bound, why = (
            now - dt.timedelta(days=settings.retention_days),
            f"retention_days = {settings.retention_days}",
        )
    else:
        bound = None
    if bound is not None and window.start < bound:
        raise InvalidRunRequest(
            f"window_start ({window.start.isoformat()}) is before what the ledger still records "
            f"({bound.isoformat()}, {why}): policy: missing would send every CDR of it again. Start "
            "the window later, or redeliver it deliberately with policy: all"
        )


def _prune(conn: psycopg.Connection[Any], settings: Settings, now: dt.datetime) -> None:
    """Delete what is older than ``retention_days`` (a bounded batch per run), outside the claims."""
    if not settings.retention_days:
        return
    before = now - dt.timedelta(days=settings.retention_days)
    rows = ledger.prune(conn, before=before)
    events = endpoints.prune_events(conn, before=before)
    if rows or events:
        log.info(
            "Retention (%d days): deleted %d finished ledger row(s) and %d endpoint event(s) before %s",
            settings.retention_days,
            rows,
            events,
            before.isoformat(),
        )


def _request(window: Window | None) -> dict[str, Any]:
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


def _assign(
    conn: psycopg.Connection[Any], run: RunInfo, settings: Settings, known: _Endpoints, **scope: Any
) -> list[ledger.Claim]:
    return ledger.assign(
        conn,
        dag_id=run.dag_id,
        run_id=run.run_id,
        limit=settings.cdrs_per_run,
        claim_timeout_seconds=settings.claim_timeout_seconds,
        paused_endpoints=sorted(known.paused),
        throttled=known.throttles(conn, settings),
        **scope,
    )


def _claim_scan(
    conn: psycopg.Connection[Any], run: RunInfo, settings: Settings, known: _Endpoints, now: dt.datetime
) -> list[ledger.Claim]:
    """
    A scheduled or event-started run: queue what the watermark scan finds, move the watermark, take
    the oldest queued.
    """
    relation = settings.source_relation
    if run.run_type == ASSET_TRIGGERED:
        interval_start, interval_end = event_scan_bounds(
            now=now, watch_started_from=watch_state.started_from(conn, relation)
        )
    elif run.interval_start is None or run.interval_end is None:
        raise ValueError(f"scheduled run {run.run_id} has no data interval; use CronDataIntervalTimetable")
    else:
        interval_start, interval_end = run.interval_start, run.interval_end
    watermark = ledger.lock_watermark(conn, relation)
    scan = plan_scan(
        watermark=watermark,
        interval_start=interval_start,
        interval_end=interval_end,
        lag_seconds=settings.lag_seconds,
        start_from=settings.start_from,
    )
    ledger.note_scan_start(conn, relation, scan.start)
    clients = distinct_clients(conn, relation, start=scan.start, end=scan.end)
    queued = ledger.enqueue_new(
        conn, relation=relation, routes=known.routes(clients), start=scan.start, end=scan.end
    )
    if watermark is not None:
        _reconcile(conn, settings, known, before=scan.start, now=now)
    ledger.advance_watermark(conn, relation, scan.end)
    log.info(
        "Scanned created_at in [%s, %s) (watermark %s): %d new CDR(s) queued",
        scan.start.isoformat(),
        scan.end.isoformat(),
        watermark.isoformat() if watermark else "not set: first run",
        queued,
    )
    claims = _assign(conn, run, settings, known)
    if len(claims) >= settings.cdrs_per_run:
        # A full run: CDRs may wait behind it; the commit watcher starts the next run for them
        # instead of leaving them to the schedule.
        watch_state.request_more(conn, relation)
    return claims


def _reconcile(
    conn: psycopg.Connection[Any],
    settings: Settings,
    known: _Endpoints,
    *,
    before: dt.datetime,
    now: dt.datetime,
) -> None:
    """
    Queue the CDRs of the last ``reconcile_hours`` before the scan that have no ledger row yet.

    They are rows whose transaction committed after the watermark (less the lag) had passed their
    created_at. It runs at most once per ``reconcile_interval_seconds``, checks one slice of about
    ``reconcile_cdrs_per_run`` CDRs of the window (the next one of the sweep: see
    :func:`ledger.reconcile_slice`), and never reaches before the first scan (older history is a
    backfill's job).
    """
    if settings.reconcile_hours == 0:
        return
    relation = settings.source_relation
    scanned_from = ledger.due_reconciliation(
        conn, relation, now=now, interval_seconds=settings.reconcile_interval_seconds
    )
    if scanned_from is None:
        return
    start = max(now - dt.timedelta(hours=settings.reconcile_hours), scanned_from)
    if start >= before:
        return
    found = ledger.reconcile_slice(
        conn, relation, start=start, before=before, max_cdrs=settings.reconcile_cdrs_per_run
    )
    if found is None:
        return
    low, high = found
    clients = ledger.late_clients(conn, relation=relation, start=low, end=high)
    queued = (
        ledger.enqueue_new(
            conn, relation=relation, routes=known.routes(clients), start=low, end=high, parallel=False
        )
        if clients
        else 0
    )
    whole = (low, high) == (start, before)
    log.log(
        logging.WARNING if queued else logging.INFO,
        "Reconciliation of created_at in [%s, %s): %d late CDR(s) queued (committed after the scan "
        "had passed them)%s",
        low.isoformat(),
        high.isoformat(),
        queued,
        "" if whole else f"; one slice of the window [{start.isoformat()}, {before.isoformat()})",
    )


def _claim_window(
    conn: psycopg.Connection[Any], run: RunInfo, settings: Settings, known: _Endpoints, window: Window
) -> list[ledger.Claim]:
    """A backfill or manual run: queue what its policy selects in the window, take the oldest of it."""
    queued = 0
    if window.policy in ("missing", "all"):
        relation = settings.source_relation
        span = {"start": window.start, "end": window.end, "client_id": window.client_id}
        clients = distinct_clients(conn, relation, **span)
        queued += ledger.enqueue_new(conn, relation=relation, routes=known.routes(clients), **span)
    if window.policy in ("failed", "all"):
        statuses = ("failed",) if window.policy == "failed" else ("delivered", "failed", "skipped")
        gone = [
            endpoint
            for endpoint in ledger.finished_endpoints(conn, window=window, statuses=statuses)
            if not known.exists(endpoint)
        ]
        if gone:
            log.warning("Not re-queued, their connection does not exist: CDRs of %s", ", ".join(gone))
        queued += ledger.requeue(conn, window=window, statuses=statuses, exclude_endpoints=gone)
    log.info(
        "Window [%s, %s), policy %s%s: %d CDR(s) queued",
        window.start.isoformat(),
        window.end.isoformat(),
        window.policy,
        f", client {window.client_id}" if window.client_id is not None else "",
        queued,
    )
    return _assign(conn, run, settings, known, window=window, client_id=window.client_id)


#: Source rows the select step reads at once to check its claims.
_CHECK_BATCH = 1000


def _drop_invalid(
    conn: psycopg.Connection[Any], settings: Settings, claims: list[ledger.Claim], known: _Endpoints
) -> list[ledger.Claim]:
    """
    Mark claims that cannot become a payload, that their endpoint filters out, or whose body is over
    ``max_payload_bytes``, as skipped: each once, with its reason, before any task is mapped to it.

    Rows are read :data:`_CHECK_BATCH` at a time: a run of chunk mode may claim tens of thousands.
    """
    relation = settings.source_relation
    sendable = []
    rows: dict[str, Any] = {}
    for index, claim in enumerate(claims):
        if index % _CHECK_BATCH == 0:
            batch = claims[index : index + _CHECK_BATCH]
            rows = fetch_rows(conn, relation, ((c.cdr_id, c.cdr_created_at) for c in batch))
        row = rows.get(claim.cdr_id)
        if row is None:
            reason = f"CDR {claim.cdr_id!r} is no longer in the source relation {relation!r}"
        else:
            try:
                filters = known.config(claim.endpoint).filters
                payload = build_payload(row)
                reason = filters.exclusion(payload) if filters else None
                if reason is None:
                    sized_body(payload, settings.max_payload_bytes)
            except InvalidCdr as err:
                reason = str(err)
            if reason is None:
                sendable.append(claim)
                continue
        log.warning("Skipping: %s", reason)
        ledger.mark_skipped(conn, claim, reason)
    return sendable


def _hold_misconfigured(
    conn: psycopg.Connection[Any], claims: list[ledger.Claim], known: _Endpoints
) -> list[ledger.Claim]:
    """
    Hold the CDRs of endpoints whose connection cannot be used; return the other claims.

    Such an endpoint is paused with the reason (the alert goes out once this transaction commits)
    and its CDRs go back to the queue, in order, with the reason on their ledger rows: fixing the
    connection and resuming the endpoint sends them. Every other endpoint delivers in this run.
    """
    held: set[str] = set()
    for endpoint in dict.fromkeys(claim.endpoint for claim in claims):
        try:
            known.config(endpoint)
        except EndpointConfigError as err:
            log.error("Endpoint %s is held, its CDRs stay queued: %s", endpoint, err)
            event = endpoints.hold(conn, endpoint, [c for c in claims if c.endpoint == endpoint], err)
            if event is not None:
                known.held.append(event)
            held.add(endpoint)
    return [claim for claim in claims if claim.endpoint not in held]


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


def _mapped_all(
    conn: psycopg.Connection[Any], claims: list[ledger.Claim], tasks: _Tasks
) -> list[dict[str, Any]]:
    """What the post tasks are mapped over: the CDRs of one endpoint each, as ``tasks`` groups them."""
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
    return [
        {"cdr_ids": [claim.cdr_id for claim in chunk], "http_conn_id": chunk[0].endpoint} for chunk in chunks
    ]


def _log_chunked(tasks: list[list[ledger.Claim]], rule: sizing.Sizing) -> None:
    """Say which endpoints went in chunks, and why (the sizing is the run's own choice)."""
    sizes: dict[str, list[int]] = {}
    for task in tasks:
        if len(task) > 1:
            sizes.setdefault(task[0].endpoint, []).append(len(task))
    for endpoint, chunk_sizes in sizes.items():
        log.info(
            "Endpoint %s: %d CDR(s) in this run, more than chunk_above (%d): %d chunk task(s) of up to "
            "%d CDR(s) (run task slots %d, its in-flight limit %d)",
            endpoint,
            sum(chunk_sizes),
            rule.chunk_above,
            len(chunk_sizes),
            max(chunk_sizes),
            rule.task_slots,
            rule.in_flight(endpoint),
        )


def airflow_connections() -> Connections:
    """Return a per-run, cached lookup of endpoint configurations from Airflow connections."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    cache: dict[str, EndpointConfig | EndpointConfigError | None] = {}

    def config_of(conn_id: str) -> EndpointConfig | None:
        if conn_id not in cache:
            try:
                cache[conn_id] = from_connection(BaseHook.get_connection(conn_id))
            except AirflowNotFoundException:
                cache[conn_id] = None
            except EndpointConfigError as err:
                cache[conn_id] = err
        found = cache[conn_id]
        if isinstance(found, EndpointConfigError):
            raise found
        return found

    return config_of


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
