"""Commit → POST latency of event-driven pick-up, through a real Airflow at the default settings.

    PYTHONPATH=plugins .venv/bin/python -m bench.latency [--drip 30] [--every S] [--burst 2000] [--backlog 0]
        [--idle 60] [--modes defaults per-cdr chunk] [--cdrs-per-task 50] [--notify] [--env NAME=VALUE ...]
        [--dsn DSN] [--out FILE]

One Airflow per mode (demo/stack.py: LocalExecutor, api-server, scheduler, dag-processor and
triggerer on 127.0.0.1, metadata on the PostgreSQL server), the DAG at its default settings (the
minute schedule, ``watch_interval_seconds`` 1), a receiver in this process (demo/receiver.py). With
``--notify`` the commit watcher's NOTIFY trigger is installed on dialer.cdr (``source install-notify``),
else the watcher polls. Airflow's own settings are its defaults (``scheduler_idle_sleep_time`` 1 s,
where the tests' stacks use 0.5 s) unless ``--env`` sets one. After the first scheduled run (the
watermark exists), for each mode:

* drip: ``--drip`` CDRs committed one at a time, each its own transaction, 1.5–4.5 s apart at random
  (about one every 3 s), or ``--every`` seconds apart: commit → POST p50/p95/max, POSTs per CDR,
  the runs by type, and where the time went per CDR (REST timestamps and the ledger): commit →
  asset event (the trigger's wait and the event's write), event → run queued (the run's creation),
  queued → select start, the select step, select end → post task start, post task start → POST;
* burst: ``--burst`` CDRs committed as fast as one connection can, each its own transaction: all
  delivered once?, the runs it caused, the time from the first commit to the last POST;
* backlog (``--backlog`` N, off by default): an outage's backlog: N CDRs committed while the endpoint
  is paused (the runs queue them), then the endpoint resumed: resume → last POST, each once, and
  whether the runs took the queue oldest first;
* idle: ``--idle`` seconds with no commit: the runs started, by type.

Modes: ``defaults`` (nothing set: the run sizes its tasks), ``per-cdr`` (``cdrs_per_task`` 1) and
``chunk`` (``--cdrs-per-task``), each on an Airflow of its own. On demand
only; never part of the test suite, never asserted.
"""

from __future__ import annotations

import argparse
import collections
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from bench.cli import add_report_arguments, publish
from bench.rest import ts_or_none
from bench.scratch import scratch_database, server_dsn
from bench.stacks import SIGNING_SECRET, deployment_env, extra_env, start_watching, stop_stack
from bench.stats import num, percentile
from bench.table import machine
from cdr_webhook.ledger import endpoints
from cdr_webhook.watch import notify
from demo.dialer import Dialer, load_reference_schema
from demo.receiver import Receiver
from demo.stack import AirflowStack

if TYPE_CHECKING:
    from collections.abc import Sequence

#: ``cdrs_per_task`` per mode: none set (the run sizes its tasks), a task per CDR, ``--cdrs-per-task``.
MODE_TASKS = {"per-cdr": "1", "chunk": ""}
PHASES = ("commit→event", "event→run queued", "queued→select start", "select step", "select→post start",
          "post start→POST")  # fmt: skip


def _s(value: float | None) -> str:
    return num(value, ".1f")


