"""Side by side in one real Airflow: the no-op floor, one task per CDR, chunk mode, and a raw POST loop.

    PYTHONPATH=plugins .venv/bin/python -m bench.harness [--cdrs 200 1000]
        [--modes floor per-cdr chunk raw deferred] [--parallelism 8] [--per-run K] [--in-flight 8]
        [--delay-ms 0] [--cdrs-per-task 50]
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
  second Airflow started with that parse-time setting (same metadata server, same receiver);
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
:func:`bench.phases.try_phases`); and where each run's wall time went
(:func:`bench.phases.run_timeline`). On demand only: never part of the test suite, never asserted.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from bench.cli import add_env_argument, add_report_arguments, publish
from bench.modes import Bench
from bench.phases import format_phases
from bench.scratch import scratch_database, server_dsn
from bench.stacks import build_dags_folder, deployment_env, extra_env, start_bench_stack, stop_stack
from bench.table import Row, concurrency_bound, format_table, machine
from cdr_webhook.ledger.schema import migrate
from demo.dialer import load_reference_schema
from demo.receiver import Receiver

if TYPE_CHECKING:
    from collections.abc import Sequence

    from demo.stack import AirflowStack

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


def harness_env(args: argparse.Namespace, dsn: str, receiver: Receiver, dags: Path) -> dict[str, str]:
    """The Airflow of the ``floor``, ``per-cdr`` and ``chunk`` modes: tuned for the largest N."""
    largest = max(args.cdrs)
    return {
        **deployment_env(dsn, receiver.url),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__PARALLELISM": str(args.parallelism),
        "AIRFLOW__CORE__MAX_MAP_LENGTH": str(max(1024, largest + 1)),
        "AIRFLOW__CDR_WEBHOOK__SCHEDULE": "0 0 1 1 *",
        # Runs are started by hand over each measurement's CDRs: no commit watcher may take them first.
        "AIRFLOW__CDR_WEBHOOK__WATCH_INTERVAL_SECONDS": "0",
        "AIRFLOW__CDR_WEBHOOK__CDRS_PER_TASK": "1",  # per-cdr: a task per CDR, whatever the default
        "AIRFLOW__CDR_WEBHOOK__MAX_CDRS_PER_RUN": str(largest),
        "AIRFLOW__CDR_WEBHOOK__MAX_ACTIVE_POSTS_PER_RUN": str(args.per_run or args.parallelism),
        "AIRFLOW__CDR_WEBHOOK__MAX_IN_FLIGHT_PER_ENDPOINT": str(args.in_flight),
        **extra_env(args.env),
    }


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
    add_env_argument(parser)
    add_report_arguments(parser)
    args = parser.parse_args(argv)
    extra_env(args.env)  # a malformed pair stops here, before anything starts
    return args


def header(args: argparse.Namespace, metadata: str) -> str:
    delay = f"answers after {args.delay_ms:g} ms" if args.delay_ms else "answers at once"
    return (
        f"{machine()}; LocalExecutor, parallelism {args.parallelism}, max_active_posts_per_run "
        f"{args.per_run or args.parallelism}, in-flight limit {args.in_flight}, metadata {metadata}; "
        f"receiver on 127.0.0.1 {delay}. `python -m bench.harness {' '.join(sys.argv[1:])}`"
    )


class Harness:
    """One invocation: the modes in order, each N, the rows as they come."""

    def __init__(self, args: argparse.Namespace, bench: Bench, scratch: Path, pg_server: str | None) -> None:
        self.args, self.bench, self.scratch, self.pg_server = args, bench, scratch, pg_server
        self.rows: list[Row] = []
        self.bound = concurrency_bound(args.in_flight, args.delay_ms)

    def add(self, *rows: Row) -> None:
        self.rows += rows
        print(format_table(rows), flush=True)

    def first_stack(self, env: dict[str, str]) -> None:
        """``floor``, ``deferred`` and ``per-cdr`` on one Airflow, and ``raw`` beside it, for each N."""
        modes = set(self.args.modes)
        needs_airflow = {"floor", "per-cdr", "deferred"} & modes
        stack = start_bench_stack(self.scratch / "airflow", self.pg_server, env) if needs_airflow else None
        try:
            if stack:
                self.bench.warm_up(stack)
            for n in self.args.cdrs:
                if stack:
                    self.no_op_and_per_cdr(stack, n)
                if "raw" in modes:
                    raw = self.bench.raw(n, 1)
                    both = self.bench.raw(n, self.args.in_flight)
                    self.add(raw, both.against("bound", self.bound) if self.bound else both)
                    self.bench.raw_rates[n] = raw.rate
        finally:
            stop_stack(stack)

    def no_op_and_per_cdr(self, stack: AirflowStack, n: int) -> None:
        floor = self.bench.floor(stack, n) if "floor" in self.args.modes else None
        if floor:
            self.add(floor)
        against_floor = (floor.rate, floor.run_rate) if floor else (None, None)
        if "deferred" in self.args.modes:
            deferred = self.bench.floor(stack, n, deferred=True)
            self.add(deferred.against("floor", *against_floor) if floor else deferred)
        if "per-cdr" in self.args.modes:
            row = self.bench.cdr_run(stack, n, "per-CDR (`post_cdr`)")
            self.add(row.against("floor", *against_floor) if floor else row)

    def sending_stack(self, name: str, env: dict[str, str], label: str) -> None:
        """``cdr_webhook`` runs of each N on an Airflow of its own (parse-time settings differ)."""
        stack = start_bench_stack(self.scratch / f"airflow-{name}", self.pg_server, env)
        try:
            self.bench.warm_up(stack)
            for n in self.args.cdrs:
                self.add(self.bench.against_raw_or_bound(self.bench.cdr_run(stack, n, label), n, self.bound))
        finally:
            stop_stack(stack)

    def run(self, env: dict[str, str]) -> None:
        if {"floor", "per-cdr", "deferred", "raw"} & set(self.args.modes):
            self.first_stack(env)
        if "chunk" in self.args.modes:
            k = self.args.cdrs_per_task
            chunk_env = env | {"AIRFLOW__CDR_WEBHOOK__CDRS_PER_TASK": str(k)}
            self.sending_stack("chunk", chunk_env, f"chunk ({k} CDRs per task)")
        if "defaults" in self.args.modes:
            defaults = {name: value for name, value in env.items() if name not in TUNING}
            self.sending_stack("defaults", defaults, "defaults (the run sizes its tasks)")

    def report(self, metadata: str) -> str:
        timelines = [
            f"Where a try's time goes, N = {n} (task logs, REST times):\n\n{format_phases(columns)}"
            for n, columns in self.bench.phases.items()
        ]
        timelines += [
            f"Where the run's time goes, N = {n} (REST times):\n\n{format_phases(columns, 'run')}"
            for n, columns in self.bench.timelines.items()
        ]
        return "\n\n".join([header(self.args, metadata), format_table(self.rows), *timelines])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # kill (SIGTERM) stops Airflow too; a background job ignores SIGINT, so that is the way to stop it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="cdr-webhook-harness-", ignore_cleanup_errors=True) as name:
        scratch = Path(name)
        admin_dsn = server_dsn(args.dsn, scratch)
        pg_server = admin_dsn if args.metadata == "postgres" else None
        with (
            scratch_database(admin_dsn, "cdr_webhook_bench") as dsn,
            psycopg.connect(dsn, autocommit=True) as conn,
            Receiver(delay_ms=args.delay_ms) as receiver,
        ):
            load_reference_schema(conn)
            migrate(conn)
            bench = Bench(args, receiver, conn)
            harness = Harness(args, bench, scratch, pg_server)
            try:
                harness.run(harness_env(args, dsn, receiver, build_dags_folder(scratch / "dags")))
            finally:
                bench.close()
    report = harness.report("PostgreSQL" if pg_server else "SQLite")
    publish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
