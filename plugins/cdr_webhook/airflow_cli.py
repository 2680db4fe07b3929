"""``airflow cdr-webhook ...``: the operator's command line as a command of Airflow's own CLI.

The package's provider info names :func:`get_cli_commands` under ``cli``. Airflow calls it while it
builds the parser of every ``airflow`` command, so this module imports nothing of ours: the command
runs ``cdr_webhook.__main__`` (psycopg, the ledger) only when it is the command given.
"""

from __future__ import annotations

import argparse
from typing import Any

#: What ``airflow cdr-webhook --help`` says; every group and command is ``python -m cdr_webhook``'s.
DESCRIPTION = (
    "The CDR webhook's operator commands, as python -m cdr_webhook runs them: "
    "endpoints list|pause|resume|check|test, source check|preview|install-notify|remove-notify, "
    "watch status. "
    "Each command's own help: airflow cdr-webhook endpoints --help, airflow cdr-webhook source --help."
)


def get_cli_commands() -> list[Any]:
    """The ``cdr-webhook`` command: everything after it is handed to ``cdr_webhook.__main__``."""
    from airflow.cli.cli_config import ActionCommand, Arg, lazy_load_command

    return [
        ActionCommand(
            name="cdr-webhook",
            help="CDR webhook: pause, resume and list endpoints; check and preview the source",
            description=DESCRIPTION,
            func=lazy_load_command("cdr_webhook.__main__.airflow_command"),
            # The command line is parsed by our own parser, with its usage and errors.
            args=(Arg(("arguments",), nargs=argparse.REMAINDER, metavar="endpoints|source|watch ..."),),
        )
    ]
