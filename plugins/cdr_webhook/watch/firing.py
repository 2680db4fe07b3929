"""When the commit watcher starts a run: the decision on what the database says. Pure (no Airflow, no I/O).

The watcher compares the newest ``created_at`` of the source relation with what is already covered:
the ledger's watermark (every scan reads up to it) or, newer still, what the watcher last fired a run
for. Rows newer than both are new commits no run has been asked for yet. A run that took a full
``max_cdrs_per_run`` and left CDRs queued, or the resume of a paused endpoint, asks for another run
the same way (``more_at``). Fires are
at least ``min_gap_seconds`` apart, so events that arrive while a run is starting coalesce.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datetime as dt

#: Seconds between two polls when the source table carries the NOTIFY trigger: a notification wakes the
#: watcher at once, and the poll only catches one that was lost (a hint, not a queue).
NOTIFY_FALLBACK_SECONDS = 15.0


#: Polls per ``watch_interval_seconds`` without the NOTIFY trigger. A commit waits for the next poll,
#: then for the triggerer's hand-off (once a second): two polls an interval take half an interval off
#: the worst case (for two index probes a poll), while fires stay at least the interval apart.
POLLS_PER_INTERVAL = 2


#: Seconds after a fire whose rows no scan has read yet (the watermark is still before them) when the
#: watcher fires again: the run it asked for was never started (an event while the DAG was being
#: paused, apache/airflow#49857) or waits (``max_active_runs`` reached, #56050). At most one such
#: fire per this many seconds; a run it starts for rows another run took finds nothing.
REFIRE_SECONDS = 15.0


#: Seconds between two source checks of the watcher while the source check fails. Every run would fail
#: at that check without moving the watermark, so a fire per commit would start a failing run per
#: commit: the watcher starts none and leaves runs to the schedule (one per interval, each failing
#: with the reason) until its own check passes again.
SOURCE_RECHECK_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class WatchState:
    """The database's view of one source relation, read on every poll (one row each)."""

    now: dt.datetime  # the database's clock, the one created_at and fired_at are written with
    watermark: dt.datetime | None  # the ledger's scan end; None before the first scan
    initialized: bool  # a watch_state row exists
    started_from: dt.datetime | None = None
    fired_through: dt.datetime | None = None
    fired_at: dt.datetime | None = None
    more_at: dt.datetime | None = None

    @property
    def fired_for(self) -> dt.datetime | None:
        """
        The newest created_at the last fire asked a run for: never later than the fire itself, so a
        row dated ahead of the clock (recorded by a watcher that counted such rows) holds no fire back
        and asks for no refire after a scan passed the fire's time.
        """
        if self.fired_through is None or self.fired_at is None:
            return self.fired_through
        return min(self.fired_through, self.fired_at)

    @property
    def covered(self) -> dt.datetime | None:
        """The newest created_at a run has scanned or been asked for; rows newer than it are new."""
        known = [t for t in (self.watermark, self.fired_for, self.started_from) if t is not None]
        return max(known) if known else None

    def unscanned_fire(self, refire_seconds: float) -> bool:
        """The last fire is ``refire_seconds`` old and no scan has read its rows yet."""
        fired_for = self.fired_for
        if fired_for is None or self.fired_at is None:
            return False
        if self.watermark is not None and self.watermark > fired_for:
            return False
        return (self.now - self.fired_at).total_seconds() >= refire_seconds

    @property
    def needs_baseline(self) -> bool:
        """
        First start with no scan ever: what the source holds now is history (a backfill's job, as for
        the first scheduled run), so the watcher records where it starts instead of firing for it.
        """
        return not self.initialized and self.watermark is None


@dataclasses.dataclass(frozen=True)
class Decision:
    """Fire now (``reason`` says why), or wait ``wait_seconds`` before looking again."""

    fire: bool
    reason: str
    wait_seconds: float = 0.0
    due: bool = False  # a fire is due but too soon after the last: the wait is the rest of the gap


def when_to_fire(
    state: WatchState, newest: dt.datetime | None, *, min_gap_seconds: float, poll_seconds: float
) -> Decision:
    """
    Decide on one poll: fire for commits newer than :attr:`WatchState.covered` or a run's request for
    more, unless the last fire is less than ``min_gap_seconds`` old; otherwise wait ``poll_seconds``.
    """
    covered = state.covered
    new_rows = newest is not None and (covered is None or newest > covered)
    more = state.more_at is not None and (state.fired_at is None or state.more_at > state.fired_at)
    unscanned = state.unscanned_fire(max(REFIRE_SECONDS, 5 * min_gap_seconds))
    if not (new_rows or more or unscanned):
        return Decision(False, "nothing new", poll_seconds)
    if new_rows and newest is not None:
        reason = (
            f"CDRs committed up to created_at {newest.isoformat()} (covered up to "
            f"{covered.isoformat() if covered else 'nothing'})"
        )
    elif more:
        reason = "queued CDRs wait for a run (a run was full, or an endpoint was resumed)"
    else:
        reason = "no run has scanned the CDRs of the last event yet (paused, or max_active_runs reached?)"
    if state.fired_at is not None:
        since = (state.now - state.fired_at).total_seconds()
        if 0 <= since < min_gap_seconds:
            wait = min_gap_seconds - since
            return Decision(False, f"{reason}; the last run was asked for {since:.1f} s ago", wait, True)
    return Decision(True, reason)


def poll_seconds(interval_seconds: float, *, notify_installed: bool) -> float:
    """
    How long the watcher waits between polls: the fallback when NOTIFY wakes it; else a part of the
    interval (:data:`POLLS_PER_INTERVAL`; fires stay at least the interval apart either way).
    """
    if notify_installed:
        return max(interval_seconds, NOTIFY_FALLBACK_SECONDS)
    return interval_seconds / POLLS_PER_INTERVAL
