"""The benchmark's floor: the shape of ``cdr_webhook`` (one select task, one mapped task per item), no work.

Only ``bench/harness.py`` puts this file in a DAGs folder. A run's ``conf`` gives ``n``, the number
of items; the mapped operator takes the same ``.partial()`` arguments as ``post_cdr`` (retries,
per-run concurrency from ``max_active_posts_per_run``, a map index template) and does nothing.
``bench_noop_deferred_dag.py`` is the same shape run by the triggerer.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from airflow.sdk import BaseOperator, dag, task

PER_RUN = int(os.environ.get("AIRFLOW__CDR_WEBHOOK__MAX_ACTIVE_POSTS_PER_RUN", "16"))


class NoopOperator(BaseOperator):
    """Takes an item, does nothing with it."""

    template_fields = ()

    def __init__(self, *, item: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.item = item

    def execute(self, context: Any) -> None:
        return None


@dag(
    dag_id="bench_noop",
    schedule=None,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=4,
    tags=["bench"],
)
def bench_noop() -> None:
    @task
    def select_items(**context: Any) -> list[dict[str, str]]:
        count = int(context["dag_run"].conf.get("n", 1))
        return [{"item": f"item-{index}"} for index in range(count)]

    NoopOperator.partial(
        task_id="noop",
        retries=3,
        retry_delay=dt.timedelta(seconds=1),
        max_active_tis_per_dagrun=PER_RUN,
        do_xcom_push=False,
        map_index_template="{{ task.item }}",
    ).expand_kwargs(select_items())


bench_noop()
