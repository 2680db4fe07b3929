"""The receiver's own authentication of an endpoint: extra headers, and OAuth2 client credentials. Pure.

Both come from the endpoint connection's extra (parsed by :func:`cdr_webhook.endpoint_config.parse_endpoint`,
which turns an :class:`AuthConfigError` into its ``EndpointConfigError``):

* ``headers``: ``{"X-Tenant": "acme"}``, sent as they are on every POST and shown on previews;
* ``secret_headers``: the same, but each value is a secret: masked in logs, scrubbed from what a
  receiver echoes, never shown (Airflow's own masker hides the whole extra too: its name says secret);
* ``oauth2_token_url``, ``oauth2_client_id``, ``oauth2_client_secret`` (required together),
  ``oauth2_scope``, ``oauth2_audience``, ``oauth2_client_auth``: a bearer token from the RFC 6749
  client-credentials grant (fetched, cached and refreshed by :mod:`cdr_webhook.deliver.auth`).

``x-api-key`` and the Standard Webhooks headers are ours: a header that would replace one of them
(or the bearer token's ``authorization``) is refused with the reason, never silently overridden.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

HEADERS_EXTRA = "headers"
SECRET_HEADERS_EXTRA = "secret_headers"
OAUTH2_PREFIX = "oauth2_"
OAUTH2_EXTRAS = (
    "oauth2_token_url",
    "oauth2_client_id",
    "oauth2_client_secret",
    "oauth2_scope",
    "oauth2_audience",
    "oauth2_client_auth",
)
#: How the client authenticates to the token endpoint (RFC 6749 2.3.1); basic is the one every
#: authorization server must support.
CLIENT_AUTH_METHODS = ("client_secret_basic", "client_secret_post")

#: The headers a delivery sets itself, and why an endpoint's own header may not replace them.
RESERVED_HEADERS = {
    "x-api-key": "the connection's password sets it",
    "webhook-id": "the Standard Webhooks headers are the delivery's own",
    "webhook-timestamp": "the Standard Webhooks headers are the delivery's own",
    "webhook-signature": "the Standard Webhooks headers are the delivery's own",
    "content-type": "the body is always JSON",
    "content-length": "it is the body's length",
    "transfer-encoding": "it is the body's framing",
    "host": "it is the URL's host",
    "user-agent": "the delivery names itself",
    "accept-encoding": "replies are never compressed (no decompression bombs)",
    "connection": "it is the connection's own",
    "keep-alive": "it is the connection's own",
    "te": "it is the connection's own",
    "trailer": "it is the connection's own",
    "upgrade": "it is the connection's own",
    "expect": "it is the connection's own",
    "proxy-authorization": "no proxy is ever used",
    "cdr-webhook-test": "it marks the test CDRs",
}
#: The most extra headers an endpoint may set, and the longest value.
MAX_HEADERS = 32
MAX_HEADER_VALUE = 4096

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 field-name
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 3.3 scope-token


class AuthConfigError(ValueError):
    """An authentication extra that cannot be used: the field and the problem, never a secret's value."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


