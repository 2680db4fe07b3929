"""The benchmark's floor (an Airflow DAG): the shape of ``cdr_webhook`` (bench_shape.py), and no work.

Only ``bench/harness.py`` puts this file in a DAGs folder. ``bench_noop_deferred_dag.py`` is the same
shape run by the triggerer.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import dag
from bench_shape import DAG_ARGS, ItemOperator, body


class NoopOperator(ItemOperator):
    """Does nothing with its item."""

    def execute(self, context: Any) -> None:
        return None


dag(dag_id="bench_noop", **DAG_ARGS)(body(NoopOperator))()
