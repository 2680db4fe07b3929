"""The package as a user installs it: the wheel, in a fresh virtualenv, beside the oldest Airflow it allows.

The wheel is built from this repository (``pip wheel``) and installed with ``apache-airflow`` at the
floor of its own requirement and whatever providers the resolver picks for it (uv's, which installs in
seconds what pip takes a minute for; pip then checks the set): not the pinned set the rest of the
suite runs on. A real Airflow (api-server, scheduler, dag-processor, triggerer) runs from that
virtualenv with an empty plugins folder and, in its dags folder, only ``dags/cdr_webhook_dag.py``:
everything else (the DAG's code, the page, the watcher's trigger, the settings, the CLI) comes from
site-packages. One deployment for the module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from email.parser import Parser
from typing import TYPE_CHECKING, Any

import pytest
import requests
from packaging.version import Version
from uv import find_uv_bin

from demo.dialer import Dialer
from tests.conftest import ROOT
from tests.support.deployments import receiver_deployment

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.e2e, pytest.mark.scheduler, pytest.mark.package]

DISTRIBUTION = "airflow-provider-cdr-webhook"


def run(*args: str | Path, timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(arg) for arg in args], capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def tree(path: Path) -> set[str]:
    """The files under ``path`` (bytecode caches aside): a build must add none."""
    return {str(p.relative_to(path)) for p in path.rglob("*") if "__pycache__" not in p.parts}


def requirements(wheel: Path) -> list[Any]:
    """The wheel's own requirements (Requires-Dist)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        [metadata] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        headers = Parser().parsestr(archive.read(metadata).decode())
    return [Requirement(text) for text in headers.get_all("Requires-Dist") or []]


def floor(requirement: Any) -> str:
    """The lowest version a requirement allows (its ``>=`` bound)."""
    [version] = [spec.version for spec in requirement.specifier if spec.operator == ">="]
    return version


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """
    Build the wheel, and install it with the oldest Airflow it allows into a new virtualenv.

    ``CDR_PACKAGE_FLOORS=1``: every requirement of the wheel at its floor, not only Airflow (on demand;
    docs/install.md). ``CDR_PACKAGE_VENV=<path>``: install into that virtualenv instead of a new one
    (a faster loop while working on this; the wheel is reinstalled in it).
    """
    where = tmp_path_factory.mktemp("package")
    before = tree(ROOT / "plugins")
    began = time.monotonic()
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", where / "dist", ROOT)
    [wheel] = (where / "dist").glob("*.whl")
    built = time.monotonic()
    assert tree(ROOT / "plugins") == before  # the build backend wrote nothing into the source tree
    wanted = {
        r.name: floor(r)
        for r in requirements(wheel)
        if r.name == "apache-airflow" or os.environ.get("CDR_PACKAGE_FLOORS") == "1"
    }
    extras = {r.name: f"[{','.join(sorted(r.extras))}]" if r.extras else "" for r in requirements(wheel)}
    venv = os.environ.get("CDR_PACKAGE_VENV") or where / "venv"
    python = f"{venv}/bin/python"
    if not os.environ.get("CDR_PACKAGE_VENV"):
        run(sys.executable, "-m", "venv", venv)
    uv = find_uv_bin()
    run(uv, "pip", "install", "--python", python, "--quiet", "--no-deps", "--reinstall", wheel)
    pins = [f"{name}{extras[name]}=={version}" for name, version in wanted.items()]
    run(uv, "pip", "install", "--python", python, "--quiet", wheel, *pins)
    run(python, "-m", "pip", "check")
    listed = json.loads(run(python, "-m", "pip", "list", "--format", "json").stdout)
    versions = {package["name"].lower(): package["version"] for package in listed}
    assert all(Version(versions[name.lower()]) == Version(version) for name, version in wanted.items())
    print(
        f"\nwheel built in {built - began:.1f} s; {wheel.name} installed with {', '.join(pins)} "
        f"in {time.monotonic() - built:.1f} s"
    )
    return {"python": python, "wheel": wheel, "airflow_floor": wanted["apache-airflow"]}