@dataclasses.dataclass(frozen=True)
class OAuth2ClientCredentials:
    """Where and how to get a bearer token for the receiver (the client-credentials grant)."""

    token_url: str
    client_id: str
    client_secret: str = dataclasses.field(repr=False)
    scope: str | None = None
    audience: str | None = None
    client_auth: str = CLIENT_AUTH_METHODS[0]

    @property
    def token_origin(self) -> str:
        """``scheme://host[:port]`` of the token endpoint: how messages name it."""
        parts = urllib.parse.urlsplit(self.token_url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"

    def secrets(self) -> tuple[str, ...]:
        """The client secret, and credentials or a query in the token URL."""
        parts = urllib.parse.urlsplit(self.token_url)
        return tuple(s for s in (self.client_secret, parts.username, parts.password, parts.query) if s)


@dataclasses.dataclass(frozen=True)
class ReceiverAuth:
    """An endpoint's own authentication besides ``x-api-key``: its headers and its OAuth2 client."""

    headers: tuple[tuple[str, str], ...] = ()
    secret_headers: tuple[tuple[str, str], ...] = dataclasses.field(default=(), repr=False)
    oauth2: OAuth2ClientCredentials | None = None

    def fixed_headers(self) -> dict[str, str]:
        """Every header of the endpoint's own, as sent (the secret ones too)."""
        return dict(self.headers + self.secret_headers)

    def secret_names(self) -> frozenset[str]:
        """The names (lower case) of the headers whose values are never shown."""
        return frozenset(name.lower() for name, _ in self.secret_headers)

    def secrets(self) -> tuple[str, ...]:
        """Every value never to be stored, logged or shown."""
        found = [value for _, value in self.secret_headers]
        if self.oauth2 is not None:
            found.extend(self.oauth2.secrets())
        return tuple(found)

    def describe(self) -> str | None:
        """A line for the Endpoints page and ``endpoints check``: names and origins, never a value."""
        parts = []
        if self.oauth2 is not None:
            parts.append(f"OAuth2 bearer token from {self.oauth2.token_origin}")
        names = [name for name, _ in self.headers] + [f"{name} (secret)" for name, _ in self.secret_headers]
        if names:
            parts.append("headers " + ", ".join(names))
        return "; ".join(parts) or None


def parse_receiver_auth(extra: Mapping[str, Any]) -> ReceiverAuth:
    """Parse the authentication extras of a connection's extra; raise :class:`AuthConfigError`."""
    oauth2 = _oauth2(extra)
    headers = _headers(extra, HEADERS_EXTRA, secret=False)
    secret_headers = _headers(extra, SECRET_HEADERS_EXTRA, secret=True)
    seen: dict[str, str] = {}
    for field, pairs in ((HEADERS_EXTRA, headers), (SECRET_HEADERS_EXTRA, secret_headers)):
        for name, _ in pairs:
            where = f"extra {field!r} header {name!r}"
            if name.lower() in seen:
                raise AuthConfigError(where, f"is set twice (also in extra {seen[name.lower()]!r})")
            seen[name.lower()] = field
            if oauth2 is not None and name.lower() == "authorization":
                raise AuthConfigError(
                    where, "clashes with OAuth2: the bearer token goes in authorization (remove one of them)"
                )
    if len(seen) > MAX_HEADERS:
        raise AuthConfigError(
            f"extra {HEADERS_EXTRA!r}", f"{len(seen)} headers in all, at most {MAX_HEADERS}"
        )
    return ReceiverAuth(headers=headers, secret_headers=secret_headers, oauth2=oauth2)


def _headers(extra: Mapping[str, Any], field: str, *, secret: bool) -> tuple[tuple[str, str], ...]:
    raw = extra.get(field)
    if raw is None or raw == {}:
        return ()
    if not isinstance(raw, dict):
        raise AuthConfigError(
            f"extra {field!r}",
            f"must be a JSON object of header names to text values, not {type(raw).__name__}",
        )
    pairs = []
    for name, value in raw.items():
        where = f"extra {field!r} header {name!r}"
        if not _TOKEN.fullmatch(name):
            raise AuthConfigError(
                f"extra {field!r}",
                f"{name!r} is not a header name (letters, digits and !#$%&'*+-.^_`|~ only)",
            )
        reason = RESERVED_HEADERS.get(name.lower())
        if reason is not None:
            raise AuthConfigError(where, f"clashes with a header the delivery sets itself ({reason})")
        pairs.append((name, _header_value(where, value, secret=secret)))
    return tuple(pairs)


def _header_value(where: str, value: Any, *, secret: bool) -> str:
    """A header value as sent; the problem is named, the value never quoted (it may be a secret)."""
    if not isinstance(value, str):
        raise AuthConfigError(where, f"its value must be text, not {type(value).__name__}")
    if secret and not value:
        raise AuthConfigError(where, "its value is empty: a secret header needs one")
    if any((ord(ch) < 32 and ch != "\t") or ord(ch) == 127 for ch in value):
        raise AuthConfigError(where, "its value holds a line break or a control character")
    if value != value.strip(" \t"):
        raise AuthConfigError(where, "its value begins or ends with white space")
    if len(value) > MAX_HEADER_VALUE:
        raise AuthConfigError(where, f"its value is {len(value)} characters long, at most {MAX_HEADER_VALUE}")
    try:
        value.encode("latin-1")  # what HTTP/1.1 header values are sent as
    except UnicodeEncodeError:
        raise AuthConfigError(
            where, "its value holds characters a header cannot carry (non-Latin-1)"
        ) from None
    return value


def _oauth2(extra: Mapping[str, Any]) -> OAuth2ClientCredentials | None:
    given = sorted(name for name in extra if name.startswith(OAUTH2_PREFIX) and extra[name] not in (None, ""))
    for name in given:
        if name not in OAUTH2_EXTRAS:
            raise AuthConfigError(
                f"extra {name!r}", f"is not an OAuth2 extra (known: {', '.join(OAUTH2_EXTRAS)})"
            )
    if not given:
        return None
    for name in OAUTH2_EXTRAS[:3]:
        if name not in given:
            raise AuthConfigError(
                f"extra {name!r}",
                f"is missing: OAuth2 client credentials need oauth2_token_url, oauth2_client_id and "
                f"oauth2_client_secret (set: {', '.join(given)})",
            )
    client_auth = extra.get("oauth2_client_auth") or CLIENT_AUTH_METHODS[0]
    if client_auth not in CLIENT_AUTH_METHODS:
        raise AuthConfigError(
            "extra 'oauth2_client_auth'",
            f"must be one of {', '.join(CLIENT_AUTH_METHODS)}, not {client_auth!r}",
        )
    return OAuth2ClientCredentials(
        token_url=_token_url(extra["oauth2_token_url"]),
        client_id=_text("oauth2_client_id", extra["oauth2_client_id"]),
        client_secret=_text("oauth2_client_secret", extra["oauth2_client_secret"], secret=True),
        scope=_scope(extra.get("oauth2_scope")),
        audience=_text("oauth2_audience", extra["oauth2_audience"]) if extra.get("oauth2_audience") else None,
        client_auth=client_auth,
    )


def _token_url(raw: Any) -> str:
    field = "extra 'oauth2_token_url'"
    if not isinstance(raw, str):
        raise AuthConfigError(field, f"must be the token endpoint's https:// URL, not {type(raw).__name__}")
    url = raw.strip()
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError:
        raise AuthConfigError(field, "is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AuthConfigError(
            field, f"must be an http(s) URL with a host, not {parts.scheme}://{parts.hostname or ''}"
        )
    if any(ch.isspace() or ord(ch) < 32 for ch in url) or parts.fragment:
        raise AuthConfigError(
            field, f"the URL of {parts.scheme}://{parts.hostname} has white space or a #fragment"
        )
    return url


def _text(name: str, raw: Any, *, secret: bool = False) -> str:
    field = f"extra {name!r}"
    if not isinstance(raw, str):
        raise AuthConfigError(field, f"must be non-empty text, not {type(raw).__name__}")
    if not raw.strip():
        raise AuthConfigError(field, "is empty")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in raw):
        raise AuthConfigError(field, "holds a line break or a control character")
    if raw != raw.strip() and not secret:
        raise AuthConfigError(field, "begins or ends with white space")
    return raw


def _scope(raw: Any) -> str | None:
    """``oauth2_scope``: a space-separated text or a list of scopes; each an RFC 6749 scope-token."""
    if raw is None or raw == "" or raw == []:
        return None
    scopes = raw.split() if isinstance(raw, str) else raw
    if not isinstance(scopes, list) or not all(
        isinstance(s, str) and _SCOPE_TOKEN.fullmatch(s) for s in scopes
    ):
        raise AuthConfigError(
            "extra 'oauth2_scope'",
            "must be space-separated scopes or a list of them (printable ASCII, no quotes or backslashes)",
        )
    return " ".join(scopes)
