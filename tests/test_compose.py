"""docker-compose.yml, its Dockerfile and .env.example, checked statically (no Docker engine needed).

Every check runs on the real files, and a few also on a deliberately broken copy, to show they can fail.
"""

from __future__ import annotations

import base64
import copy
import re
import shutil
import subprocess
import sys
import zipfile
from typing import Any

import pytest
from cryptography.fernet import Fernet

from tests.compose_checks import (
    ROOT,
    SHARED_ENV,
    InterpolationError,
    airflow_problems,
    airflow_services,
    connection_problems,
    depends_on_problems,
    dockerfile_problems,
    environment,
    gitignore_problems,
    healthcheck_problems,
    interpolate,
    load_compose,
    load_env_file,
    package_source_copies,
    path_problems,
    references,
    setting_problems,
    variable_problems,
)

COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
EXAMPLE = load_env_file((ROOT / ".env.example").read_text())


@pytest.fixture
def raw() -> dict[str, Any]:
    """The compose file as parsed, variables not yet substituted."""
    return load_compose(COMPOSE_TEXT)


@pytest.fixture
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    """The compose file as ``docker compose`` sees it with .env.example copied to .env."""
    return interpolate(raw, EXAMPLE)


# -- parsing and variables ------------------------------------------------------------------------------


