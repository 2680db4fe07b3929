"""An endpoint's OAuth2 bearer token: fetched through the egress guard, shared, refreshed on a 401.

The client-credentials grant (RFC 6749 4.4) is authlib's ``OAuth2Session.fetch_token``
(:mod:`cdr_webhook.deliver.token_fetch`); what is ours is where the bytes go and how long a token lives:

* the token request goes through the hook's egress guard with the endpoint's TLS settings, one
  deadline (``request_timeout_seconds``), no redirect, no proxy, a bounded reply;
* a token is used until shortly before it expires (:data:`EARLY_SECONDS`), by every thread of the
  task (:class:`BearerTokens`) and every task and worker (:class:`SharedTokens`: the ledger's
  ``oauth2_token`` row, encrypted, under a row lock so that one worker fetches and the others wait);
* a 401 to a token fetches a new one once and sends the POST again once; a 401 to that one is the
  POST's outcome, as without OAuth2;
* a token endpoint that fails makes the POST a retryable failure whose reason names the token
  endpoint's origin and the problem, never a secret; for :data:`FAILURE_PAUSE` seconds after, the
  task's other POSTs fail with that reason without asking it again.

A token is never logged, stored in plain text, put in XCom or shown: it is registered with Airflow's
secret masker when obtained and scrubbed from whatever a receiver echoes.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import psycopg
from airflow.sdk import conf
from airflow.sdk.log import mask_secret
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cdr_webhook.ledger import tokens
from cdr_webhook.outcome import PostResult

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from cdr_webhook.receiver_auth import OAuth2ClientCredentials

log = logging.getLogger(__name__)

#: A token is used until this long before it expires, so that none lapses on its way to the receiver...
EARLY_SECONDS = 60.0
#: ...or until this share of its lifetime is left, for short-lived tokens.
EARLY_SHARE = 0.1
#: After a failed fetch, the task's POSTs fail with its reason for this long without asking again.
FAILURE_PAUSE = 5.0
#: A token fetched after a 401 that is refused too within this long is not replaced: the 401 stands.
REFRESH_AGAIN_AFTER = 60.0


class TokenUnavailable(Exception):
    """No token to send: the reason names the token endpoint's origin and the problem, never a secret."""

    def __init__(self, reason: str, *, refused: bool = False) -> None:
        super().__init__(reason)
        self.refused = refused  # the egress guard refused the token endpoint: no retry can help

    def result(self, started: float, sent_at: float, *, before: str = "") -> PostResult:
        """The POST's result: nothing was sent to the receiver; retryable unless refused."""
        return PostResult(
            http_status=None,
            reason=None,
            response_excerpt=None,
            latency_ms=round((time.monotonic() - started) * 1000),
            sent_at=sent_at,
            error=before + str(self),
            refused=self.refused,
        )


@dataclasses.dataclass(frozen=True)
class AccessToken:
    """A bearer token and its lifetime, in seconds since the epoch."""

    value: str = dataclasses.field(repr=False)
    fetched_at: float
    expires_at: float

    def usable(self, now: float) -> bool:
        """Whether it is still to be sent: not within :data:`EARLY_SECONDS` of its expiry."""
        early = min(EARLY_SECONDS, (self.expires_at - self.fetched_at) * EARLY_SHARE)
        return now < self.expires_at - early


