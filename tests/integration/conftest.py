"""Fixtures of the integration tests (the session's PostgreSQL ones are in tests/conftest.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from cdr_webhook.ledger import schema

if TYPE_CHECKING:
    import psycopg


@pytest.fixture
def db(cdr_db: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """The test's CDR database with the ledger and endpoint tables made."""
    schema.migrate(cdr_db)
    return cdr_db
