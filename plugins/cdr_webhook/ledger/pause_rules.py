"""The automatic pause: each endpoint's decided attempts counted, and the rules that pause it.

An endpoint is paused by an HTTP 410, by ``pause_after_failures`` failed deliveries in a row, by every
attempt failing for ``pause_after_minutes``, or by no success for ``pause_after_hours``; its row in
``cdr_webhook.endpoint_state`` keeps the counts (:mod:`cdr_webhook.ledger.endpoints` pauses it).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from cdr_webhook.ledger.endpoints import AUTOMATIC_ACTOR, GONE_REASON, EndpointEvent, set_paused
from cdr_webhook.outcome import Decision, Verdict

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import psycopg


#: One upsert counts the outcomes of many endpoints and locks their rows until commit (in the
#: endpoints' order, so that two tasks never lock the same rows in opposite orders): concurrent
#: outcomes of one endpoint queue on its row, so every count is exact and only one of them can see a
#: threshold crossed. The proposed row carries the call's counts: ``consecutive_failures`` the failed
#: deliveries since the last success among them, ``failed_attempts`` the attempts since it, and
#: ``last_success_at`` is set only when one of them was delivered.
_COUNT_OUTCOMES = (
    "INSERT INTO cdr_webhook.endpoint_state AS s "
    "(endpoint, consecutive_failures, failing_since, last_success_at, failed_attempts, "
    "attempts_failing_since) "
    "SELECT o.endpoint, o.counted, CASE WHEN o.counted > 0 THEN now() END, CASE WHEN o.ok THEN now() END, "
    "o.failed, CASE WHEN o.failed > 0 THEN now() END "
    "FROM unnest(%(endpoints)s::text[], %(ok)s::bool[], %(counted)s::int[], %(failed)s::int[]) "
    "AS o(endpoint, ok, counted, failed) ORDER BY o.endpoint "
    "ON CONFLICT (endpoint) DO UPDATE SET "
    "consecutive_failures = CASE WHEN EXCLUDED.last_success_at IS NOT NULL THEN 0 "
    "  ELSE s.consecutive_failures END + EXCLUDED.consecutive_failures, "
    "failing_since = CASE WHEN EXCLUDED.last_success_at IS NOT NULL THEN EXCLUDED.failing_since "
    "  WHEN EXCLUDED.consecutive_failures > 0 THEN COALESCE(s.failing_since, now()) "
    "  ELSE s.failing_since END, "
    "last_success_at = COALESCE(EXCLUDED.last_success_at, s.last_success_at), "
    "failed_attempts = CASE WHEN EXCLUDED.last_success_at IS NOT NULL THEN 0 ELSE s.failed_attempts END "
    "  + EXCLUDED.failed_attempts, "
    "attempts_failing_since = CASE WHEN EXCLUDED.last_success_at IS NOT NULL "
    "  THEN EXCLUDED.attempts_failing_since "
    "  WHEN EXCLUDED.failed_attempts > 0 THEN COALESCE(s.attempts_failing_since, now()) "
    "  ELSE s.attempts_failing_since END, "
    "updated_at = now() "
    "RETURNING endpoint, paused, consecutive_failures, "
    "COALESCE(failing_since <= now() - make_interval(secs => %(secs)s), false), "
    "extract(epoch FROM now() - failing_since)::float8, "
    "COALESCE(attempts_failing_since <= now() - make_interval(secs => %(attempt_secs)s), false), "
    "extract(epoch FROM now() - attempts_failing_since)::float8"
)


@dataclasses.dataclass(frozen=True)
class PauseRules:
    """When an endpoint is paused automatically (the ``pause_after_*`` settings)."""

    pause_after_failures: int
    pause_after_hours: float
    pause_after_minutes: float = 30.0

    def __post_init__(self) -> None:
        if (
            self.pause_after_failures < 1
            or not self.pause_after_hours > 0
            or not self.pause_after_minutes > 0
        ):
            raise ValueError(
                f"pause_after_failures ({self.pause_after_failures}) must be at least 1, and "
                f"pause_after_hours ({self.pause_after_hours}) and pause_after_minutes "
                f"({self.pause_after_minutes}) greater than 0"
            )


def record_outcomes(
    conn: psycopg.Connection[Any],
    endpoint: str,
    decisions: Sequence[Decision],
    *,
    pause_after_failures: int,
    pause_after_hours: float,
    pause_after_minutes: float = 30.0,
    actor: str = AUTOMATIC_ACTOR,
) -> EndpointEvent | None:
    """Count one endpoint's decided attempts (see :func:`record_many_outcomes`); its pause event, if any."""
    rules = PauseRules(pause_after_failures, pause_after_hours, pause_after_minutes)
    events = record_many_outcomes(conn, {endpoint: decisions}, rules, actor=actor)
    return events[0] if events else None