class BearerTokens:
    """One endpoint's token for every thread of a task: one fetch at a time, each one logged."""

    def __init__(
        self,
        endpoint_id: str,
        fetch: Callable[[], AccessToken],
        store: SharedTokens | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.endpoint_id = endpoint_id
        self._fetch = fetch
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._token: AccessToken | None = None
        self._after_401: dict[str, float] = {}  # tokens obtained because a 401 refused the one before
        self._failure: tuple[TokenUnavailable, float] | None = None
        self._used: list[str] = []  # every token this task sent: scrubbed from what receivers echo

    def post(self, send: Callable[[dict[str, str]], PostResult], headers: Mapping[str, str]) -> PostResult:
        """POST with the bearer token (``send`` takes the headers); after a 401, once more with a new one."""
        started, sent_at = time.monotonic(), time.time()
        try:
            token = self.current()
        except TokenUnavailable as err:
            return err.result(started, sent_at)
        result = send({**headers, "authorization": f"Bearer {token}"})
        if result.http_status == 401:
            try:
                fresh = self.refresh(token)
            except TokenUnavailable as err:
                return err.result(started, sent_at, before="HTTP 401 to the OAuth2 token, and no new one: ")
            if fresh is not None:
                result = send({**headers, "authorization": f"Bearer {fresh}"})
        return result.scrubbed(tuple(self._used))

    def current(self) -> str:
        """The token to send now: this task's, else the shared one, else a new one."""
        with self._lock:
            now = self._clock()
            if self._token is not None and self._token.usable(now):
                return self._token.value
            found = self._store.read() if self._store is not None else None
            if found is not None and found.usable(now):
                return self._use(found).value
            return self._obtain(rejected=None).value

    def refresh(self, rejected: str) -> str | None:
        """
        The token to send after ``rejected`` got a 401: one another thread or worker got since, else a
        new one; None when ``rejected`` itself came after a 401 a moment ago (the 401 stands).
        """
        with self._lock:
            if self._token is not None and self._token.value != rejected:
                return self._token.value
            since = self._after_401.get(rejected)
            if since is not None and self._clock() - since < REFRESH_AGAIN_AFTER:
                return None
            log.info(
                "Endpoint %s answered 401 to its OAuth2 token: sending once more with a new one",
                self.endpoint_id,
            )
            token = self._obtain(rejected=rejected)
            self._after_401[token.value] = self._clock()
            return token.value

    def _obtain(self, *, rejected: str | None) -> AccessToken:
        now = self._clock()
        if self._failure is not None and now < self._failure[1]:
            raise self._failure[0]
        try:
            if self._store is None:
                token = self._fetch()
            else:
                token = self._store.fetch_unless_fresh(self._fetch, rejected=rejected, now=now)
        except TokenUnavailable as err:
            self._failure = (err, now + FAILURE_PAUSE)
            raise
        self._failure = None
        return self._use(token)

    def _use(self, token: AccessToken) -> AccessToken:
        mask_secret(token.value)  # in this task's log, and its supervisor's
        self._token = token
        self._used = [*self._used[-7:], token.value]
        return token


class SharedTokens:
    """The endpoint's token in the CDR database, encrypted: every task and worker uses one fetch."""

    def __init__(
        self,
        endpoint_id: str,
        credentials: OAuth2ClientCredentials,
        connect: Callable[[], psycopg.Connection[Any]],
        *,
        wait_seconds: float,
    ) -> None:
        self.endpoint_id = endpoint_id
        self._fernet = token_cipher(endpoint_id, credentials)
        self._connect = connect
        self.wait_seconds = wait_seconds

    def read(self) -> AccessToken | None:
        """The stored token, if it can be decrypted (other credentials or key: none)."""
        try:
            with contextlib.closing(self._connect()) as conn:
                return self._decrypted(tokens.read_token(conn, self.endpoint_id))
        except psycopg.Error as err:
            log.warning(
                "Endpoint %s: the shared OAuth2 token cannot be read (%s)",
                self.endpoint_id,
                type(err).__name__,
            )
            return None

    def fetch_unless_fresh(
        self, fetch: Callable[[], AccessToken], *, rejected: str | None, now: float
    ) -> AccessToken:
        """Under the row's lock: the stored token if another worker just got it, else ``fetch()``'s."""
        try:
            with contextlib.closing(self._connect()) as conn:
                with tokens.locked_token(conn, self.endpoint_id, wait_seconds=self.wait_seconds) as row:
                    found = self._decrypted(row.stored)
                    if found is not None and found.usable(now) and found.value != rejected:
                        return found
                    token = fetch()
                    row.save(
                        self._fernet.encrypt(token.value.encode()),
                        fetched_at=dt.datetime.fromtimestamp(token.fetched_at, dt.UTC),
                        expires_at=dt.datetime.fromtimestamp(token.expires_at, dt.UTC),
                    )
                    return token
        except tokens.TokenLockTimeout as err:
            raise TokenUnavailable(str(err)) from None
        except psycopg.Error as err:  # the token is still fetched, for this task alone
            log.warning(
                "Endpoint %s: the shared OAuth2 token cannot be used (%s)",
                self.endpoint_id,
                type(err).__name__,
            )
            return fetch()

    def _decrypted(self, stored: tokens.StoredToken | None) -> AccessToken | None:
        if stored is None:
            return None
        try:
            value = self._fernet.decrypt(stored.ciphertext).decode()
        except InvalidToken:  # another client secret, token URL or fernet_key since: fetch anew
            return None
        return AccessToken(value, stored.fetched_at.timestamp(), stored.expires_at.timestamp())


def token_cipher(endpoint_id: str, credentials: OAuth2ClientCredentials) -> Fernet:
    """
    The Fernet key of an endpoint's stored token: derived (HKDF-SHA256) from Airflow's ``[core]
    fernet_key`` (its first key; the task SDK reads it as the metadata database's encryption does) and
    the client secret, bound to the endpoint and its token request.

    Reading the ledger is not enough to use a token: that needs the worker's configuration and the
    connection's secret. New credentials (or a new fernet_key) make the stored token unreadable,
    which is a fetch, never a token sent for the wrong client.
    """
    airflow_key = (conf.get("core", "fernet_key", fallback="") or "").split(",")[0].strip()
    info = "\n".join(
        (
            "cdr-webhook oauth2 token",
            endpoint_id,
            credentials.token_url,
            credentials.client_id,
            credentials.scope or "",
            credentials.audience or "",
        )
    )
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(
        airflow_key.encode() + b"\0" + credentials.client_secret.encode()
    )
    return Fernet(base64.urlsafe_b64encode(key))