@pytest.fixture(scope="module")
def deployment(installed, pg_server, cdr_dsn, tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-package")
    (home / "dags").mkdir()
    (home / "plugins").mkdir()
    shutil.copy(ROOT / "dags" / "cdr_webhook_dag.py", home / "dags")
    env = {
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(home / "plugins"),
        # Hourly: a CDR delivered within seconds was sent by a run the commit watcher started.
        "AIRFLOW__CDR_WEBHOOK__SCHEDULE": "0 * * * *",
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PYTHONPATH", raising=False)  # nothing of this checkout reaches its processes
        with receiver_deployment(home, pg_server, cdr_dsn, env, python=str(installed["python"])) as (
            stack,
            receiver,
        ):
            yield stack, receiver


def test_the_installed_airflow_is_the_oldest_the_ranges_allow_and_imports_the_package_from_site_packages(
    installed, deployment
):
    stack, _ = deployment
    found = run(
        installed["python"],
        "-c",
        "import airflow, cdr_webhook; print(airflow.__version__); print(cdr_webhook.__file__)",
        cwd=stack.home,
        env=stack.env,
    ).stdout.split()
    assert Version(found[0]) == Version(installed["airflow_floor"])
    assert "site-packages" in found[1]
    assert sorted(os.listdir(stack.home / "plugins")) == []
    assert sorted(os.listdir(stack.home / "dags")) == ["cdr_webhook_dag.py"]


def test_airflow_names_the_provider_and_the_plugin(installed, deployment):
    stack, _ = deployment
    providers = json.loads(stack.airflow("providers", "list", "--output", "json").stdout)
    [ours] = [p for p in providers if p["package_name"] == DISTRIBUTION]
    assert ours["version"] == installed["wheel"].name.split("-")[1]
    plugins = json.loads(stack.airflow("plugins", "--output", "json").stdout)
    [plugin] = [p for p in plugins if p["name"] == "cdr_webhook"]
    assert plugin["source"].startswith(f"{DISTRIBUTION}=="), plugin["source"]  # the entry point
    assert stack.api("GET", "/plugins/importErrors")["import_errors"] == []


def test_the_config_section_answers_its_defaults(deployment):
    from cdr_webhook.setting_docs import default_text

    stack, _ = deployment
    answer = stack.airflow("config", "get-value", "cdr_webhook", "watch_interval_seconds").stdout.strip()
    assert answer == default_text("watch_interval_seconds") == "1"
    assert stack.airflow("config", "get-value", "cdr_webhook", "cdrs_per_task").stdout.strip() == "auto"
    listed = stack.airflow("config", "list", "--section", "cdr_webhook", "--include-descriptions").stdout
    assert "The least time between the commit watcher's run starts" in listed


def test_the_deliveries_page_answers_with_its_package_data(deployment):
    stack, _ = deployment
    page = requests.get(f"{stack.base}/cdr-webhook/", headers=stack.auth_headers(), timeout=30)
    assert page.status_code == 200, page.text[:2000]
    assert "<html" in page.text.lower()
    icon = requests.get(f"{stack.base}/cdr-webhook/static/icon.svg", timeout=30)
    assert icon.status_code == 200
    assert "<svg" in icon.text


def test_commits_one_at_a_time_are_posted_within_seconds_by_runs_the_watcher_starts(deployment, cdr_conn):
    stack, receiver = deployment
    deadline = time.monotonic() + 90
    while "Watching cdr_webhook_source" not in stack.log_tail("triggerer", 1_000_000):
        assert time.monotonic() < deadline, stack.log_tail("triggerer")
        time.sleep(0.5)
    dialer = Dialer(cdr_conn)
    latencies, cdrs = [], []
    for _ in range(3):
        committed = time.time()
        cdr = dialer.cdr()
        cdrs.append(cdr)
        while not receiver.received(cdr):
            assert time.time() - committed < 30, stack.log_tail("triggerer")
            time.sleep(0.1)
        latencies.append(receiver.received(cdr)[0].at - committed)
    print(f"\ncommit to POST, one CDR at a time: {', '.join(f'{s:.1f} s' for s in latencies)}")
    assert max(latencies) < 20  # an hourly schedule: only the watcher's runs can have sent them
    owners = {
        run_id
        for (run_id,) in cdr_conn.execute(
            "SELECT run_id FROM cdr_webhook.delivery WHERE cdr_id = ANY(%s) AND status = 'delivered'", (cdrs,)
        )
    }
    assert {run["run_type"] for run in stack.runs() if run["dag_run_id"] in owners} == {"asset_triggered"}


def test_the_operator_cli_runs_as_an_airflow_command_and_as_a_module(installed, deployment):
    stack, _ = deployment
    checked = stack.airflow("cdr-webhook", "endpoints", "check", "cdr_webhook").stdout
    assert checked.startswith("ok     cdr_webhook: http://127.0.0.1:")
    listed = run(installed["python"], "-m", "cdr_webhook", "endpoints", "list", cwd=stack.home, env=stack.env)
    [row] = [line for line in listed.stdout.splitlines() if line.startswith("cdr_webhook ")]
    assert "active" in row
    refused = subprocess.run(  # its exit status too: 1 for a connection that does not exist
        [installed["python"], "-m", "airflow", "cdr-webhook", "endpoints", "check", "no_such_endpoint"],
        capture_output=True,
        text=True,
        cwd=stack.home,
        env=stack.env,
        check=False,
    )
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "no_such_endpoint" in refused.stdout + refused.stderr