def record_many_outcomes(
    conn: psycopg.Connection[Any],
    outcomes: Mapping[str, Sequence[Decision]],
    rules: PauseRules,
    *,
    actor: str = AUTOMATIC_ACTOR,
) -> list[EndpointEvent]:
    """
    Count the decided attempts of each endpoint, each in the order given, in one statement (a task's).

    Every attempt moves ``failed_attempts`` (the failing attempts in a row, which the select step
    reads to throttle the endpoint); only a delivery's end (``final``: delivered, failed at once, or
    retries exhausted) counts in ``consecutive_failures``, whatever its tries. The counts end as one
    call per attempt would leave them: a delivery resets them, so only the attempts after the last
    delivery count. Pause rules: an HTTP 410 (``gone``) among them; ``pause_after_failures`` failed
    deliveries in a row; every attempt failed (retryable ones too) for ``pause_after_minutes``; or no
    success since the first failed delivery ``pause_after_hours`` ago, checked on the counts at the
    end. Returns the events of the endpoints this call paused.
    """
    counts: dict[str, tuple[bool, int, int, bool]] = {}
    for endpoint, decisions in outcomes.items():
        if not decisions:
            continue
        delivered_at = [i for i, decision in enumerate(decisions) if decision.verdict is Verdict.DELIVERED]
        tail = decisions[delivered_at[-1] + 1 :] if delivered_at else decisions
        counted = sum(1 for decision in tail if decision.final)  # failed deliveries since the last success
        counts[endpoint] = (bool(delivered_at), counted, len(tail), any(d.gone for d in decisions))
    if not counts:
        return []
    names = sorted(counts)
    params = {
        "endpoints": names,
        "ok": [counts[name][0] for name in names],
        "counted": [counts[name][1] for name in names],
        "failed": [counts[name][2] for name in names],
        "secs": rules.pause_after_hours * 3600.0,
        "attempt_secs": rules.pause_after_minutes * 60.0,
    }
    events = []
    with conn.transaction():
        for row in conn.execute(_COUNT_OUTCOMES, params).fetchall():
            (
                endpoint,
                paused,
                failures,
                failing_too_long,
                failing_seconds,
                attempts_too_long,
                attempts_seconds,
            ) = row
            _, counted, failed, gone = counts[endpoint]
            attempts_too_long = attempts_too_long and failed > 0
            if paused or not (counted or gone or attempts_too_long):
                continue
            reason = _pause_reason(
                gone=gone,
                failures=failures,
                failing_seconds=failing_seconds if failing_too_long else None,
                attempts_failing_seconds=attempts_seconds if attempts_too_long else None,
                pause_after_failures=rules.pause_after_failures,
                pause_after_hours=rules.pause_after_hours,
                pause_after_minutes=rules.pause_after_minutes,
            )
            event = None if reason is None else set_paused(conn, endpoint, reason, actor)
            if event is not None:
                events.append(event)
    return events


def _pause_reason(
    *,
    gone: bool,
    failures: int,
    failing_seconds: float | None,
    attempts_failing_seconds: float | None,
    pause_after_failures: int,
    pause_after_hours: float,
    pause_after_minutes: float,
) -> str | None:
    """
    Why the endpoint is paused now, or None; ``failing_seconds`` only once ``pause_after_hours``
    passed, ``attempts_failing_seconds`` once ``pause_after_minutes`` did.
    """
    if gone:
        return GONE_REASON
    if failures >= pause_after_failures:
        return f"{failures} consecutive failed deliveries (pause_after_failures = {pause_after_failures})"
    if attempts_failing_seconds is not None:
        return (
            f"every attempt failed for {attempts_failing_seconds / 60:.3g} min, retries included "
            f"(pause_after_minutes = {pause_after_minutes:g})"
        )
    if failing_seconds is not None:
        return (
            f"no successful delivery for {failing_seconds / 3600:.3g} h "
            f"(pause_after_hours = {pause_after_hours:g})"
        )
    return None
