"""On-demand benchmarks of the CDR webhook delivery: each ``bench.<name>`` module is one benchmark's CLI.

Run from the repository root with the package importable, as the project's other commands are::

    PYTHONPATH=plugins .venv/bin/python -m bench.harness --cdrs 200

The shared parts live in modules of one concern each: :mod:`bench.stats` (percentiles),
:mod:`bench.scratch` (the PostgreSQL server and scratch databases), :mod:`bench.stacks` (an Airflow
started for a benchmark), :mod:`bench.rest` (its runs through the REST API), :mod:`bench.rss` (task
processes' memory), :mod:`bench.phases` (where a try's and a run's time goes), :mod:`bench.table`
(the harness's rows and the machine line), :mod:`bench.sending` (signed bodies and plain POST loops),
:mod:`bench.records` (attempts for ``ledger.record_attempts``), :mod:`bench.dataset` and
:mod:`bench.query_timer` (a loaded ledger and its queries' timings). Never part of the test suite.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("cdr_webhook") is None:
    # Said once, here, rather than as a bare ModuleNotFoundError from whichever import comes first.
    raise SystemExit(
        "bench: the cdr_webhook package is not importable; run from the repository root as "
        "`PYTHONPATH=plugins .venv/bin/python -m bench.<name> ...` (or install the package)"
    )
