"""The page's state changes, each a POST with the user's CSRF token: redeliver, a Params run, pause/resume.

Redeliveries and runs go to Airflow's REST API with the caller's own token; pause and resume are our
own endpoint tables (:mod:`cdr_webhook.ledger.endpoints`, as the CLI).
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse

from cdr_webhook.adapters import load_settings, notify_endpoint_event
from cdr_webhook.ledger import endpoints
from cdr_webhook.settings import DAG_ID
from cdr_webhook.web import airflow_api, deliveries, forms
from cdr_webhook.web.deps import Conn, api_base_url, prefix, render
from cdr_webhook.web.security import CanClear, CanPause, CanTrigger, caller_token, check_csrf

log = logging.getLogger(__name__)

#: Deliveries one redelivery may clear (a bigger set is a Params run over its window).
MAX_REDELIVER = 500

router = APIRouter()

#: Why a delivered CDR is not cleared in chunk mode, and what redelivers it.
CHUNK_DELIVERED = (
    "delivered, and its task is a chunk: clearing a chunk re-sends only its CDRs "
    "not delivered: redeliver it with a run (policy all, its client and day) from Completeness"
)

#: Why a skipped CDR is not cleared, and what sends it.
SKIPPED = (
    "skipped: its source row cannot be sent as it is, and clearing its task would not send it: mend the "
    "source row, then send it with a run with policy all over its window (its page gives the Params)"
)


def _chunks(conn: Conn, rows: list[deliveries.Delivery]) -> set[tuple[str | None, int | None]]:
    """The tasks of these rows that are chunks: all of them in chunk mode; with auto, those of 2+ CDRs."""
    owned = sorted({(r.run_id, r.map_index) for r in rows if r.run_id and r.map_index is not None})
    settings = load_settings()
    if settings.cdrs_per_task > 1:
        return set(owned)
    if not settings.auto_sized:
        return set()
    return deliveries.chunk_tasks(conn, dag_id=DAG_ID, tasks=owned)


@router.post("/redeliver", response_class=HTMLResponse)
def redeliver(
    request: Request,
    user: CanClear,
    conn: Conn,
    key: Annotated[list[str] | None, Form()] = None,
    csrf: Annotated[str | None, Form()] = None,
) -> HTMLResponse:
    """Clear the mapped ``post_cdr`` task instance of each selected delivery, one API call per run."""
    check_csrf(request, user, csrf)
    if not key:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "no delivery selected: tick the ones to redeliver")
    if len(key) > MAX_REDELIVER:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            f"{len(key)} deliveries selected: at most {MAX_REDELIVER} at once; redeliver a bigger set "
            "with a Params run (policy all or failed) over its window",
        )
    try:
        keys = forms.delivery_keys(key)
    except ValueError as err:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(err)) from None
    by_run: dict[str, list[int]] = {}
    not_cleared = []
    rows = deliveries.get_deliveries(conn, keys)
    chunks = _chunks(conn, rows)
    for row in rows:
        if (row.run_id, row.map_index) in chunks and row.status == "delivered":
            # A cleared chunk sends again only its CDRs not delivered: clearing would not resend this one.
            not_cleared.append((row, CHUNK_DELIVERED))
        elif row.status == "skipped":
            # Its claim is never taken again (ledger.claims): a cleared task would not send it.
            not_cleared.append((row, SKIPPED))
        elif row.dag_id == DAG_ID and row.run_id and row.map_index is not None and row.map_index >= 0:
            by_run.setdefault(row.run_id, []).append(row.map_index)
        else:
            not_cleared.append((row, "no task owns it (it waits queued for a run): nothing to clear"))
    api = airflow_api.AirflowApi(api_base_url(), caller_token(request))
    cleared, failures = [], []
    for run_id, indexes in sorted(by_run.items()):
        try:
            cleared.append(api.clear_tasks(run_id, indexes))
        except airflow_api.AirflowApiError as err:
            failures.append((run_id, str(err)))
    log.info(
        "User %s cleared %d task(s) to redeliver", user.get_name(), sum(len(c.map_indexes) for c in cleared)
    )
    return render(
        request, "result.html", user, status_code=502 if failures and not cleared else 200,
        action="Redelivery", cleared=cleared, failures=failures, not_cleared=not_cleared, runs=[],
        back=keys[0] if len(keys) == 1 else None,
    )  # fmt: skip


@router.post("/runs", response_class=HTMLResponse)
def trigger_run(
    request: Request,
    user: CanTrigger,
    policy: Annotated[str, Form()],
    since: Annotated[str, Form()],
    to: Annotated[str, Form()],
    client: Annotated[str, Form()] = "",
    csrf: Annotated[str | None, Form()] = None,
) -> HTMLResponse:
    """Trigger ``cdr_webhook`` with Params: the days' window, the policy and the client."""
    check_csrf(request, user, csrf)
    try:
        conf = forms.run_conf(policy=policy, since=since, to=to, client=client)
    except ValueError as err:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(err)) from None
    api = airflow_api.AirflowApi(api_base_url(), caller_token(request))
    try:
        run_id = api.trigger(conf)
    except airflow_api.AirflowApiError as err:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, str(err)) from None
    log.info("User %s triggered run %s with %s", user.get_name(), run_id, conf)
    return render(
        request, "result.html", user, action="Run", cleared=[], failures=[], not_cleared=[],
        runs=[(run_id, conf)], back=None,
    )  # fmt: skip


@router.post("/endpoints/{action}", response_class=HTMLResponse)
def pause_or_resume(
    request: Request,
    user: CanPause,
    conn: Conn,
    action: str,
    endpoint: Annotated[str, Form()],
    reason: Annotated[str, Form()] = "",
    csrf: Annotated[str | None, Form()] = None,
) -> RedirectResponse:
    """Pause or resume an endpoint, recording the Airflow user as the actor; back to the list."""
    check_csrf(request, user, csrf)
    actor = f"{user.get_name()} (Deliveries page)"
    if len(reason) > endpoints.MAX_REASON_CHARS:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            f"reason: {len(reason)} characters, at most {endpoints.MAX_REASON_CHARS}",
        )
    try:
        # Only a pause writes a row for a new name; a resume of an unknown one changes nothing.
        if action == "pause":
            endpoints.check_pausable(conn, endpoint)
        else:
            endpoints.check_name(endpoint)
    except endpoints.EndpointNameError as err:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(err)) from None
    if action == "pause":
        event = endpoints.pause(
            conn, endpoint, reason=reason.strip() or "paused from the Deliveries page", actor=actor
        )
    elif action == "resume":
        event = endpoints.resume(conn, endpoint, actor=actor, reason=reason.strip() or None)
    else:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no endpoint action {action!r}: pause or resume")
    if event is not None:
        notify_endpoint_event(event)
    return RedirectResponse(f"{prefix(request)}/endpoints", status_code=status.HTTP_303_SEE_OTHER)
