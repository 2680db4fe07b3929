"""The bench's trigger: ends its task at once, in the triggerer (``bench_noop_deferred``).

No DAG here; the harness copies this module beside the DAG files, where the triggerer imports it
by its classpath ``bench_triggers.NoopTrigger`` (the DAGs folder is on ``sys.path``).
"""

from __future__ import annotations

from typing import Any

from airflow.triggers.base import BaseTrigger, TaskSuccessEvent


class NoopTrigger(BaseTrigger):
    """Yields ``TaskSuccessEvent`` at once: the task succeeds without ever reaching a worker."""

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return "bench_triggers.NoopTrigger", {}

    async def run(self):  # type: ignore[override]
        ti = self.task_instance
        self.log.info("no-op item %s of %s", getattr(ti, "map_index", None), getattr(ti, "run_id", None))
        yield TaskSuccessEvent()
