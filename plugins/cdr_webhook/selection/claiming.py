"""What a run claims: a scan from the watermark (with reconciliation of late commits), or a backfill's
or manual run's window and policy; then the oldest queued CDRs, round robin over the endpoints."""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

from airflow.sdk.observability.stats import Stats

from cdr_webhook import ledger
from cdr_webhook.ledger import watch_health, watch_requests
from cdr_webhook.selection.source import distinct_clients
from cdr_webhook.window import (
    ASSET_TRIGGERED,
    SCHEDULED,
    InvalidRunRequest,
    Window,
    event_scan_bounds,
    plan_scan,
    plan_window,
)

if TYPE_CHECKING:
    import psycopg

    from cdr_webhook.selection.endpoint_view import RunEndpoints
    from cdr_webhook.selection.step import RunInfo
    from cdr_webhook.settings import Settings

log = logging.getLogger(__name__)


def plan_run_window(
    conn: psycopg.Connection[Any], run: RunInfo, settings: Settings, now: dt.datetime
) -> Window:
    """A backfill or manual run's window (its Params, else its data interval), within the retention."""
    window = plan_window(
        params=run.params, interval_start=run.interval_start, interval_end=run.interval_end, now=now
    )
    _check_retention(conn, window, settings, now)
    return window


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


def _assign(
    conn: psycopg.Connection[Any], run: RunInfo, settings: Settings, known: RunEndpoints, **scope: Any
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


def claim_scan(
    conn: psycopg.Connection[Any], run: RunInfo, settings: Settings, known: RunEndpoints, now: dt.datetime
) -> list[ledger.Claim]:
    """
    A scheduled or event-started run: queue what the watermark scan finds, move the watermark, take
    the oldest queued.
    """
    relation = settings.source_relation
    if run.run_type == ASSET_TRIGGERED:
        interval_start, interval_end = event_scan_bounds(
            now=now, watch_started_from=watch_requests.started_from(conn, relation)
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
    _signal_watcher(conn, settings, found_by_schedule=queued if run.run_type == SCHEDULED else 0)
    claims = _assign(conn, run, settings, known)
    if len(claims) >= settings.cdrs_per_run:
        # A full run: CDRs may wait behind it; the commit watcher starts the next run for them
        # instead of leaving them to the schedule.
        watch_requests.request_more(conn, relation)
    return claims


def _signal_watcher(conn: psycopg.Connection[Any], settings: Settings, *, found_by_schedule: int) -> None:
    """
    The commit watcher's health where operators look, from every scanning run: as metrics, and when a
    scheduled run finds new CDRs while the watcher is not healthy (they waited for the schedule), as a
    WARNING in this task's log naming its state.
    """
    if not settings.watch_interval_seconds:
        return  # switched off on purpose: the schedule delivering is what the operator chose
    verdict = watch_health.watcher_verdict(conn, settings.source_relation, settings.watch_interval_seconds)
    Stats.gauge("cdr_webhook.watcher.healthy", int(verdict.ok))
    if verdict.age_seconds is not None:
        Stats.gauge("cdr_webhook.watcher.heartbeat_age", round(verdict.age_seconds))
    if found_by_schedule and not verdict.ok:
        log.warning(
            "%d new CDR(s) waited for the minute schedule: the commit watcher did not start a run for "
            "them (%s). %s %s",
            found_by_schedule,
            verdict.state,
            verdict.headline,
            verdict.advice,
        )


def _reconcile(
    conn: psycopg.Connection[Any],
    settings: Settings,
    known: RunEndpoints,
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


def claim_window(
    conn: psycopg.Connection[Any], run: RunInfo, settings: Settings, known: RunEndpoints, window: Window
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
