"""The DAG and plugins folders load cleanly, and the DAG has the shape README.md's "How it works" draws."""

from __future__ import annotations

import datetime as dt
import sys

import pytest

from tests.conftest import ROOT, reread_settings


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert sorted(dagbag.dags) == ["cdr_webhook", "cdr_webhook_owner_alerts"]


def test_the_owner_alerts_dag_is_one_light_task_a_minute_unpaused_from_the_start(dagbag):
    dag = dagbag.dags["cdr_webhook_owner_alerts"]
    assert [task.task_id for task in dag.tasks] == ["alert_owners"]
    assert dag.max_active_runs == 1
    assert dag.catchup is False
    assert type(dag.timetable).__name__ == "CronTriggerTimetable"
    assert dag.timetable.expression == "* * * * *"
    # Paused at creation, the alerts owed by the first pauses would wait until someone noticed.
    assert dag.is_paused_upon_creation is False
    task = dag.get_task("alert_owners")
    assert task.retries == 0  # the next minute's run is the retry
    assert task.execution_timeout == dt.timedelta(minutes=8)


def test_dag_shape(dagbag):
    from airflow.sdk import AssetOrTimeSchedule

    from cdr_webhook.deliver.operator import SIZED_NAME_TEMPLATE, CdrWebhookOperator
    from cdr_webhook.settings import AUTO_SIZED

    dag = dagbag.dags["cdr_webhook"]
    # The schedule, or an event of the commit watcher (watching is on unless turned off).
    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    assert dag.catchup is False
    assert set(dag.params) == {"window_start", "window_end", "policy", "client_id"}
    assert dag.params.get_param("policy").value == "missing"
    assert dag.doc_md
    assert "CDR webhook delivery" in dag.doc_md
    post = dag.get_task("post_cdr")
    assert issubclass(post.operator_class, CdrWebhookOperator)
    # The run sizes its tasks (auto): a one-CDR task is named by its cdr_id, a chunk by its first and count.
    assert post.partial_kwargs["map_index_template"] == SIZED_NAME_TEMPLATE
    assert post.partial_kwargs["cdrs_per_task"] == AUTO_SIZED
    assert dag.get_task("select_cdrs").op_kwargs == {"cdrs_per_task": AUTO_SIZED}
    assert [t.task_id for t in post.upstream_list] == ["select_cdrs"]
    # Nothing of the CDR is ever a template field (Jinja in CDR text must arrive verbatim).
    assert CdrWebhookOperator.template_fields == ()


def test_plugin_loading_does_not_import_package_modules_under_bare_names():
    """Airflow imports every .py under plugins/ as a top-level module; plugins/.airflowignore stops it."""
    from airflow import plugins_manager

    plugins_manager.ensure_plugins_loaded()

    assert plugins_manager.get_import_errors() == {}
    package_modules = sorted(
        path.stem
        for path in (ROOT / "plugins" / "cdr_webhook").rglob("*.py")
        if not path.stem.startswith("__")
    )
    assert {"hook", "egress", "deadline", "settings"} <= set(package_modules)  # the glob found the package
    for bare in package_modules:
        module = sys.modules.get(bare)
        assert module is None or "cdr_webhook" not in str(getattr(module, "__file__", "")), bare


def test_retry_settings_reach_select_cdrs_and_post_cdr(settings_env):
    from airflow.dag_processing.dagbag import DagBag

    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__RETRIES", "3")
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__RETRY_DELAY_SECONDS", "7")
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__MAX_RETRY_DELAY_SECONDS", "45")

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["cdr_webhook"]
    post = dag.get_task("post_cdr")
    select = dag.get_task("select_cdrs")

    assert post.partial_kwargs["retries"] == 3
    assert post.partial_kwargs["retry_delay"] == dt.timedelta(seconds=7)
    assert post.partial_kwargs["max_retry_delay"] == dt.timedelta(seconds=45)
    assert post.partial_kwargs["retry_policy"].max_delay_seconds == 45
    # A select that dies after committing its claims is tried again and maps them.
    assert (select.retries, select.retry_delay, select.max_retry_delay) == (
        3,
        dt.timedelta(seconds=7),
        dt.timedelta(seconds=45),
    )
    assert select.retry_exponential_backoff


def test_isolation_settings_reach_the_dag(settings_env):
    from airflow.dag_processing.dagbag import DagBag

    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__MAX_ACTIVE_RUNS", "2")
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__SLOT_WAIT_SECONDS", "10")
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__REQUEST_TIMEOUT_SECONDS", "7")
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__MAX_ACTIVE_POSTS_PER_RUN", "3")

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["cdr_webhook"]
    post = dag.get_task("post_cdr")

    assert dag.max_active_runs == 2
    # slot wait + the POST's deadline + 60 s of database work
    assert post.partial_kwargs["execution_timeout"] == dt.timedelta(seconds=77)
    assert post.partial_kwargs["max_active_tis_per_dagrun"] == 3


def test_failure_notifier_setting_becomes_the_dags_failure_callback(settings_env):
    from airflow.dag_processing.dagbag import DagBag

    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__FAILURE_NOTIFIER", "tests.support.notifier_probe:notifier")
    from tests.support.notifier_probe import notifier

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["cdr_webhook"]
    assert dag.on_failure_callback is notifier or notifier in (dag.on_failure_callback or [])


