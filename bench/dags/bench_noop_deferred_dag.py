"""The floor's shape (an Airflow DAG) with each mapped task started and ended in the triggerer.

Only ``bench/harness.py --modes deferred`` uses it (docs/benchmarks.md, "A triggerer path?"). The
operator has ``start_from_trigger`` and ``start_trigger_args``: the scheduler defers each mapped
task instance at once (``TaskInstance.defer_task``), the triggerer runs ``bench_triggers.NoopTrigger``,
whose ``TaskSuccessEvent`` ends the task there (``airflow.models.trigger.handle_event_submit``).
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import dag
from airflow.triggers.base import StartTriggerArgs
from bench_shape import DAG_ARGS, ItemOperator, body


class DeferredNoopOperator(ItemOperator):
    """Starts in the triggerer, where the trigger ends it: ``execute`` never runs."""

    start_from_trigger = True
    start_trigger_args = StartTriggerArgs(
        trigger_cls="bench_triggers.NoopTrigger", next_method="execute", trigger_kwargs={}
    )

    def execute(self, context: Any) -> None:
        raise RuntimeError("bench_noop_deferred ran on a worker: the triggerer path was not taken")


dag(dag_id="bench_noop_deferred", **DAG_ARGS)(body(DeferredNoopOperator))()
