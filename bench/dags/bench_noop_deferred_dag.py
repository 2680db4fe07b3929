"""The floor's shape with each mapped task started and ended in the triggerer, never on a worker.

Only ``bench/harness.py --modes deferred`` uses it (docs/benchmarks.md, "A triggerer path?"). The
operator has ``start_from_trigger`` and ``start_trigger_args``: the scheduler defers each mapped
task instance at once (``TaskInstance.defer_task``), the triggerer runs ``bench_triggers.NoopTrigger``,
whose ``TaskSuccessEvent`` ends the task there (``airflow.models.trigger.handle_event_submit``).
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from airflow.sdk import BaseOperator, dag, task
from airflow.triggers.base import StartTriggerArgs

PER_RUN = int(os.environ.get("AIRFLOW__CDR_WEBHOOK__MAX_ACTIVE_POSTS_PER_RUN", "16"))


class DeferredNoopOperator(BaseOperator):
    """Takes an item; starts in the triggerer, where the trigger ends it: ``execute`` never runs."""

    template_fields = ()
    start_from_trigger = True
    start_trigger_args = StartTriggerArgs(
        trigger_cls="bench_triggers.NoopTrigger", next_method="execute", trigger_kwargs={}
    )

    def __init__(self, *, item: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.item = item

    def execute(self, context: Any) -> None:
        raise RuntimeError("bench_noop_deferred ran on a worker: the triggerer path was not taken")


@dag(
    dag_id="bench_noop_deferred",
    schedule=None,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=4,
    tags=["bench"],
)
def bench_noop_deferred() -> None:
    @task
    def select_items(**context: Any) -> list[dict[str, str]]:
        count = int(context["dag_run"].conf.get("n", 1))
        return [{"item": f"item-{index}"} for index in range(count)]

    DeferredNoopOperator.partial(
        task_id="noop",
        retries=3,
        retry_delay=dt.timedelta(seconds=1),
        max_active_tis_per_dagrun=PER_RUN,
        do_xcom_push=False,
        map_index_template="{{ task.item }}",
    ).expand_kwargs(select_items())


bench_noop_deferred()