def test_a_notifier_that_cannot_be_imported_is_an_import_error_naming_the_setting(settings_env):
    from airflow.dag_processing.dagbag import DagBag

    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__FAILURE_NOTIFIER", "tests.no_such_module:notifier")
    [error] = DagBag(dag_folder=str(ROOT / "dags")).import_errors.values()
    assert (
        "AIRFLOW__CDR_WEBHOOK__FAILURE_NOTIFIER='tests.no_such_module:notifier' cannot be imported" in error
    )


def test_chunk_mode_maps_the_operator_over_chunks_named_by_its_first_cdr_and_size(settings_env):
    from airflow.dag_processing.dagbag import DagBag

    from cdr_webhook.deliver.operator import CdrWebhookOperator

    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__CDRS_PER_TASK", "100")
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__MAX_CDRS_PER_RUN", "20000")
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__SLOT_WAIT_SECONDS", "10")
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__REQUEST_TIMEOUT_SECONDS", "7")

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["cdr_webhook"]
    post = dag.get_task("post_cdr")

    assert issubclass(post.operator_class, CdrWebhookOperator)
    assert post.partial_kwargs["cdrs_per_task"] == 100
    assert (
        post.partial_kwargs["map_index_template"]
        == "{{ task.cdr_ids[0] }} ({{ task.cdr_ids | length }} CDRs)"
    )
    # slot wait + every POST of a full chunk at its deadline + 60 s of database work
    assert post.partial_kwargs["execution_timeout"] == dt.timedelta(seconds=10 + 100 * 7 + 60)
    assert [t.task_id for t in post.upstream_list] == ["select_cdrs"]
    assert dag.get_task("select_cdrs").op_kwargs == {"cdrs_per_task": 100}
    assert CdrWebhookOperator.template_fields == ()


def watcher_of(dag):
    """The one AssetWatcher of the DAG's schedule (AssetOrTimeSchedule wraps its asset in an AssetAll)."""
    (asset,) = dag.timetable.asset_condition.objects
    (watcher,) = asset.watchers
    return watcher


def test_watch_settings_reach_the_watcher(settings_env):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import CronDataIntervalTimetable
    from airflow.triggers.base import BaseEventTrigger

    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__WATCH_INTERVAL_SECONDS", "2.5")
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__SOURCE_RELATION", "billing.cdr_feed")
    watcher = watcher_of(DagBag(dag_folder=str(ROOT / "dags")).dags["cdr_webhook"])

    assert isinstance(watcher.trigger, BaseEventTrigger)
    classpath, kwargs = watcher.trigger.serialize()
    assert classpath == "cdr_webhook.watch.trigger.CdrCommitTrigger"
    # The watcher's identity (classpath + kwargs) comes from parse-time settings only: every parse of
    # the DAG finds the same watcher, not a new one.
    assert kwargs == {"source_relation": "billing.cdr_feed", "interval_seconds": 2.5, "conn_id": "cdr_db"}
    again = watcher_of(DagBag(dag_folder=str(ROOT / "dags")).dags["cdr_webhook"])
    assert again.trigger.serialize() == (classpath, kwargs)

    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__WATCH_INTERVAL_SECONDS", "0")
    reread_settings()
    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["cdr_webhook"]
    assert isinstance(dag.timetable, CronDataIntervalTimetable)  # watching off: the schedule alone


def test_one_cdr_per_task_maps_a_post_cdr_task_per_cdr(settings_env):
    from airflow.dag_processing.dagbag import DagBag

    from cdr_webhook.deliver.operator import CDR_NAME_TEMPLATE

    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__CDRS_PER_TASK", "1")

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["cdr_webhook"]

    post = dag.get_task("post_cdr")
    assert post.partial_kwargs["cdrs_per_task"] == 1
    assert post.partial_kwargs["map_index_template"] == CDR_NAME_TEMPLATE
    assert dag.get_task("select_cdrs").op_kwargs == {"cdrs_per_task": 1}


def test_the_schedule_setting_becomes_a_timetable_with_data_intervals(settings_env):
    """A plain cron string would give empty data intervals; the watermark scan needs real ones (inside the
    watcher's AssetOrTimeSchedule)."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import CronDataIntervalTimetable, DeltaDataIntervalTimetable

    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__SCHEDULE", "0 * * * *")
    hourly = DagBag(dag_folder=str(ROOT / "dags")).dags["cdr_webhook"].timetable.timetable
    reread_settings()  # settings are read once per process
    settings_env.setenv("AIRFLOW__CDR_WEBHOOK__SCHEDULE", "30s")
    every_30s = DagBag(dag_folder=str(ROOT / "dags")).dags["cdr_webhook"].timetable.timetable

    assert isinstance(hourly, CronDataIntervalTimetable)
    assert hourly.expression == "0 * * * *"
    assert isinstance(every_30s, DeltaDataIntervalTimetable)
    assert every_30s.delta == dt.timedelta(seconds=30)


def test_the_dag_file_is_the_few_lines_a_deployment_copies_and_safe_mode_parses_it():
    """The DAG's code ships in the package; Airflow's safe mode skips a file without "airflow" and "dag"."""
    import ast

    from airflow.utils.file import might_contain_dag_via_default_heuristic

    path = ROOT / "dags" / "cdr_webhook_dag.py"
    docstring, *code = ast.parse(path.read_text()).body
    assert isinstance(docstring, ast.Expr)
    assert [ast.unparse(node) for node in code] == [
        "from cdr_webhook.dag import cdr_webhook_dag, owner_alerts_dag",
        "cdr_webhook_dag()",
        "owner_alerts_dag()",
    ]
    assert might_contain_dag_via_default_heuristic(str(path))
    assert sorted(p.name for p in (ROOT / "dags").iterdir() if p.suffix == ".py") == ["cdr_webhook_dag.py"]
