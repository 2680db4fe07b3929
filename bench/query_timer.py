"""Timings of the project's query functions over a loaded dataset: p50/p95/max, and each one's plans."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from psycopg import sql

from bench.stats import percentile

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    import psycopg


class QueryTimer:
    """Times calls whose writes are rolled back, and writes the plans of the SQL each one sent."""

    def __init__(self, conn: psycopg.Connection[Any], repeat: int, plans: Path) -> None:
        self.conn = conn
        self.repeat = repeat
        self.plans = plans.open("w")
        self.rows: list[tuple[str, list[float], str]] = []

    def time(self, name: str, call: Callable[[], Any], *, repeat: int | None = None) -> Any:
        """Run ``call`` (rolled back) ``repeat`` times; record the timings and the plans of its SQL."""
        timings = []
        result = None
        for _ in range(repeat or self.repeat):
            with self.conn.transaction(force_rollback=True):
                began = time.perf_counter()
                result = call()
                timings.append((time.perf_counter() - began) * 1000)
        with self.recording() as recorded, self.conn.transaction(force_rollback=True):
            call()
        self.explain(name, recorded)
        size = len(result) if isinstance(result, list | dict) else result
        self.rows.append((name, timings, "" if size is None or not isinstance(size, int) else str(size)))
        p50, p95 = percentile(timings, 50), percentile(timings, 95)
        print(f"  {name:<58} p50 {p50:8.1f}  p95 {p95:8.1f}  max {max(timings):8.1f} ms", flush=True)
        return result

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[tuple[Any, Any]]]:
        recorded: list[tuple[Any, Any]] = []
        self.conn.recorded = recorded  # type: ignore[attr-defined]
        try:
            yield recorded
        finally:
            self.conn.recorded = None  # type: ignore[attr-defined]

    def explain(self, name: str, statements: list[tuple[Any, Any]]) -> None:
        """EXPLAIN ANALYZE the statements in one rolled-back transaction (a set_config is run as is)."""
        self.plans.write(f"\n===== {name} =====\n")
        with self.conn.transaction(force_rollback=True):
            for query, params in statements:
                text = query if isinstance(query, str) else query.as_string(self.conn)
                words = text.lstrip().upper()
                if words.startswith(("SELECT PG_ADVISORY", "SAVEPOINT", "RELEASE", "ROLLBACK")):
                    continue
                if "SET_CONFIG(" in words:  # without_jit: what the statements after it ran under
                    self.conn.execute(query, params)
                    self.plans.write(f"\n-- (run) {' '.join(text.split())}\n")
                    continue
                self.plans.write(f"\n-- {' '.join(text.split())[:400]}\n")
                explain = sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + sql.SQL(text)  # type: ignore[arg-type]
                for (line,) in self.conn.execute(explain, params).fetchall():
                    self.plans.write(line + "\n")
        self.plans.flush()

    def table(self, title: str) -> None:
        print(f"\n{title}\n")
        print("| query | p50 ms | p95 ms | max ms | rows |\n| --- | ---: | ---: | ---: | ---: |")
        for name, timings, size in self.rows:
            p50, p95 = percentile(timings, 50), percentile(timings, 95)
            print(f"| {name} | {p50:.1f} | {p95:.1f} | {max(timings):.1f} | {size} |")
        print(f"\nPlans: {self.plans.name}")


class EachStatementTimer(QueryTimer):
    """Explains each statement on its own, under the settings the function set (``set_config``) in its
    transaction (replayed first in each rolled-back transaction)."""

    def explain(self, name: str, statements: list[tuple[Any, Any]]) -> None:
        settings = [(q, p) for q, p in statements if isinstance(q, str) and "set_config(" in q]
        self.plans.write(f"\n===== {name} =====\n")
        for query, params in statements:
            if (query, params) in settings:
                continue
            text = query if isinstance(query, str) else query.as_string(self.conn)
            self.plans.write(f"\n-- {' '.join(text.split())[:400]}\n")
            with self.conn.transaction(force_rollback=True):
                for setting, setting_params in settings:
                    self.conn.execute(setting, setting_params)
                explain = sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + sql.SQL(text)  # type: ignore[arg-type]
                for (line,) in self.conn.execute(explain, params).fetchall():
                    self.plans.write(line + "\n")
        self.plans.flush()
