"""Claims: which run, and which of its tasks, owns a CDR's ledger row, and the start of each attempt.

A task POSTs a CDR only while its run owns the row (:func:`start_attempts`); a run's claims stay
alive while it works (:func:`keep_claims_alive`) and go back to the queue, unowned, when it cannot
send them (:func:`release_many`). What a run asked for is kept beside its claims, so a cleared select
step maps exactly what it had claimed.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from psycopg import sql
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from cdr_webhook.outcome import Claim, DeliveryStatus

if TYPE_CHECKING:
    from collections.abc import Sequence

    import psycopg


@dataclasses.dataclass(frozen=True)
class NotStarted:
    """Why a CDR's attempt was not started: the reason, the row's status, and whether this run owns it."""

    reason: str
    status: str | None
    this_run: bool = False


CLAIM_COLUMNS = sql.SQL("d.cdr_id, d.endpoint, d.client_id, d.cdr_created_at, d.status, d.attempts")


def owned_claims(conn: psycopg.Connection[Any], *, dag_id: str, run_id: str) -> list[Claim]:
    """
    Return the sendable CDRs a run claimed for its current request (its select task was cleared).

    Claims and the request are written in one transaction, so they share its ``now()``: rows the
    run claimed for an earlier request (before a reprocessing backfill gave it new Params) are older.
    """
    query = sql.SQL(
        "SELECT {columns} FROM cdr_webhook.delivery AS d "
        "JOIN cdr_webhook.run_selection AS r ON r.dag_id = d.dag_id AND r.run_id = d.run_id "
        "WHERE d.dag_id = %s AND d.run_id = %s AND d.status <> 'skipped' AND d.claimed_at >= r.selected_at "
        "ORDER BY d.cdr_created_at, d.cdr_id"
    ).format(columns=CLAIM_COLUMNS)
    with conn.cursor(row_factory=class_row(Claim)) as cur:
        return cur.execute(query, (dag_id, run_id)).fetchall()


def recorded_request(conn: psycopg.Connection[Any], *, dag_id: str, run_id: str) -> dict[str, Any] | None:
    """Return what the run asked for when it last claimed CDRs, or None if it never did."""
    row = conn.execute(
        "SELECT request FROM cdr_webhook.run_selection WHERE dag_id = %s AND run_id = %s", (dag_id, run_id)
    ).fetchone()
    return row[0] if row else None


def record_request(
    conn: psycopg.Connection[Any], *, dag_id: str, run_id: str, request: dict[str, Any]
) -> None:
    """Remember what the run asked for (in the transaction of its claims)."""
    conn.execute(
        "INSERT INTO cdr_webhook.run_selection (dag_id, run_id, request) VALUES (%s, %s, %s) "
        "ON CONFLICT (dag_id, run_id) DO UPDATE SET request = EXCLUDED.request, selected_at = now()",
        (dag_id, run_id, Jsonb(request)),
    )


#: :func:`start_attempts`'s statement: the rows this task may send now, taken by it.
_START_ATTEMPTS = sql.SQL(
    "UPDATE cdr_webhook.delivery AS d SET dag_id = %(dag_id)s, run_id = %(run_id)s, "
    "map_index = %(map_index)s, status = 'queued', updated_at = now() "
    "FROM unnest(%(cdr_ids)s::text[], %(endpoints)s::text[]) AS c(cdr_id, endpoint) "
    "WHERE d.cdr_id = c.cdr_id AND d.endpoint = c.endpoint AND ("
    "  (d.dag_id = %(dag_id)s AND d.run_id = %(run_id)s AND d.status = ANY(%(own)s)) "
    "  OR (d.status = 'queued' AND ("
    "    d.run_id IS NULL OR d.updated_at < now() - make_interval(secs => %(timeout)s)))) "
    "RETURNING {columns}"
)


def start_attempts(
    conn: psycopg.Connection[Any],
    *,
    cdr_ids: Sequence[str],
    endpoint: str | Sequence[str],
    dag_id: str,
    run_id: str,
    map_index: int,
    claim_timeout_seconds: int,
    own_statuses: Sequence[str] = tuple(DeliveryStatus),
) -> tuple[list[Claim], dict[str, NotStarted]]:
    """
    Start an attempt on each of ``cdr_ids`` this task may POST now, in one statement, recording the
    task as its owner; return the claims (oldest first) and, for every other CDR, why it is not sent.

    A task may send when its own run owns the row (its first try, a retry, or a cleared try, which
    re-sends on purpose even a delivered CDR), or when the row is queued and no live run owns it
    (unowned, or its owner's claim went stale). A row another run owns is not sent: that run is
    delivering it, or delivered it already, and only a clear of *its* task re-sends it. Starting also
    refreshes every queued claim of this run, so claims of a live run never go stale while its other
    tasks wait for a worker.

    ``own_statuses``: the statuses of its own run's rows that are sent again. A chunk's retry sends
    only ``queued`` rows: its delivered and failed CDRs stay as they are. ``endpoint``: the CDRs'
    endpoint, or each one's (a task of many endpoints starts them all in one statement).
    """
    query = _START_ATTEMPTS.format(columns=CLAIM_COLUMNS)
    endpoints = [endpoint] * len(cdr_ids) if isinstance(endpoint, str) else list(endpoint)
    params = {
        "cdr_ids": list(cdr_ids),
        "endpoints": endpoints,
        "dag_id": dag_id,
        "run_id": run_id,
        "map_index": map_index,
        "timeout": claim_timeout_seconds,
        "own": list(own_statuses),
    }
    with conn.transaction(), conn.cursor(row_factory=class_row(Claim)) as cur:
        claims = cur.execute(query, params).fetchall()
    if claims:
        keep_claims_alive(conn, dag_id=dag_id, run_id=run_id, claim_timeout_seconds=claim_timeout_seconds)
    claims.sort(key=lambda claim: (claim.cdr_created_at, claim.cdr_id))
    taken = {(claim.cdr_id, claim.endpoint) for claim in claims}
    missing = [pair for pair in dict.fromkeys(zip(cdr_ids, endpoints, strict=True)) if pair not in taken]
    if not missing:
        return claims, {}
    return claims, _not_started(conn, missing, dag_id=dag_id, run_id=run_id)


def _not_started(
    conn: psycopg.Connection[Any], missing: Sequence[tuple[str, str]], *, dag_id: str, run_id: str
) -> dict[str, NotStarted]:
    """Why each ``(cdr_id, endpoint)`` was not started by this run's task: no row, or whose row it is now."""
    owners = {
        (row[0], row[1]): row[2:]
        for row in conn.execute(
            "SELECT d.cdr_id, d.endpoint, d.dag_id, d.run_id, d.map_index, d.status "
            "FROM cdr_webhook.delivery AS d JOIN unnest(%s::text[], %s::text[]) AS c(cdr_id, endpoint) "
            "ON d.cdr_id = c.cdr_id AND d.endpoint = c.endpoint",
            ([cdr_id for cdr_id, _ in missing], [endpoint for _, endpoint in missing]),
        ).fetchall()
    }
    lost = {}
    for cdr_id, endpoint in missing:
        owner = owners.get((cdr_id, endpoint))
        if owner is None:
            lost[cdr_id] = NotStarted(f"CDR {cdr_id!r} has no ledger row for endpoint {endpoint!r}", None)
            continue
        other_dag, other_run, other_index, status = owner
        if (other_dag, other_run) == (dag_id, run_id):
            lost[cdr_id] = NotStarted(
                f"CDR {cdr_id!r} is {status} (an earlier try of this run)", status, True
            )
            continue
        task = f"run {other_run!r}" + (f", map index {other_index}" if other_index is not None else "")
        if status == "queued":
            reason = f"CDR {cdr_id!r} for endpoint {endpoint!r} is being delivered by {task}"
        else:
            reason = (
                f"CDR {cdr_id!r} for endpoint {endpoint!r} belongs to {task} (status {status}): clear that "
                "task to send it again"
            )
        lost[cdr_id] = NotStarted(reason, status)
    return lost


def keep_claims_alive(
    conn: psycopg.Connection[Any], *, dag_id: str, run_id: str, claim_timeout_seconds: int
) -> None:
    """
    Mark the run's queued claims as alive, so that none goes stale while the run still works (every
    try's start, and a long chunk between its batches, call it).

    Its own statement, after the try's claim has committed, and ``SKIP LOCKED``: tries of one run
    running at once would otherwise lock each other's rows in opposite orders (a deadlock). Only rows
    untouched for a quarter of the claim timeout are rewritten, so a run's tries do not rewrite all
    its claims on every try.
    """
    conn.execute(
        "UPDATE cdr_webhook.delivery AS d SET updated_at = now() FROM ("
        "  SELECT cdr_id, endpoint FROM cdr_webhook.delivery "
        "  WHERE dag_id = %(dag_id)s AND run_id = %(run_id)s AND status = 'queued' "
        "    AND updated_at < now() - make_interval(secs => %(age)s) "
        "  FOR UPDATE SKIP LOCKED) AS alive "
        "WHERE d.cdr_id = alive.cdr_id AND d.endpoint = alive.endpoint",
        {"dag_id": dag_id, "run_id": run_id, "age": claim_timeout_seconds / 4},
    )


def release_many(
    conn: psycopg.Connection[Any], claims: Sequence[Claim], *, reason: str | None = None
) -> None:
    """
    Give CDRs back to the queue, unowned, in one statement: the next run takes them, in order;
    ``reason``: why they wait.
    """
    if not claims:
        return
    conn.execute(
        "UPDATE cdr_webhook.delivery AS d SET status = 'queued', dag_id = NULL, run_id = NULL, "
        "map_index = NULL, error = COALESCE(%s, d.error), updated_at = now() "
        "FROM unnest(%s::text[], %s::text[]) AS c(cdr_id, endpoint) "
        "WHERE d.cdr_id = c.cdr_id AND d.endpoint = c.endpoint",
        (reason, [claim.cdr_id for claim in claims], [claim.endpoint for claim in claims]),
    )
