"""Each endpoint's OAuth2 access token, shared by every task and worker: ``cdr_webhook.oauth2_token``.

The ledger stores what it is given, ciphertext only (:mod:`cdr_webhook.deliver.auth` encrypts and
decrypts); a token row is also the lock under which one worker fetches a token while the others
wait for it, so an expiring token brings one fetch, not one per worker (no thundering herd).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any

import psycopg

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Iterator


class TokenLockTimeout(Exception):
    """Another worker held the endpoint's token row longer than the wait: it is still fetching."""


@dataclasses.dataclass(frozen=True)
class StoredToken:
    """A token as stored: its ciphertext, when it was fetched and when it expires."""

    ciphertext: bytes = dataclasses.field(repr=False)
    fetched_at: dt.datetime
    expires_at: dt.datetime


_SELECT = "SELECT token, fetched_at, expires_at FROM cdr_webhook.oauth2_token WHERE endpoint = %s"


def read_token(conn: psycopg.Connection[Any], endpoint: str) -> StoredToken | None:
    """The endpoint's stored token, or None (never fetched); no lock is taken."""
    return _stored(conn.execute(_SELECT, (endpoint,)).fetchone())


class LockedToken:
    """The endpoint's token row, locked until the block of :func:`locked_token` ends."""

    def __init__(self, conn: psycopg.Connection[Any], endpoint: str, stored: StoredToken | None) -> None:
        self._conn = conn
        self.endpoint = endpoint
        self.stored = stored

    def save(self, ciphertext: bytes, *, fetched_at: dt.datetime, expires_at: dt.datetime) -> None:
        """Store a token just fetched (committed when the block ends), and count the fetch."""
        self._conn.execute(
            "UPDATE cdr_webhook.oauth2_token SET token = %s, fetched_at = %s, expires_at = %s, "
            "fetches = fetches + 1, updated_at = now() WHERE endpoint = %s",
            (ciphertext, fetched_at, expires_at, self.endpoint),
        )
        self.stored = StoredToken(ciphertext, fetched_at, expires_at)


@contextlib.contextmanager
def locked_token(
    conn: psycopg.Connection[Any], endpoint: str, *, wait_seconds: float
) -> Iterator[LockedToken]:
    """
    Lock the endpoint's token row (made on first use) for the block, in one transaction; yield it.

    A second worker blocks here until the first commits, then finds the token it fetched. It waits at
    most ``wait_seconds`` (:class:`TokenLockTimeout`): the holder fetches within its request timeout.
    """
    try:
        with conn.transaction():
            conn.execute(
                "SELECT set_config('lock_timeout', %s, true)", (f"{max(int(wait_seconds * 1000), 1)}ms",)
            )
            conn.execute(
                "INSERT INTO cdr_webhook.oauth2_token (endpoint) VALUES (%s) ON CONFLICT DO NOTHING",
                (endpoint,),
            )
            row = conn.execute(_SELECT + " FOR UPDATE", (endpoint,)).fetchone()
            yield LockedToken(conn, endpoint, _stored(row))
    except psycopg.errors.LockNotAvailable:
        raise TokenLockTimeout(
            f"another worker has been fetching endpoint {endpoint}'s OAuth2 token for over {wait_seconds:g} s"
        ) from None


def token_fetches(conn: psycopg.Connection[Any], endpoint: str) -> int:
    """How many tokens were fetched for the endpoint, by every worker (0: none yet)."""
    row = conn.execute(
        "SELECT fetches FROM cdr_webhook.oauth2_token WHERE endpoint = %s", (endpoint,)
    ).fetchone()
    return row[0] if row else 0


def _stored(row: Any) -> StoredToken | None:
    if row is None or row[0] is None:
        return None
    return StoredToken(bytes(row[0]), row[1], row[2])
