"""The HTTP hook that POSTs one CDR: exactly our headers, no redirects, one deadline, a bounded read."""

from __future__ import annotations

import contextlib
import email.utils
import functools
import json
import threading
import time
from typing import TYPE_CHECKING, Any

import requests
import urllib3.exceptions
from airflow.sdk import BaseHook
from requests import Session
from requests.structures import CaseInsensitiveDict

from cdr_webhook.adapters import load_endpoint, load_settings
from cdr_webhook.deliver.deadline import Deadline, watchdog_kept
from cdr_webhook.deliver.egress import EndpointRefused, GuardedAdapter, TlsFiles, pem_files
from cdr_webhook.networks import parse_networks
from cdr_webhook.outcome import PostResult
from cdr_webhook.settings import CDR_DB_CONN_ID
from cdr_webhook.signing import BASE_HEADERS

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from cdr_webhook.deliver.auth import BearerTokens
    from cdr_webhook.deliver.egress import Resolver
    from cdr_webhook.endpoint_config import EndpointConfig


#: The most of a response body read and kept as its excerpt (the ledger's ``response_excerpt``).
EXCERPT_BYTES = 2048


class CdrWebhookHook(BaseHook):
    """
    POST webhook bodies to the endpoint of an HTTP connection, safely.

    Unlike the HTTP provider's ``HttpHook`` it never follows a redirect (a 302
    would turn the POST into a GET and hand ``x-api-key`` to another host), gives each POST one
    deadline (``timeout``) for resolving, connecting, TLS, sending and the reply's status line and
    headers, ignores proxy environment variables, sends no extra as a header but extras ``headers``
    and ``secret_headers`` (the signing secret lives there too), and reads at most
    :data:`EXCERPT_BYTES` of a response, by the same deadline.
    Every request goes through the egress guard (:mod:`cdr_webhook.deliver.egress`): no internal address
    unless ``allowed_networks`` lets it, no plain http outside them, the checked address is the one
    connected to, and TLS is always verified.

    The connection's ``host`` holds the full URL; its ``password`` is the ``x-api-key`` value; its
    extra may hold ``signing_secret`` (a ``whsec_…`` secret or a list of them), ``ca_bundle`` (PEM:
    the CAs to trust instead of the public ones) and ``client_cert`` / ``client_key`` (PEM: mutual TLS).

    :param http_conn_id: The HTTP connection of the endpoint.
    :param timeout: The deadline of each POST, in seconds, from resolving the host to reading the
        reply's excerpt. A reply whose status line and headers are not complete by then is a
        (retryable) failure; a body still arriving then leaves a partial excerpt.
    :param allowed_networks: CIDRs the egress guard lets through (internal receivers).
    :param resolver: ``(host, port) -> addresses``, for tests; the default is the system resolver.
    :param db_conn_id: The CDR database, where an OAuth2 endpoint's token is shared by every worker
        (:mod:`cdr_webhook.deliver.auth`); None, each hook fetches its own.

    It derives from ``BaseHook``, not from the provider's ``HttpHook``: every method of that hook is
    replaced here, and importing its module would load ``aiohttp`` in every task process for nothing
    (``docs/benchmarks.md``). Connections keep the provider's ``http`` type.
    """

    conn_name_attr = "http_conn_id"
    default_conn_name = "cdr_webhook"
    conn_type = "http"
    hook_name = "CDR webhook endpoint"

    def __init__(
        self,
        http_conn_id: str,
        *,
        timeout: float = 15.0,
        allowed_networks: Sequence[str] = (),
        resolver: Resolver | None = None,
        db_conn_id: str | None = CDR_DB_CONN_ID,
    ) -> None:
        super().__init__()
        self.http_conn_id = http_conn_id
        self.timeout = timeout
        self.allowed_networks = parse_networks(",".join(allowed_networks))
        self.resolver = resolver
        self.db_conn_id = db_conn_id
        self._bearer_lock = threading.Lock()

    @classmethod
    def from_settings(cls, http_conn_id: str, *, db_conn_id: str = CDR_DB_CONN_ID) -> CdrWebhookHook:
        """The hook of an endpoint with the ``request_timeout_seconds`` and ``allowed_networks`` settings."""
        settings = load_settings()
        return cls(
            http_conn_id,
            timeout=settings.request_timeout_seconds,
            allowed_networks=settings.allowed_networks,
            db_conn_id=db_conn_id,
        )

    @functools.cached_property
    def connection(self) -> Any:
        """The endpoint's Airflow connection, looked up once per hook (once per task)."""
        return self.get_connection(self.http_conn_id)

    @functools.cached_property
    def endpoint(self) -> EndpointConfig:
        """The endpoint's configuration; raises :class:`~cdr_webhook.endpoint_config.EndpointConfigError`."""
        return load_endpoint(self.http_conn_id, lambda _: self.connection)

    @functools.cached_property
    def _request_template(self) -> requests.PreparedRequest:
        """A POST to the endpoint's URL, parsed and checked once (raises ValueError for a bad URL)."""
        return requests.Request("POST", self.endpoint.url).prepare()

    def _request(self, body: bytes, headers: dict[str, str]) -> requests.PreparedRequest:
        """The request for ``body``: exactly :data:`BASE_HEADERS`, ``headers`` and its length."""
        # A new request with the template's URL, not a copy of it: a copy copies its (empty) cookie jar.
        request = requests.PreparedRequest()
        request.method = "POST"
        request.url = self._request_template.url
        request.headers = CaseInsensitiveDict(BASE_HEADERS)
        request.headers.update(headers)
        request.headers["Content-Length"] = str(len(body))
        request.body = body
        return request

    def get_conn(
        self,
        headers: dict[Any, Any] | None = None,
        *,
        tls: TlsFiles | None = None,
    ) -> Session:
        """Return a session with no auth, no extras as headers, no proxies, and the egress guard."""
        session = Session()
        session.trust_env = False
        session.headers.clear()
        session.headers.update(BASE_HEADERS)
        guard = self.guard(tls)
        session.mount("http://", guard)
        session.mount("https://", guard)
        if headers:
            session.headers.update(headers)
        return session

    def guard(self, tls: TlsFiles | None = None) -> GuardedAdapter:
        """The egress guard of a session to the endpoint (or its token endpoint), with its TLS files."""
        tls = tls or TlsFiles()
        return GuardedAdapter(
            self.allowed_networks,
            ca_bundle=tls.ca_bundle,
            client_cert=tls.client_cert,
            resolver=self.resolver,
        )

    def bearer(self) -> BearerTokens | None:
        """The endpoint's OAuth2 tokens, made once per hook; None without OAuth2 (or a bad connection)."""
        with self._bearer_lock:  # one per hook: its threads share one token and one fetch at a time
            if "_bearer" not in self.__dict__:
                try:
                    oauth2 = self.endpoint.auth.oauth2
                except ValueError:  # a connection that cannot be used: the POST reports it
                    oauth2 = None
                if oauth2 is None:
                    self._bearer = None
                else:
                    from cdr_webhook.deliver.token_fetch import (
                        bearer_tokens,
                    )  # authlib, for OAuth2 tasks only

                    self._bearer = bearer_tokens(self)
            return self._bearer

    @contextlib.contextmanager
    def session_pool(self) -> Iterator[SessionPool]:
        """
        Yield a pool of kept-alive sessions to the endpoint, for the block.

        A POST takes an idle session (or a new one) and gives it back after, so consecutive POSTs
        to the endpoint reuse its connections whichever thread sends them; the deadlines' watchdog
        thread stays for the block. Raises :class:`ValueError` when a TLS extra is malformed (a POST
        without a session reports that as the refusal it is).
        """
        with pem_files(self.endpoint.conn_id, self.endpoint.tls_extra()) as tls, watchdog_kept():
            pool = SessionPool(lambda: self.get_conn(tls=tls))
            try:
                yield pool
            finally:
                pool.close()

    @contextlib.contextmanager
    def sessions(self) -> Iterator[Callable[[], Session]]:
        """Yield ``session()``: the calling thread's own session of a :meth:`session_pool`, for the block."""
        with self.session_pool() as pool:
            local = threading.local()

            def session() -> Session:
                found = getattr(local, "session", None)
                if found is None:
                    found = local.session = pool.take()
                return found

            yield session

    def post(self, body: bytes, headers: dict[str, str], *, session: Session | None = None) -> PostResult:
        """
        POST ``body`` with exactly ``headers`` (and an OAuth2 endpoint's bearer token); never raise
        for HTTP or network trouble, or a refusal.

        ``session``: one from :meth:`sessions`, whose connections are kept alive from POST to POST;
        by default the POST has a session of its own.
        """
        tokens = self.bearer()
        if tokens is None:
            return self._post_once(body, headers, session)
        return tokens.post(lambda sent: self._post_once(body, sent, session), headers)

    def _post_once(self, body: bytes, headers: dict[str, str], session: Session | None) -> PostResult:
        """One POST of ``body`` with exactly ``headers``."""
        started, sent_at = time.monotonic(), time.time()
        refused = False
        try:
            with contextlib.ExitStack() as stack:
                if session is None:
                    tls = stack.enter_context(pem_files(self.endpoint.conn_id, self.endpoint.tls_extra()))
                deadline = stack.enter_context(Deadline(self.timeout))
                if session is None:  # its own session, closed before the deadline and the TLS files end
                    session = stack.enter_context(self.get_conn(tls=tls))
                try:
                    return self._exchange(session, self._request(body, headers), deadline, started, sent_at)
                except requests.RequestException:
                    if not deadline.passed:
                        raise
                    # The watchdog shut the sockets: the error that caused is a symptom, not the reason.
                    error = (
                        f"no complete reply within the {self.timeout:g} s deadline ({_waited_for(deadline)})"
                    )
        except EndpointRefused as err:
            error, refused = f"refused by the egress guard: {err}", True
        except ValueError as err:  # the endpoint URL or a TLS extra is malformed: no retry can help
            error, refused = f"endpoint misconfigured: {err}", True
        except requests.Timeout as err:
            error = f"timed out after {self.timeout:g} s ({network_reason(err)})"
        except requests.exceptions.SSLError as err:
            error = f"TLS failed: {network_reason(err)}"
        except requests.RequestException as err:
            error = f"connection failed: {network_reason(err)}"
        return PostResult(
            http_status=None,
            reason=None,
            response_excerpt=None,
            latency_ms=_elapsed_ms(started),
            sent_at=sent_at,
            error=error,
            refused=refused,
        )

    def _exchange(
        self,
        session: Session,
        request: requests.PreparedRequest,
        deadline: Deadline,
        started: float,
        sent_at: float,
    ) -> PostResult:
        """Send ``request`` and read the reply's status line, headers and excerpt, by the deadline."""
        # Straight to the session's egress guard: Session.post would merge settings, parse the URL,
        # run hooks and keep the receiver's cookies for the next POST (none of which a webhook
        # wants): over a third of a kept-alive POST's CPU.
        with session.get_adapter(request.url).send(
            request, stream=True, timeout=(self.timeout, self.timeout), proxies={}
        ) as response:
            excerpt = _read_excerpt(response, deadline.ends)
            return PostResult(
                http_status=response.status_code,
                reason=response.reason,
                response_excerpt=excerpt,
                latency_ms=_elapsed_ms(started),
                sent_at=sent_at,
                retry_after=retry_after_seconds(response.headers.get("retry-after")),
            )


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """Return the wait a ``Retry-After`` header asks for (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _waited_for(deadline: Deadline) -> str:
    if deadline.connected:
        return "the receiver answered too slowly or not at all"
    return "resolving the host or connecting took too long"


def _elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def _read_excerpt(response: requests.Response, deadline: float) -> str | None:
    """Read at most EXCERPT_BYTES of the body, giving up at the deadline (a drip-feeding server)."""
    chunks: list[bytes] = []
    size = 0
    try:
        while size < EXCERPT_BYTES and time.monotonic() < deadline:
            # read1 returns what has arrived: a body cut off at the deadline keeps the bytes it sent.
            # (requests' iter_content reads whole chunks and drops a short one as an IncompleteRead.)
            chunk = response.raw.read1(512, decode_content=True)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
        pass  # the status line arrived, which is what decides the outcome; the excerpt is a courtesy
    if not chunks:
        return None
    return _excerpt_text(b"".join(chunks))


def _excerpt_text(raw: bytes) -> str:
    text = raw[:EXCERPT_BYTES].decode("utf-8", errors="replace").replace("\x00", "")
    while len(text.encode("utf-8")) > EXCERPT_BYTES:  # replacement characters are 3 bytes each
        text = text[:-1]
    return text


def network_reason(err: BaseException) -> str:
    """
    Describe a network error by its innermost cause.

    requests' own messages repeat the URL, and a webhook URL may carry a token in its path or query:
    the innermost urllib3/socket error names only the host and the problem.
    """
    reason: BaseException = err
    seen = set()
    while id(reason) not in seen:
        seen.add(id(reason))
        inner = getattr(reason, "reason", None)
        if not isinstance(inner, BaseException) and reason.args and isinstance(reason.args[0], BaseException):
            inner = reason.args[0]
        if not isinstance(inner, BaseException):
            break
        reason = inner
    text = str(reason)
    if "url:" in text:  # a wrapper that still quotes the URL: keep only its class
        text = type(reason).__name__
    return text


def describe_excerpt(excerpt: str | None) -> str:
    """Return a short, log-safe rendering of a response excerpt."""
    if not excerpt:
        return "(empty body)"
    shown = excerpt if len(excerpt) <= 200 else excerpt[:200] + "…"
    return json.dumps(shown, ensure_ascii=False)


class SessionPool:
    """Idle sessions to one endpoint, taken and given back by any thread; all closed at the end."""

    def __init__(self, make: Callable[[], Session]) -> None:
        self._make = make
        self._idle: list[Session] = []
        self._made: list[Session] = []
        self._lock = threading.Lock()

    def take(self) -> Session:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        session = self._make()
        with self._lock:
            self._made.append(session)
        return session

    def give(self, session: Session) -> None:
        with self._lock:
            self._idle.append(session)

    def close(self) -> None:
        with self._lock:
            made, self._made, self._idle = self._made, [], []
        for session in made:
            session.close()
