"""The harness's measurements on one Airflow: the no-op floor, a ``cdr_webhook`` run, the raw POST loop."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime as dt
import multiprocessing
import sys
import time
from typing import TYPE_CHECKING, Any

from bench.phases import logged_try_phases, run_timeline
from bench.rest import mapped_task_instances, run_dag, run_seconds, task_instances
from bench.rss import RssSampler
from bench.sending import raw_loop, signed_requests
from bench.stacks import SIGNING_SECRET
from bench.table import Row, load_average
from demo.dialer import Dialer

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

    import psycopg

    from demo.receiver import Receiver
    from demo.stack import AirflowStack

#: Per N, per label: the phases of each try (or the timeline of each run) measured.
Columns = dict[int, dict[str, list[dict[str, float]]]]


@dataclasses.dataclass
class Bench:
    """The measurements of one harness invocation, over one CDR database and one receiver."""

    args: argparse.Namespace
    receiver: Receiver
    conn: psycopg.Connection[Any]
    raw_rates: dict[int, float | None] = dataclasses.field(default_factory=dict)
    phases: Columns = dataclasses.field(default_factory=dict)
    timelines: Columns = dataclasses.field(default_factory=dict)
    pool: concurrent.futures.ProcessPoolExecutor | None = None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def raw_process(self) -> concurrent.futures.ProcessPoolExecutor:
        """The raw loop's process (its own: the receiver shares this one's GIL), started and its imports
        done before any clock runs."""
        if self.pool is None:
            spawn = multiprocessing.get_context("spawn")
            self.pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn)
            self.pool.submit(raw_loop, self.receiver.url, [], 1).result()
        return self.pool

    def warm_up(self, stack: AirflowStack) -> None:
        """One small run of each DAG first: the first runs after a start pay one-off costs."""
        for dag_id in ("bench_noop", "bench_noop_deferred"):
            if dag_id == "bench_noop" or "triggerer" in stack.processes:
                run = run_dag(stack, dag_id, {"n": self.args.parallelism}, timeout=300)
                if run["state"] != "success":
                    print(f"warm-up: {dag_id} run {run['state']}", file=sys.stderr, flush=True)
        self.cdr_run(stack, self.args.parallelism, "warm-up")

    def fresh_cdrs(self, count: int) -> tuple[list[str], dt.datetime, dt.datetime, float]:
        """Commit ``count`` new CDRs; return their ids, a window around them and the commit time."""
        start = dt.datetime.now(dt.UTC)
        dialer = Dialer(self.conn)
        with self.conn.transaction():
            ids = [dialer.cdr() for _ in range(count)]
        committed = time.time()
        return ids, start, dt.datetime.now(dt.UTC) + dt.timedelta(microseconds=1), committed

    def arrivals(self, cdr_ids: Sequence[str], committed: float) -> tuple[int, list[float]]:
        """Distinct CDRs received, and each first arrival's delay after the commit (ms)."""
        wanted = set(cdr_ids)
        first: dict[str, float] = {}
        for request in self.receiver.received():
            if request.cdr_id in wanted and request.cdr_id not in first:
                first[request.cdr_id] = request.at
        return len(first), [(at - committed) * 1000 for at in first.values()]

    def floor(self, stack: AirflowStack, n: int, *, deferred: bool = False) -> Row:
        """A no-op run of ``n`` mapped tasks (each started and ended in the triggerer if ``deferred``)."""
        dag_id = "bench_noop_deferred" if deferred else "bench_noop"
        load = load_average()
        triggerer = [stack.processes["triggerer"].pid] if "triggerer" in stack.processes else []
        conf: dict[str, Any] = {"n": n}
        if deferred and self.args.fail_first_try_every:
            conf["fail_first_try_every"] = self.args.fail_first_try_every
        with RssSampler(stack.processes["scheduler"].pid, also=triggerer if deferred else ()) as rss:
            run = run_dag(stack, dag_id, conf)
        tasks = mapped_task_instances(stack, dag_id, run["dag_run_id"])
        done = sum(ti["state"] == "success" for ti in tasks)
        tries = collections.Counter(ti["try_number"] for ti in tasks)
        label = "no-op, triggerer" if deferred else "no-op"
        self.phases.setdefault(n, {})[label] = logged_try_phases(stack.home, dag_id, tasks)
        return Row(
            "no-op in the triggerer (`start_from_trigger`)" if deferred else "floor (no-op DAG)",
            n,
            done,
            run_seconds(run),
            run_s=run_seconds(run, "start_date"),
            peak_task_rss=rss.peak_one,
            peak_sum_rss=rss.peak_sum,
            load=load,
            note=f"run {run['state']}, tries {dict(sorted(tries.items()))}",
        )

    def cdr_run(self, stack: AirflowStack, n: int, mode: str) -> Row:
        """``n`` fresh CDRs, then one ``cdr_webhook`` run over their window."""
        ids, start, end, committed = self.fresh_cdrs(n)
        load = load_average()
        with RssSampler(stack.processes["scheduler"].pid) as rss:
            window = {"window_start": start.isoformat(), "window_end": end.isoformat()}
            run = run_dag(stack, "cdr_webhook", window)
        done, latencies = self.arrivals(ids, committed)
        every = task_instances(stack, "cdr_webhook", run["dag_run_id"])
        tasks = [ti for ti in every if ti["map_index"] >= 0]
        if mode != "warm-up":
            label = mode.split(" (")[0]
            self.phases.setdefault(n, {})[label] = logged_try_phases(stack.home, "cdr_webhook", tasks)
            self.timelines.setdefault(n, {})[label] = [run_timeline(run, every)]
        return Row(
            mode,
            n,
            done,
            run_seconds(run),
            run_s=run_seconds(run, "start_date"),
            latencies_ms=latencies,
            peak_task_rss=rss.peak_one,
            peak_sum_rss=rss.peak_sum,
            load=load,
            note=f"run {run['state']}, {len(tasks)} mapped tasks",
        )

    def raw(self, n: int, loops: int) -> Row:
        """N fresh CDRs, their bodies built and signed as post_cdr does, POSTed by ``loops`` sessions."""
        pool = self.raw_process()
        ids, _, _, committed = self.fresh_cdrs(n)
        load = load_average()
        requests_ = signed_requests(self.conn, ids, endpoint="cdr_webhook", secret=SIGNING_SECRET)
        seconds, statuses = pool.submit(raw_loop, self.receiver.url, requests_, loops).result()
        done, latencies = self.arrivals(ids, committed)
        label = "raw keep-alive loop" if loops == 1 else f"raw loop ×{loops} at once"
        bad = sum(status != 200 for status in statuses)
        return Row(label, n, done, seconds, latencies_ms=latencies, load=load, note=f"{bad} non-200")

    def against_raw_or_bound(self, row: Row, n: int, bound: float | None) -> Row:
        """A sending row's reference: the concurrency bound if the receiver has a delay, else the raw loop."""
        if bound:
            return row.against("bound", bound)
        if self.raw_rates.get(n):
            return row.against("raw", self.raw_rates[n])
        return row
