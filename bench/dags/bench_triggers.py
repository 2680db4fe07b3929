"""The bench's trigger: ends its task at once, in the triggerer (``bench_noop_deferred``).

No DAG here; the harness copies this module beside the DAG files and puts that folder on the
triggerer's ``PYTHONPATH``, where the triggerer imports it by its classpath
``bench_triggers.NoopTrigger``.
"""

from __future__ import annotations

from typing import Any

from airflow.triggers.base import BaseTrigger, TaskFailedEvent, TaskSuccessEvent


class NoopTrigger(BaseTrigger):
    """
    Yields ``TaskSuccessEvent`` at once: the task succeeds without ever reaching a worker.

    A run whose conf has ``fail_first_try_every: k`` fails the first try of every k-th map index
    with ``TaskFailedEvent`` instead (to see retries and ``try_number`` on this path).
    """

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return "bench_triggers.NoopTrigger", {}

    async def run(self):  # type: ignore[override]
        ti = self.task_instance
        dag_run = getattr(getattr(ti, "_ti_context_from_server", None), "dag_run", None)
        every = int((getattr(dag_run, "conf", None) or {}).get("fail_first_try_every", 0))
        self.log.info("no-op item %s of %s, try %s", ti.map_index, ti.run_id, ti.try_number)
        if every and ti.map_index % every == 0 and ti.try_number == 1:
            yield TaskFailedEvent()
            return
        yield TaskSuccessEvent()
