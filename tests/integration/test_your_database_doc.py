"""docs/your-database.md's first hour, followed as written against the reference schema.

The steps' commands are read from the page itself, so the page cannot drift from what they do. The
ones that need a running Airflow (`airflow dags test`, `airflow dags unpause`) and the one that loads
the reader's own view file are not run here: the reference schema stands in for that view.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import ROOT

DOC = ROOT / "docs" / "your-database.md"


def section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of ``text`` opened with ```` ```language ```` (``""``: no language)."""
    found, current, opened = [], [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if opened is None:
                opened, current = line[3:].strip(), []
                continue
            if opened == language:
                found.append("\n".join(current) + "\n")
            opened = None
        elif opened is not None:
            current.append(line)
    return found


def run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-e", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )


def test_the_first_hour_works_as_written(cdr_dsn, cdr_db):
    steps = section("The first hour")
    scripts = blocks(steps, "bash")
    runnable = [s for s in scripts if "cdr_webhook_source.sql" not in s and not s.startswith("airflow ")]
    assert [s.split()[0] for s in runnable] == ["python", "PYTHONPATH=plugins", "export"]
    env = {
        **os.environ,
        "CDR_DATABASE_URL": cdr_dsn,
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
    }
    seed, check, preview = (run(script, env) for script in runnable)

    assert seed.returncode == 0, seed.stderr
    assert "Loaded the reference schema and 6 demo CDRs" in seed.stdout
    # The check's output as the page shows it ('…' stands for a cdr_id), exit status 1.
    assert check.returncode == 1, check.stderr
    shown = blocks(steps, "")[0].splitlines()
    real = (check.stdout + check.stderr).splitlines()
    assert len(real) == len(shown), real
    for expected, line in zip(shown, real, strict=True):
        assert re.fullmatch(re.escape(expected).replace("…", "[0-9a-f-]+"), line), (expected, line)
    # The preview: the five CDRs a run would send, each body printed, the sixth's reason; nothing written.
    assert preview.returncode == 0, preview.stderr
    bodies = [line for line in preview.stdout.splitlines() if line.startswith('{"client_id":')]
    assert len(bodies) == 5
    assert "not sent: skipped: CDR " in preview.stdout
    assert "6 CDR(s) created in" in preview.stdout
    assert "x-api-key: (secret, not shown)" in preview.stdout
    assert "try-key" not in preview.stdout
    assert cdr_db.execute("SELECT to_regclass('cdr_webhook.delivery')").fetchone() == (None,)


def test_the_column_table_is_the_rules_the_check_applies():
    from cdr_webhook.source_types import RULES

    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \| (yes|no) \|", section("The columns"), re.M)
    table = {name: (types.strip(), null == "yes") for name, types, null in rows}
    assert table == {name: (rule.display, rule.nullable) for name, rule in RULES.items()}
