"""What the Airflow benchmarks' command lines share: the server and report options, and the output."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dsn`` (the PostgreSQL server) and ``--out`` (a copy of the report)."""
    parser.add_argument("--dsn", help="the PostgreSQL server (default CDR_DATABASE_URL, 127.0.0.1:5432)")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) to this file")


def add_env_argument(parser: argparse.ArgumentParser) -> None:
    """``--env NAME=VALUE``: given once with several pairs, or again for each (both read alike)."""
    parser.add_argument(
        "--env",
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for every Airflow process, e.g. AIRFLOW__API__WORKERS=2 (repeatable)",
    )


def publish(report: str, out: Path | None) -> None:
    """Print the report, and write it to ``out`` if given."""
    print("\n" + report, flush=True)
    if out:
        out.write_text(report + "\n")
