"""The DAG's schedule: its timetable alone, or with the commit watcher's asset (``AssetOrTimeSchedule``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, AssetOrTimeSchedule, AssetWatcher, get_parsing_context

if TYPE_CHECKING:
    from cdr_webhook.settings import Settings

#: The asset the watcher's events are recorded on: one per source relation, named after it.
ASSET_NAME = "cdr_webhook_commits"
WATCHER_NAME = "cdr_commits"


def asset_uri(source_relation: str) -> str:
    return f"cdr-webhook://cdr_db/{source_relation}"


def watched_schedule(timetable: Any, settings: Settings) -> Any:
    """
    The timetable, or (``watch_interval_seconds`` > 0) the timetable *or* an event of the watcher.

    The minute schedule stays either way: it is what delivers when no event comes (no triggerer, a
    lost event, a paused DAG unpaused); an event only starts a run sooner.
    """
    if not settings.watch_interval_seconds:
        return timetable
    if get_parsing_context().task_id is not None:
        # A task process parses the DAG file for its task alone; the schedule it builds is never used
        # (the scheduler and the triggerer read the dag-processor's serialized DAG), and the trigger's
        # import would only add to every post_cdr try's start-up.
        return timetable

    from cdr_webhook.watch.trigger import CdrCommitTrigger

    trigger = CdrCommitTrigger(
        source_relation=settings.source_relation, interval_seconds=settings.watch_interval_seconds
    )
    asset = Asset(
        name=ASSET_NAME,
        uri=asset_uri(settings.source_relation),
        watchers=[AssetWatcher(name=WATCHER_NAME, trigger=trigger)],
    )
    return AssetOrTimeSchedule(timetable=timetable, assets=[asset])
