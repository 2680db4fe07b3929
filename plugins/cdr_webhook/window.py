"""Which CDRs a run selects: the watermark scan of scheduled runs, or the window of other runs. Pure.

Scheduled runs read ``[watermark - lag, data_interval_end)``. Backfill and manual runs read a
half-open window over ``created_at``: the Params ``window_start``/``window_end`` when given, else
the run's data interval, and pick CDRs by ``policy``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

POLICIES: tuple[str, ...] = ("missing", "failed", "all")
SCHEDULED = "scheduled"
#: A run the commit watcher's asset event started (cdr_webhook.watch): it scans like a scheduled run.
ASSET_TRIGGERED = "asset_triggered"
#: The run types that scan from the watermark; every other run selects by a window.
SCANNING: tuple[str, ...] = (SCHEDULED, ASSET_TRIGGERED)


class InvalidRunRequest(ValueError):
    """A run whose Params or interval cannot be turned into a selection; the message says which."""


@dataclasses.dataclass(frozen=True)
class Scan:
    """A scheduled run's scan: from the watermark minus the safety lag up to the interval's end."""

    start: dt.datetime
    end: dt.datetime


@dataclasses.dataclass(frozen=True)
class Window:
    """A backfill or manual run's half-open window ``[start, end)``, policy and optional client."""

    start: dt.datetime
    end: dt.datetime
    policy: str = "missing"
    client_id: int | None = None


def plan_scan(
    *,
    watermark: dt.datetime | None,
    interval_start: dt.datetime,
    interval_end: dt.datetime,
    lag_seconds: int,
    start_from: dt.datetime | None,
) -> Scan:
    """
    Return the scan of a scheduled run.

    With no stored watermark (the very first run) the scan starts at ``start_from`` when set, else at
    the run's own interval start: history is a backfill's job, not a flood on the first minute.
    """
    if watermark is None:
        start = start_from if start_from is not None else interval_start
    else:
        start = watermark - dt.timedelta(seconds=lag_seconds)
    return Scan(start=min(start, interval_end), end=interval_end)


def event_scan_bounds(
    *, now: dt.datetime, watch_started_from: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    """
    The ``(interval_start, interval_end)`` an event-started run scans as, for :func:`plan_scan`.

    Airflow gives an asset-triggered run no data interval. Its scan ends at ``now``, the CDR
    database's clock when the select step runs, as a scheduled run's ends at its interval end: the
    watermark moves to exactly what was scanned, and a commit still in flight then (``created_at``
    before the end, visible after) is read again by the next scan, which starts ``lag_seconds``
    before the watermark. With no watermark yet (the first scan ever) it starts where the watcher
    started watching (older rows are history, as for the first scheduled run); without even that,
    the scan is empty and only moves the watermark.
    """
    start = watch_started_from if watch_started_from is not None else now
    # started_from is the newest row the watcher found as history: the scan starts just after it.
    return min(start + dt.timedelta(microseconds=1), now), now


def plan_window(
    *,
    params: Mapping[str, Any],
    interval_start: dt.datetime | None,
    interval_end: dt.datetime | None,
    now: dt.datetime,
) -> Window:
    """Return the window of a backfill or manual run from its Params, else from its data interval."""
    start = _param_time(params, "window_start")
    end = _param_time(params, "window_end")
    if start is None:
        start = interval_start
    if end is None:
        end = interval_end
    if start is None or end is None:
        raise InvalidRunRequest(
            "this run has no data interval (it was triggered without a logical date): give both "
            "Params window_start and window_end"
        )
    if end <= start:
        raise InvalidRunRequest(
            f"window_end ({end.isoformat()}) must be after window_start ({start.isoformat()})"
        )
    if end > now:
        raise InvalidRunRequest(
            f"window_end ({end.isoformat()}) is in the future (now {now.isoformat()}): CDRs created "
            "after now would be missed by this run; pick an end in the past"
        )
    policy = params.get("policy") or "missing"
    if policy not in POLICIES:
        raise InvalidRunRequest(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
    client_id = params.get("client_id")
    if client_id is not None and (isinstance(client_id, bool) or not isinstance(client_id, int)):
        try:
            client_id = int(str(client_id).strip())
        except ValueError:
            raise InvalidRunRequest(f"client_id {client_id!r} is not a whole number") from None
    return Window(start=start, end=end, policy=policy, client_id=client_id)


def _param_time(params: Mapping[str, Any], name: str) -> dt.datetime | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        parsed = value
    else:
        try:
            parsed = dt.datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
        except ValueError:
            raise InvalidRunRequest(
                f"{name} {value!r} is not an ISO 8601 timestamp (e.g. 2026-11-28T09:00:00+00:00)"
            ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)  # the trigger form's times are UTC
    return parsed
