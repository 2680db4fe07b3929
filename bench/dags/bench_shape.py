"""The shape of ``cdr_webhook`` for the bench's DAGs: a select task returns N items, one mapped task each.

No DAG here: each DAG file applies ``@dag(**DAG_ARGS)`` to ``body(its operator)`` and calls it
itself, so that Airflow records the DAG file (not this module) as the DAG's file. The mapped
operator takes the same ``.partial()`` arguments as ``post_cdr`` (retries, per-run concurrency from
``max_active_posts_per_run``, a map index template). A run's ``conf`` gives ``n``.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, task

if TYPE_CHECKING:
    from collections.abc import Callable

PER_RUN = int(os.environ.get("AIRFLOW__CDR_WEBHOOK__MAX_ACTIVE_POSTS_PER_RUN", "16"))
DAG_ARGS: dict[str, Any] = {
    "schedule": None,
    "start_date": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    "catchup": False,
    "max_active_runs": 4,
    "tags": ["bench"],
}


class ItemOperator(BaseOperator):
    """Takes one item (what ``post_cdr`` takes a ``cdr_id`` as)."""

    template_fields = ()

    def __init__(self, *, item: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.item = item


def body(operator: type[ItemOperator]) -> Callable[[], None]:
    """The DAG's body: ``select_items`` → ``operator`` mapped over its items."""

    def shape() -> None:
        @task
        def select_items(**context: Any) -> list[dict[str, str]]:
            count = int(context["dag_run"].conf.get("n", 1))
            return [{"item": f"item-{index}"} for index in range(count)]

        operator.partial(
            task_id="noop",
            retries=3,
            retry_delay=dt.timedelta(seconds=1),
            max_active_tis_per_dagrun=PER_RUN,
            do_xcom_push=False,
            map_index_template="{{ task.item }}",
        ).expand_kwargs(select_items())

    return shape