class Measure:
    def __init__(self, stack: AirflowStack, receiver: Receiver, conn: psycopg.Connection[Any]) -> None:
        self.stack, self.receiver, self.conn = stack, receiver, conn
        self.dialer = Dialer(conn)

    def arrivals(self, cdr_ids: Sequence[str]) -> dict[str, list[float]]:
        wanted = set(cdr_ids)
        seen: dict[str, list[float]] = collections.defaultdict(list)
        for post in self.receiver.received():
            if post.cdr_id in wanted:
                seen[post.cdr_id].append(post.at)
        return seen

    def wait_delivered(self, cdr_ids: Sequence[str], timeout: float) -> dict[str, list[float]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.arrivals(cdr_ids)
            if len(seen) == len(cdr_ids):
                return seen
            time.sleep(0.5)
        return self.arrivals(cdr_ids)

    def runs_since(self, since: float) -> collections.Counter[str]:
        runs = self.stack.runs(order_by="-run_after")
        return collections.Counter(r["run_type"] for r in runs if (ts_or_none(r["queued_at"]) or 0) >= since)

    def commit(self) -> tuple[str, float]:
        cdr = self.dialer.cdr()  # autocommit: the CDR row is its own transaction
        return cdr, time.time()

    def drip(self, count: int, every: float | None = None) -> tuple[list[str], str, str]:
        began = time.time()
        committed = {}
        for _ in range(count):
            time.sleep(every or random.uniform(1.5, 4.5))
            cdr, at = self.commit()
            committed[cdr] = at
        seen = self.wait_delivered(list(committed), 300)
        latencies = [min(seen[c]) - committed[c] for c in committed if c in seen]
        once = sum(1 for c in committed if len(seen.get(c, ())) == 1)
        runs = self.runs_since(began)
        row = (
            f"| {count} | {len(seen)} | {once} | {_s(percentile(latencies, 50))} | "
            f"{_s(percentile(latencies, 95))} | {_s(max(latencies) if latencies else None)} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(runs.items()))} "
            f"| {self.task_shapes(list(committed))} |"
        )
        return list(committed), row, self.phases(committed, seen)

    def task_shapes(self, cdr_ids: Sequence[str]) -> str:
        """How the CDRs' tasks were shaped, from the ledger: ``tasks of one CDR / tasks``."""
        single, tasks = self.conn.execute(
            "SELECT count(*) FILTER (WHERE n = 1), count(*) FROM (SELECT count(*) AS n FROM "
            "cdr_webhook.delivery WHERE cdr_id = ANY(%s) GROUP BY run_id, map_index) AS t",
            (list(cdr_ids),),
        ).fetchone()
        return f"{single}/{tasks}"

    def phases(self, committed: dict[str, float], seen: dict[str, list[float]]) -> str:
        per: dict[str, list[float]] = collections.defaultdict(list)
        rows = self.conn.execute(
            "SELECT cdr_id, run_id, map_index FROM cdr_webhook.delivery WHERE cdr_id = ANY(%s)",
            (list(committed),),
        ).fetchall()
        tis: dict[str, list[dict[str, Any]]] = {}
        for cdr, run_id, map_index in rows:
            if cdr not in seen or run_id is None:
                continue
            run = self.stack.api("GET", f"/dags/cdr_webhook/dagRuns/{run_id}")
            if run_id not in tis:
                tis[run_id] = self.stack.task_instances(run_id)
            select = next((t for t in tis[run_id] if t["task_id"] == "select_cdrs"), None)
            post = next(
                (t for t in tis[run_id] if t["task_id"] == "post_cdr" and t["map_index"] == map_index), None
            )
            events = (
                self.stack.api("GET", f"/dags/cdr_webhook/dagRuns/{run_id}/upstreamAssetEvents", expect=None)
                or {}
            )
            stamps = [ts_or_none(e["timestamp"]) for e in events.get("asset_events", [])]
            event = min((s for s in stamps if s and s >= committed[cdr] - 0.5), default=None)
            queued = ts_or_none(run.get("queued_at"))
            points = [
                committed[cdr],
                event,
                queued,
                ts_or_none(select and select["start_date"]),
                ts_or_none(select and select["end_date"]),
                ts_or_none(post and post["start_date"]),
                min(seen[cdr]),
            ]
            for name, (a, b) in zip(PHASES, zip(points, points[1:], strict=False), strict=True):
                if a is not None and b is not None:
                    per[name].append(b - a)
        lines = ["| phase | CDRs | median s | p95 s |", "| --- | --- | --- | --- |"]
        for name in PHASES:
            values = per.get(name, [])
            lines.append(
                f"| {name} | {len(values)} | {_s(percentile(values, 50))} | {_s(percentile(values, 95))} |"
            )
        return "\n".join(lines)

    def burst(self, count: int) -> str:
        began = time.time()
        cdrs = [self.commit()[0] for _ in range(count)]
        committed_in = time.time() - began
        seen = self.wait_delivered(cdrs, 1800)
        last = max((max(v) for v in seen.values()), default=None)
        once = sum(1 for c in cdrs if len(seen.get(c, ())) == 1)
        runs = self.runs_since(began)
        by_type = ", ".join(f"{k} {v}" for k, v in sorted(runs.items()))
        to_last = _s(last - began if last else None)
        return f"| {count} | {committed_in:.1f} | {len(seen)} | {once} | {by_type} | {to_last} |"

    def backlog(self, count: int) -> str:
        """
        The backlog after an outage: ``count`` CDRs queued while the endpoint is paused, then resumed.

        Timed from the resume to the last POST; checks each CDR POSTed once and that the runs took the
        queue oldest first (each run's CDRs all older than the next run's, per the ledger).
        """
        endpoints.pause(self.conn, "cdr_webhook", reason="bench: an outage", actor="bench")
        with self.conn.transaction():
            cdrs = [self.dialer.cdr() for _ in range(count)]
        queued_in = self.wait_queued(cdrs, 600)
        resumed = time.time()
        endpoints.resume(self.conn, "cdr_webhook", actor="bench")
        seen = self.wait_delivered(cdrs, 1800)
        last = max((max(v) for v in seen.values()), default=None)
        once = sum(1 for c in cdrs if len(seen.get(c, ())) == 1)
        runs = self.runs_since(resumed)
        by_type = ", ".join(f"{k} {v}" for k, v in sorted(runs.items()))
        return (
            f"| {count} | {_s(queued_in)} | {len(seen)} | {once} | {by_type} | {self.oldest_first(cdrs)} "
            f"| {_s(last - resumed if last else None)} |"
        )

    def wait_queued(self, cdr_ids: Sequence[str], timeout: float) -> float:
        """Seconds until every one of ``cdr_ids`` has its ledger row (a run queued it)."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            (rows,) = self.conn.execute(
                "SELECT count(*) FROM cdr_webhook.delivery WHERE cdr_id = ANY(%s)", (list(cdr_ids),)
            ).fetchone()
            if rows == len(cdr_ids):
                return time.monotonic() - began
            time.sleep(1)
        raise TimeoutError(f"{len(cdr_ids)} CDRs not all queued after {timeout:.0f} s")

    def oldest_first(self, cdr_ids: Sequence[str]) -> str:
        """Did each run take only CDRs older than the next run's? ``yes``, or the runs that overlap."""
        spans = self.conn.execute(
            "SELECT run_id, min(cdr_created_at), max(cdr_created_at), count(*) FROM cdr_webhook.delivery "
            "WHERE cdr_id = ANY(%s) GROUP BY run_id ORDER BY min(cdr_created_at)",
            (list(cdr_ids),),
        ).fetchall()
        overlaps = [a[0] for a, b in zip(spans, spans[1:], strict=False) if a[2] > b[1]]
        sizes = "/".join(str(span[3]) for span in spans)
        return f"yes ({len(spans)} runs: {sizes})" if not overlaps else f"no: {', '.join(overlaps)}"

    def idle(self, seconds: float) -> str:
        time.sleep(10)  # the burst's last runs finish
        began = time.time()
        time.sleep(seconds)
        runs = self.runs_since(began)
        return f"| {seconds:.0f} | {', '.join(f'{k} {v}' for k, v in sorted(runs.items())) or 'none'} |"


def mode_report(args: argparse.Namespace, mode: str, admin_dsn: str, scratch: Path) -> str:
    """One mode's measurements on an Airflow of its own, over a CDR database of its own."""
    stack = None
    with (
        scratch_database(admin_dsn, "cdr_webhook_latency") as dsn,
        psycopg.connect(dsn, autocommit=True) as conn,
        Receiver(secret=SIGNING_SECRET) as receiver,
    ):
        load_reference_schema(conn)
        if args.notify:
            notify.install(conn, "dialer.cdr")
        # Airflow's default idle sleep (the stacks' 0.5 s suits the tests), then --env's settings.
        env = deployment_env(dsn, receiver.url, page_limit=1000)
        env |= {"AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "1.0", **extra_env(args.env)}
        if mode in MODE_TASKS:
            env["AIRFLOW__CDR_WEBHOOK__CDRS_PER_TASK"] = MODE_TASKS[mode] or str(args.cdrs_per_task)
        home = scratch / f"airflow-{mode}"
        home.mkdir()
        began = time.monotonic()
        try:
            stack = start_watching(AirflowStack(home, admin_dsn, env))
            print(
                f"[{mode}] Airflow up, first scheduled run done in {time.monotonic() - began:.0f} s",
                flush=True,
            )
            rows = measure_all(args, mode, Measure(stack, receiver, conn))
        finally:
            stop_stack(stack)
    return format_mode(args, mode, rows)


def measure_all(args: argparse.Namespace, mode: str, measure: Measure) -> dict[str, str]:
    """Each measurement in turn on one Airflow: its table row (and the drip's phases), as printed."""
    rows: dict[str, str] = {}
    _, rows["drip"], rows["phases"] = measure.drip(args.drip, args.every)
    print(f"[{mode}] drip {rows['drip']}", flush=True)
    rows["burst"] = measure.burst(args.burst)
    print(f"[{mode}] burst {rows['burst']}", flush=True)
    if args.backlog:
        rows["backlog"] = measure.backlog(args.backlog)
        print(f"[{mode}] backlog {rows['backlog']}", flush=True)
    rows["idle"] = measure.idle(args.idle)
    print(f"[{mode}] idle {rows['idle']}", flush=True)
    return rows


def format_mode(args: argparse.Namespace, mode: str, rows: dict[str, str]) -> str:
    name = {"defaults": "defaults (the run sizes its tasks)", "per-cdr": "per-CDR (cdrs_per_task 1)"}.get(
        mode, f"chunk ({args.cdrs_per_task} CDRs per task)"
    )
    backlog = [
        "| backlog CDRs | queued in s | delivered | POSTed once | runs (by type) | runs oldest first "
        "| resume→last POST s |\n| --- | --- | --- | --- | --- | --- | --- |\n" + row
        for row in ([rows["backlog"]] if "backlog" in rows else [])
    ]
    return "\n\n".join(
        [
            f"**{name}**",
            "| drip CDRs | delivered | POSTed once | commit→POST p50 s | p95 s | max s | runs (by type) "
            "| tasks of one CDR |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n" + rows["drip"],
            f"Where a drip CDR's time went ({name}):\n\n{rows['phases']}",
            "| burst CDRs | committed in s | delivered | POSTed once | runs (by type) "
            "| first commit→last POST s |\n"
            "| --- | --- | --- | --- | --- | --- |\n" + rows["burst"],
            *backlog,
            "| idle s | runs started (by type) |\n| --- | --- |\n" + rows["idle"],
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.splitlines()[0])
    parser.add_argument("--drip", type=int, default=30, help="CDRs committed one at a time (default 30)")
    parser.add_argument("--every", type=float, help="seconds between drip commits (default 1.5–4.5, random)")
    parser.add_argument("--burst", type=int, default=2000, help="CDRs committed at once (default 2000)")
    parser.add_argument("--idle", type=float, default=60, help="idle seconds counted (default 60)")
    parser.add_argument(
        "--backlog",
        type=int,
        default=0,
        help="CDRs queued while the endpoint is paused, then resumed (0: none)",
    )
    parser.add_argument("--modes", nargs="+", choices=("defaults", "per-cdr", "chunk"), default=["defaults"])
    parser.add_argument("--cdrs-per-task", type=int, default=50, help="chunk mode's CDRS_PER_TASK")
    parser.add_argument(
        "--notify", action="store_true", help="install the NOTIFY trigger on dialer.cdr (default: polling)"
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="an Airflow setting for every mode"
    )
    add_report_arguments(parser)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="cdr-webhook-latency-", ignore_cleanup_errors=True) as name:
        scratch = Path(name)
        admin_dsn = server_dsn(args.dsn, scratch)
        reports = [mode_report(args, mode, admin_dsn, scratch) for mode in args.modes]
    watcher = "NOTIFY trigger on dialer.cdr" if args.notify else "the watcher polls (no NOTIFY trigger)"
    head = (
        f"{machine()}; LocalExecutor, default settings, {watcher}; "
        f"`python -m bench.latency {' '.join(sys.argv[1:])}`"
    )
    report = "\n\n".join([head, *reports])
    publish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