def test_anchors_and_merge_keys_resolve(raw: dict[str, Any]) -> None:
    worker = raw["services"]["airflow-worker"]
    assert worker["image"] == raw["x-airflow-common"]["image"]
    assert environment(worker)["DUMB_INIT_SETSID"] == "0"  # its own key, merged over the shared ones
    assert environment(worker)["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert set(worker["depends_on"]) == {"redis", "postgres", "airflow-apiserver", "airflow-init"}


def test_every_variable_is_in_env_example_and_no_secret_has_a_default(raw: dict[str, Any]) -> None:
    assert variable_problems(raw, EXAMPLE) == []
    assert {name for name, _, _ in references(raw)} >= {"AIRFLOW_JWT_SECRET", "RECEIVER_SIGNING_SECRET"}


def test_a_variable_missing_from_env_example_or_a_secret_default_is_reported(raw: dict[str, Any]) -> None:
    broken = copy.deepcopy(raw)
    env = broken["services"]["receiver"]["environment"]
    env["RECEIVER_API_KEY"] = "${RECEIVER_API_KEY:-demo-key}"
    env["LOG_LEVEL"] = "${RECEIVER_LOG_LEVEL}"

    assert variable_problems(broken, EXAMPLE) == [
        "${RECEIVER_LOG_LEVEL} is used in docker-compose.yml but not defined in .env.example",
        "secret ${RECEIVER_API_KEY} must have no default (use ${RECEIVER_API_KEY:?message}), not :-demo-key",
    ]


def test_compose_refuses_to_start_without_the_secrets(raw: dict[str, Any]) -> None:
    without = {name: value for name, value in EXAMPLE.items() if name != "AIRFLOW_JWT_SECRET"}
    with pytest.raises(InterpolationError, match="AIRFLOW_JWT_SECRET: set AIRFLOW_JWT_SECRET in .env"):
        interpolate(raw, without)


def test_env_example_holds_placeholders_of_the_right_form_and_env_is_git_ignored() -> None:
    secrets = {name: value for name, value in EXAMPLE.items() if re.search(r"PASSWORD|SECRET|_KEY$", name)}
    assert len(secrets) == 8
    for name, value in secrets.items():  # a base64 key or whsec_ secret: "change-me" once decoded
        placeholder = (
            value if "change-me" in value else base64.b64decode(value.removeprefix("whsec_")).decode()
        )
        assert "change-me" in placeholder, f"{name} in .env.example is not a placeholder"
    Fernet(EXAMPLE["AIRFLOW_FERNET_KEY"])  # a key of the right form: copied as is, the stack starts
    assert gitignore_problems((ROOT / ".gitignore").read_text()) == []
    assert gitignore_problems(".venv/\n.env.example\n") == [
        ".env is not in .gitignore: a real .env could be committed"
    ]


# -- services, health checks, dependencies, paths ----------------------------------------------------------


def test_every_long_running_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    assert healthcheck_problems(compose["services"]) == []


def test_a_service_without_healthcheck_is_reported(compose: dict[str, Any]) -> None:
    services = copy.deepcopy(compose["services"])
    del services["airflow-scheduler"]["healthcheck"]
    services["receiver"].pop("restart")  # neither long-running nor waited for

    assert healthcheck_problems(services) == [
        "service airflow-scheduler runs with restart: always but has no healthcheck",
        "service receiver is neither long-running (restart: always, with a healthcheck) nor a one-shot that "
        "another service waits for (service_completed_successfully)",
    ]


def test_every_dependency_is_a_service_with_a_condition_it_can_meet(compose: dict[str, Any]) -> None:
    assert depends_on_problems(compose["services"]) == []


def test_a_dependency_on_an_unknown_service_or_without_condition_is_reported(compose: dict[str, Any]) -> None:
    services = copy.deepcopy(compose["services"])
    services["airflow-scheduler"]["depends_on"]["cdr-db"] = {"condition": "service_healthy"}
    services["airflow-triggerer"]["depends_on"]["redis"] = {"restart": True}
    services["airflow-dag-processor"]["depends_on"] = ["postgres"]
    del services["cdr-postgres"]["healthcheck"]
    services["cdr-seed"]["restart"] = "always"  # the scheduler waits for it to complete

    assert depends_on_problems(services) == [
        "service airflow-scheduler waits for cdr-seed to complete; cdr-seed restarts forever",
        "service airflow-scheduler depends on cdr-db, which is not a service",
        "service airflow-dag-processor: depends_on is a list; give each dependency a condition",
        "service airflow-triggerer depends on redis without a condition (None)",
        "service cdr-seed waits for cdr-postgres to be healthy; it has no healthcheck",
    ]


def test_build_contexts_dockerfiles_and_mounted_paths_exist(compose: dict[str, Any]) -> None:
    assert path_problems(compose, ROOT) == []
    built = [name for name, svc in compose["services"].items() if "build" in svc]
    assert set(built) >= {*airflow_services(compose), "cdr-seed", "receiver"}


def test_a_missing_mounted_path_or_dockerfile_is_reported(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["airflow-worker"]["volumes"] = ["./config:/opt/airflow/config", "undeclared:/data"]
    broken["services"]["receiver"]["build"]["dockerfile"] = "demo.Dockerfile"

    assert path_problems(broken, ROOT) == [
        "service airflow-worker bind-mounts ./config, which does not exist in the repository",
        "service airflow-worker mounts volume undeclared, which is not declared under volumes:",
        "service receiver: demo.Dockerfile does not exist",
    ]


# -- the image --------------------------------------------------------------------------------------------


def test_the_dockerfile_builds_on_the_pinned_airflow_with_the_pins_and_the_project() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile_problems(dockerfile, (ROOT / "requirements.txt").read_text(), ROOT) == []


def test_a_dockerfile_on_another_airflow_without_the_pins_or_with_a_plugins_copy_is_reported() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text().replace("apache/airflow:3.3.2", "apache/airflow:3.2.0")
    dockerfile = dockerfile.replace(" -c /opt/cdr-webhook/constraints.txt", "", 1)
    dockerfile = dockerfile.replace(
        "COPY --chown=airflow:0 plugins/cdr_webhook/", "COPY --chown=airflow:0 plugin/"
    )
    dockerfile = dockerfile.replace("RUN python -m compileall", "RUN true")
    # The old image: the package copied into the plugins folder, beside the installed one.
    dockerfile += "COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/\n"

    assert dockerfile_problems(dockerfile, "apache-airflow==3.3.2\n", ROOT) == [
        "the Dockerfile's first FROM is 'apache/airflow:3.2.0-python3.11': it must be apache/airflow:<the "
        "apache-airflow pin of requirements.txt, 3.3.2>",
        "the Dockerfile does not pip install the wheel -r requirements.txt -c constraints.txt",
        "the Dockerfile copies plugin/, which does not exist in the repository",
        "the Dockerfile copies plugins/ into the plugins folder",
        "the Dockerfile does not copy plugins/cdr_webhook into the image",
        "the Dockerfile does not compile the DAG file's bytecode (compileall)",
    ]
    without_wheel = (ROOT / "Dockerfile").read_text().replace("pip wheel", "pip download")
    assert dockerfile_problems(without_wheel, (ROOT / "requirements.txt").read_text(), ROOT) == [
        "the Dockerfile does not build the package's wheel from /opt/cdr-webhook/src"
    ]


def test_the_images_copy_of_the_source_builds_the_wheel(tmp_path) -> None:
    """What the Dockerfile copies to /opt/cdr-webhook/src is enough for the wheel's build (hatchling)."""
    copies = package_source_copies((ROOT / "Dockerfile").read_text())
    assert copies
    src = tmp_path / "src"
    for source, destination in copies:
        target = src / destination.removeprefix("/opt/cdr-webhook/src/")
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / source, target)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", tmp_path / "dist", src],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = (tmp_path / "dist").glob("airflow_provider_cdr_webhook-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {
        "cdr_webhook/dag.py",
        "cdr_webhook/web/templates/base.html",
        "cdr_webhook/payload.schema.json",
    } <= names


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build_context() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*") :].count("!.env") == 0  # everything is excluded, then a few re-included
    assert {
        "!dags",
        "!plugins",
        "!requirements.txt",
        "!constraints.txt",
        "!pyproject.toml",
        "!README.md",
    } <= set(lines)


# -- Airflow ----------------------------------------------------------------------------------------------


def test_every_airflow_component_shares_the_image_secrets_and_urls(compose: dict[str, Any]) -> None:
    assert airflow_problems(compose) == []
    assert set(airflow_services(compose)) == {
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
        "airflow-init",
    }
    for key in SHARED_ENV[:3]:  # set once, in the anchor; never repeated (or overridden) per service
        assert len(re.findall(rf"^\s+{key}:", COMPOSE_TEXT, re.MULTILINE)) == 1, key


def test_a_component_with_another_jwt_secret_or_image_is_reported(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["airflow-worker"]["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"] = "another"
    broken["services"]["airflow-triggerer"]["build"] = {"context": ".", "target": "demo"}
    del broken["services"]["airflow-init"]["build"]
    broken["services"]["airflow-init"]["image"] = "apache/airflow:3.3.2"
    broken["services"]["airflow-scheduler"]["command"] = "standalone"
    for env in [broken["x-airflow-common"], *airflow_services(broken).values()]:
        env["environment"]["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = "http://api:8080/"

    assert airflow_problems(broken) == [
        "service airflow-scheduler runs 'standalone', not 'scheduler'",
        "service airflow-worker: its AIRFLOW__API_AUTH__JWT_SECRET is not x-airflow-common's",
        "service airflow-triggerer does not build the shared image ({'context': '.', 'target': 'demo'})",
        "service airflow-init does not build the shared image (None)",
        "the execution API URL 'http://api:8080/' is not the api-server service's /execution/",
    ]


# -- the product: settings and connections ------------------------------------------------------------------


def test_every_cdr_webhook_setting_is_one_the_dag_reads_and_parses(compose: dict[str, Any]) -> None:
    assert setting_problems(compose) == []
    env = environment(compose["services"]["airflow-worker"])
    assert env["AIRFLOW__CDR_WEBHOOK__ALLOWED_NETWORKS"] == EXAMPLE["CDR_NETWORK_SUBNET"]


def test_an_unknown_setting_or_a_value_that_does_not_parse_is_reported(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["receiver"]["environment"]["AIRFLOW__CDR_WEBHOOK__RETRY"] = "3"
    broken["services"]["airflow-worker"]["environment"]["AIRFLOW__CDR_WEBHOOK__SCHEDULE"] = "every minute"

    problems = setting_problems(broken)

    assert problems[0] == (
        "service airflow-worker: AIRFLOW__CDR_WEBHOOK__SCHEDULE='every minute' is neither a "
        "5-field cron expression nor an interval such as 30s or 5m"
    )
    assert problems[1:] == [
        "service receiver sets AIRFLOW__CDR_WEBHOOK__RETRY, which is not a [cdr_webhook] setting",
        "service airflow-worker has other [cdr_webhook] settings than airflow-scheduler",
    ]


def test_every_connection_is_one_the_dag_reads_valid_and_reachable(compose: dict[str, Any]) -> None:
    assert connection_problems(compose) == []
    assert {key for key in environment(compose["x-airflow-common"]) if key.startswith("AIRFLOW_CONN_")} == {
        "AIRFLOW_CONN_CDR_DB",
        "AIRFLOW_CONN_CDR_WEBHOOK",
    }


def test_an_unknown_or_invalid_or_unreachable_connection_is_reported(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    env = broken["services"]["airflow-worker"]["environment"]
    env["AIRFLOW_CONN_CDR_DATABASE"] = "postgres://cdr:secret@cdr-postgres/cdr"
    env["AIRFLOW_CONN_CDR_WEBHOOK_CLIENT_7"] = '{"conn_type": "http", "host": "http://receiver:8000/x", ' + (
        '"extra": {"signing_secret": "not-a-whsec-secret"}}'
    )
    env["AIRFLOW_CONN_CDR_DB"] = "postgres://cdr:wrong-password@cdr-postgres:5432/cdr"
    env["AIRFLOW__CDR_WEBHOOK__ALLOWED_NETWORKS"] = "10.0.0.0/8"

    problems = [p for p in connection_problems(broken) if p.startswith("service airflow-worker")]

    worker = "service airflow-worker"
    assert problems[0] == (
        f"{worker} AIRFLOW_CONN_CDR_DB: its password is not service cdr-postgres's POSTGRES_PASSWORD"
    )
    assert problems[1].startswith(
        f"{worker} AIRFLOW_CONN_CDR_WEBHOOK: receiver is a compose service, on a private network "
        f"({EXAMPLE['CDR_NETWORK_SUBNET']}) that AIRFLOW__CDR_WEBHOOK__ALLOWED_NETWORKS does not allow"
    )
    assert problems[2] == (
        "service airflow-worker sets AIRFLOW_CONN_CDR_DATABASE: the DAG reads no connection 'cdr_database'"
    )
    assert problems[3].startswith(
        "service airflow-worker AIRFLOW_CONN_CDR_WEBHOOK_CLIENT_7: connection 'cdr_webhook_client_7' extra "
        "'signing_secret': the secret is invalid"
    )
    assert len(problems) == 4


def test_the_triggerer_runs_the_commit_watcher_and_its_health_check_asks_for_a_live_triggerer(compose):
    triggerer = compose["services"]["airflow-triggerer"]
    assert triggerer["command"] == "triggerer"
    assert triggerer["restart"] == "always"
    check = " ".join(triggerer["healthcheck"]["test"])
    # A live TriggererJob of this container (its heartbeat), not merely a process that answers.
    assert "airflow jobs check --job-type TriggererJob" in check
    assert "--hostname" in check
    # It reads the CDR database (the watcher) through the same connection as the workers.
    assert "AIRFLOW_CONN_CDR_DB" in triggerer["environment"]
