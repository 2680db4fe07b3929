"""Imports inside functions are for import cost (or an import cycle of Airflow's) only, each module's reason
named here; the task-path test (tests/integration/test_task_path.py) shows what the DAG file's parse
leaves out."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "plugins" / "cdr_webhook"

#: The modules that import inside functions, and why.
DEFERRING = {
    "__main__.py": "the CLI loads a command's modules when that command runs",
    "selection/cli.py": "the CLI loads a command's modules when that command runs",
    "airflow_cli.py": "Airflow imports it for every `airflow` command",
    "provider.py": "Airflow reads the provider info for every command",
    "plugin.py": "the page's app is built when the api-server serves it, not where plugins load",
    "dag.py": "every task process parses the DAG file: the select step's modules load when it runs",
    "deliver/operator.py": "every task process parses the DAG file: a try's modules load when it runs",
    "deliver/owner.py": "Airflow's SMTP provider loads only when an owner's email is sent",
    "deliver/hook.py": "authlib (deliver/token_fetch.py) loads only in the tasks of an OAuth2 endpoint",
    "watch/schedule.py": "a task process parses the DAG file and never uses the watcher's trigger",
    "watch/trigger.py": "the schedule names the trigger at each parse: a running watcher's modules load then",
    "setting_values.py": "croniter only when a cron schedule is read (the CLI and unit tests parse settings)",
    "db.py": "the CLI imports it, and airflow.sdk's import sets its logging on the CLI's output",
    "adapters.py": "the CLI imports it, and airflow.sdk's import sets its logging on the CLI's output",
    "web/deps.py": "airflow.api_fastapi.app imports the plugins: a module-level import would be a cycle",
    "web/security.py": "airflow.api_fastapi.app imports the plugins: a module-level import would be a cycle",
}


def deferring_modules() -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        functions = (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
        if any(isinstance(sub, ast.Import | ast.ImportFrom) for f in functions for sub in ast.walk(f)):
            found.add(path.relative_to(PACKAGE).as_posix())
    return found


def test_only_the_modules_with_a_reason_import_inside_functions():
    assert deferring_modules() == set(DEFERRING)


def test_web_modules_defer_only_the_app_module_of_airflow():
    for name in ("web/deps.py", "web/security.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        inner = {
            sub.module
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
            for sub in ast.walk(f)
            if isinstance(sub, ast.ImportFrom)
        }
        assert inner == {"airflow.api_fastapi.app"}, name
