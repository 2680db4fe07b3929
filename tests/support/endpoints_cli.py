"""``python -m cdr_webhook endpoints ...`` run as an operator runs it, in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys

from demo.dialer import ROOT


def cli(*args: str, dsn: str | None, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": f"{ROOT / 'plugins'}{os.pathsep}{ROOT}", **env}
    environment.pop("CDR_DATABASE_URL", None)
    if dsn is not None:
        environment["CDR_DATABASE_URL"] = dsn
    return subprocess.run(
        [sys.executable, "-m", "cdr_webhook", "endpoints", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
