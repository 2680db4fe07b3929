"""What a post_cdr try pays before it sends: the modules its process imports and its DB connection.

Every mapped try is a fresh task process that imports the DAG file and the operator's modules, so a
heavy import is paid once per CDR (docs/benchmarks.md, "Where a post_cdr try spends its time").
"""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg
import pytest

from tests.conftest import ROOT

#: Imported by the HTTP provider's operator and hook (deferrable mode) and by the Postgres provider's
#: hook: none of them does anything for a post_cdr try.
HEAVY = (
    "aiohttp",
    "airflow.providers.http.hooks.http",
    "airflow.providers.postgres.hooks.postgres",
    "psycopg2",
)

#: A fresh interpreter as a task process starts (what it inherits, then the DAG file parsed); more
#: imports, then the modules it loaded since the parse began, as JSON.
PARSE_THEN = """
import importlib.util, json, sys
sys.path.insert(0, {plugins!r})
import airflow.sdk.execution_time.task_runner  # what the task process has before it parses the file
before = set(sys.modules)
spec = importlib.util.spec_from_file_location("cdr_webhook_dag", {dag!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
{then}
print(json.dumps(sorted(set(sys.modules) - before)))
"""

#: Every module a post_cdr try's execute() imports when it runs.
TRY_IMPORTS = """
from cdr_webhook.deliver.operator import CdrWebhookOperator
import cdr_webhook.db, cdr_webhook.ledger.endpoints, cdr_webhook.ledger, cdr_webhook.payload
import cdr_webhook.signing, cdr_webhook.deliver.slots, cdr_webhook.selection.source
import cdr_webhook.endpoint_config, cdr_webhook.request, cdr_webhook.deliver.chunks, cdr_webhook.deliver.lanes
import cdr_webhook.deliver.engine, cdr_webhook.deliver.report, cdr_webhook.deliver.hook
"""


def imported_by(then: str) -> set[str]:
    """The modules a fresh task-like interpreter loads parsing the DAG file, then running ``then``."""
    probe = PARSE_THEN.format(
        plugins=str(ROOT / "plugins"), dag=str(ROOT / "dags" / "cdr_webhook_dag.py"), then=then
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_a_try_imports_neither_aiohttp_nor_the_provider_hooks():
    imported = imported_by(TRY_IMPORTS)

    assert "cdr_webhook.deliver.operator" in imported  # the probe did load the task's modules
    assert sorted(name for name in imported if name.startswith(HEAVY)) == []


#: What the DAG file's modules import inside functions (tests/unit/test_deferred_imports.py): a task's
#: own modules, loaded when it runs, not by every parse of the file (each task process parses it).
TASK_TIME = (
    "cdr_webhook.selection.step",
    "cdr_webhook.selection.tasks",
    "cdr_webhook.deliver.engine",
    "cdr_webhook.deliver.chunks",
    "cdr_webhook.deliver.lanes",
    "cdr_webhook.deliver.hook",
    "cdr_webhook.web",
    "requests",
)


def test_parsing_the_dag_file_loads_no_task_time_module():
    imported = imported_by("")

    assert "cdr_webhook.dag" in imported  # the probe did parse the DAG file
    assert sorted(name for name in imported if name.startswith(TASK_TIME)) == []


@pytest.mark.parametrize(
    "extra",
    [{}, {"sslmode": "disable", "connect_timeout": 5, "application_name": "cdr-webhook"}],
)
def test_the_cdr_database_is_opened_with_the_arguments_the_provider_hook_uses(monkeypatch, cdr_dsn, extra):
    from airflow.providers.postgres.hooks.postgres import PostgresHook
    from psycopg.conninfo import conninfo_to_dict

    from cdr_webhook import db

    params = conninfo_to_dict(cdr_dsn)
    # The server's fields as a connection holds them (the embedded server's host is a socket directory).
    fields = {
        "conn_type": "postgres",
        "host": params.get("host", "127.0.0.1"),
        "port": int(params.get("port", 5432)),
        "login": params.get("user", "postgres"),
        "password": params.get("password"),
        "schema": params["dbname"],
        "extra": extra,
    }
    monkeypatch.setenv("AIRFLOW_CONN_CDR_DB_PROBE", json.dumps(fields))
    seen: dict[str, dict] = {}
    monkeypatch.setattr(
        PostgresHook, "_create_connection", lambda self, args: seen.setdefault("hook", dict(args)) and None
    )
    PostgresHook(postgres_conn_id="cdr_db_probe").get_conn()

    from airflow.sdk import BaseHook

    assert db.connection_args(BaseHook.get_connection("cdr_db_probe")) == seen["hook"]
    with db.connect("cdr_db_probe") as conn:  # and it opens the database, in autocommit mode
        assert conn.autocommit
        assert conn.execute("SELECT current_database()").fetchone()[0] == params["dbname"]
        if extra:
            assert conn.execute("SHOW application_name").fetchone()[0] == "cdr-webhook"


def test_a_connection_with_a_provider_only_extra_is_opened_by_the_provider_hook(monkeypatch, cdr_dsn):
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    from cdr_webhook import db

    monkeypatch.setenv(
        "AIRFLOW_CONN_CDR_DB_IAM",
        json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "schema": "x", "extra": {"iam": True}}),
    )
    calls = []
    monkeypatch.setattr(
        PostgresHook, "get_conn", lambda self: calls.append(self.postgres_conn_id) or psycopg.connect(cdr_dsn)
    )

    with db.connect("cdr_db_iam") as conn:
        assert conn.autocommit

    assert calls == ["cdr_db_iam"]
