"""An endpoint's configuration, parsed once from its Airflow HTTP connection. Pure: no Airflow import.

Every consumer (the select step's routing and filters, the hook, the operator, the CLI) reads an
endpoint through :func:`parse_endpoint`, so a malformed connection fails in one way everywhere: an
:class:`EndpointConfigError` that names the connection and the field, and never quotes a secret.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from cdr_webhook.pacing import MAX_RATE
from cdr_webhook.receiver_auth import AuthConfigError, ReceiverAuth, parse_receiver_auth
from cdr_webhook.signing import InvalidSigningSecret, secret_key

if TYPE_CHECKING:
    from collections.abc import Mapping

#: Connection extras an endpoint understands; any other extra is ignored (and never sent).
SIGNING_SECRET_EXTRA = "signing_secret"
TLS_EXTRAS = ("ca_bundle", "client_cert", "client_key")


class EndpointConfigError(ValueError):
    """A connection that cannot be used as an endpoint; the message names it and the field, never a secret."""

    def __init__(self, conn_id: str, field: str | None, problem: str) -> None:
        self.conn_id = conn_id
        self.field = field
        self.problem = problem
        where = f"connection {conn_id!r}" + (f" {field}" if field else "")
        super().__init__(f"{where}: {problem}")

    @classmethod
    def missing(cls, conn_id: str) -> EndpointConfigError:
        """The connection is not there: routed CDRs name it, but nobody made it (or it was deleted)."""
        return cls(conn_id, None, "does not exist (was it deleted or renamed?)")


@dataclasses.dataclass(frozen=True)
class EndpointFilters:
    """The CDRs an endpoint wants, from its connection extra; None means no restriction."""

    endpoint: str
    leg_types: frozenset[int] | None = None
    min_billed_duration: Decimal | None = None
    campaign_ids: frozenset[int] | None = None

    def exclusion(self, payload: Mapping[str, Any]) -> str | None:
        """Return why the endpoint does not want this CDR (naming the filter), or None to send it."""
        if self.leg_types is not None and payload.get("leg_type") not in self.leg_types:
            return self._reason("leg_types", sorted(self.leg_types), f"leg_type is {payload.get('leg_type')}")
        billed = payload.get("billed_duration")
        if self.min_billed_duration is not None and (billed is None or billed < self.min_billed_duration):
            return self._reason(
                "min_billed_duration", self.min_billed_duration, f"billed_duration is {billed}"
            )
        if self.campaign_ids is not None and payload.get("campaign_id") not in self.campaign_ids:
            return self._reason(
                "campaign_ids", sorted(self.campaign_ids), f"campaign_id is {payload.get('campaign_id')}"
            )
        return None

    def _reason(self, name: str, wanted: object, actual: str) -> str:
        return f"filtered out by {self.endpoint} extra {name}={wanted}: {actual}"


@dataclasses.dataclass(frozen=True)
class EndpointConfig:
    """Everything one endpoint connection says: where to POST, with which secrets, filters and limits."""

    conn_id: str
    url: str
    api_key: str | None = None
    signing_secrets: tuple[str, ...] = ()
    ca_bundle: str | None = None  # PEM text
    client_cert: str | None = None  # PEM text (may hold the key too)
    client_key: str | None = None  # PEM text
    filters: EndpointFilters | None = None
    max_in_flight: int | None = None  # None: the max_in_flight_per_endpoint setting
    auth: ReceiverAuth = ReceiverAuth()  # the receiver's own headers and OAuth2 client
    rate_limit_per_second: float | None = None  # None: the rate_limit_per_second setting (unset: none)

    def in_flight_limit(self, default: int) -> int:
        """The POSTs this endpoint may have in flight at once: its ``max_in_flight``, else ``default``."""
        return self.max_in_flight or default

    def rate_limit(self, default: float | None) -> float | None:
        """POSTs a second to this endpoint across every task: its extra, else ``default`` (None: any)."""
        return self.rate_limit_per_second or default

    @property
    def origin(self) -> str:
        """``scheme://host[:port]``: how messages name the endpoint (its path may carry a token)."""
        return _origin(self.url)

    def tls_extra(self) -> dict[str, str]:
        """The TLS material as connection extras (for :func:`cdr_webhook.deliver.egress.pem_files`)."""
        values = {name: getattr(self, name) for name in TLS_EXTRAS}
        return {name: value for name, value in values.items() if value}

    def secrets(self) -> tuple[str, ...]:
        """Every value never to be stored, logged or raised: keys, secrets, URL credentials and path."""
        parts = urllib.parse.urlsplit(self.url)
        found = [self.api_key, *self.signing_secrets, self.client_key, parts.username, parts.password]
        found.extend(self.auth.secrets())
        if self.client_cert and holds_private_key(self.client_cert):
            found.append(self.client_cert)
        if parts.path not in ("", "/"):
            found.append(parts.path)
        if parts.query:
            found.append(parts.query)
        return tuple(dict.fromkeys(secret for secret in found if secret))


def parse_endpoint(
    conn_id: str,
    *,
    host: str | None,
    schema: str | None = None,
    port: int | None = None,
    password: str | None = None,
    extra: Any = None,
) -> EndpointConfig:
    """
    Parse an HTTP connection's fields into an :class:`EndpointConfig`.

    ``host`` holds the full URL (``https://hooks.example.com/cdr``); as in the HTTP provider, a bare
    host gets ``schema`` (default http) and ``port``. ``extra`` is the parsed extra (a dict).
    """
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise EndpointConfigError(conn_id, "extra", f"must be a JSON object, not {type(extra).__name__}")
    tls = tls_texts(conn_id, extra)
    try:
        auth = parse_receiver_auth(extra)
    except AuthConfigError as err:  # its message never quotes a secret
        raise EndpointConfigError(conn_id, err.field, err.problem) from None
    return EndpointConfig(
        conn_id=conn_id,
        url=_url(conn_id, host, schema, port),
        api_key=password or None,
        signing_secrets=_signing_secrets(conn_id, extra.get(SIGNING_SECRET_EXTRA)),
        ca_bundle=tls.get("ca_bundle"),
        client_cert=tls.get("client_cert"),
        client_key=tls.get("client_key"),
        filters=EndpointFilters(
            endpoint=conn_id,
            leg_types=_int_set(conn_id, "leg_types", extra.get("leg_types")),
            min_billed_duration=_number(conn_id, "min_billed_duration", extra.get("min_billed_duration")),
            campaign_ids=_int_set(conn_id, "campaign_ids", extra.get("campaign_ids")),
        ),
        max_in_flight=_positive_int(conn_id, "max_in_flight", extra.get("max_in_flight")),
        auth=auth,
        rate_limit_per_second=_rate(conn_id, extra.get("rate_limit_per_second")),
    )


def from_connection(connection: Any) -> EndpointConfig:
    """Parse an Airflow ``Connection`` object."""
    raw = connection.extra
    try:
        extra = json.loads(raw) if raw else {}
    except ValueError:
        raise EndpointConfigError(connection.conn_id, "extra", "is not valid JSON") from None
    return parse_endpoint(
        connection.conn_id,
        host=connection.host,
        schema=connection.schema,
        port=connection.port,
        password=connection.password,
        extra=extra,
    )


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}"


def _url(conn_id: str, host: str | None, schema: str | None, port: int | None) -> str:
    if not host or not host.strip():
        raise EndpointConfigError(conn_id, "host", "is empty: it must hold the endpoint's https:// URL")
    host = host.strip()
    url = host if "://" in host else f"{schema or 'http'}://{host}" + (f":{port}" if port else "")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError:
        raise EndpointConfigError(
            conn_id, "host", f"is not a valid URL (scheme {url.split('://')[0]!r}; the rest is not shown)"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EndpointConfigError(
            conn_id,
            "host",
            f"must be an http(s) URL with a host, not {parts.scheme}://{parts.hostname or ''}",
        )
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise EndpointConfigError(conn_id, "host", f"the URL of {_origin(url)} contains white space")
    return url


def _signing_secrets(conn_id: str, raw: Any) -> tuple[str, ...]:
    field = f"extra {SIGNING_SECRET_EXTRA!r}"
    if raw is None or raw == "":
        return ()
    secrets = [raw] if isinstance(raw, str) else raw
    if not isinstance(secrets, list) or not all(isinstance(item, str) for item in secrets):
        raise EndpointConfigError(conn_id, field, "must be a whsec_ string or a list of them")
    for position, secret in enumerate(secrets, 1):
        try:
            secret_key(secret)
        except InvalidSigningSecret as err:  # its message never quotes the secret
            which = f"secret {position} of {len(secrets)}" if len(secrets) > 1 else "the secret"
            raise EndpointConfigError(conn_id, field, f"{which} is invalid: {err}") from None
    return tuple(secrets)


def tls_texts(conn_id: str, extra: Mapping[str, Any]) -> dict[str, str]:
    """
    The PEM texts of the :data:`TLS_EXTRAS` that ``extra`` sets, checked as one rule for all readers.

    Each must be PEM text (never a path on the worker); a key needs its certificate, and a certificate
    without ``client_key`` must hold the key itself. Raises :class:`EndpointConfigError`.
    """
    texts: dict[str, str] = {}
    for name in TLS_EXTRAS:
        value = extra.get(name)
        if value in (None, ""):
            continue
        if not isinstance(value, str) or "-----BEGIN " not in value:
            raise EndpointConfigError(conn_id, f"extra {name!r}", "must be PEM text (-----BEGIN …)")
        texts[name] = value
    if "client_key" in texts and "client_cert" not in texts:
        raise EndpointConfigError(conn_id, "extra 'client_key'", "needs extra 'client_cert'")
    if "client_cert" in texts and "client_key" not in texts and not holds_private_key(texts["client_cert"]):
        raise EndpointConfigError(
            conn_id, "extra 'client_cert'", "holds no private key and extra 'client_key' is not set"
        )
    return texts


def holds_private_key(pem: str) -> bool:
    """Whether PEM text holds a private key (a client certificate may carry its key along)."""
    return "PRIVATE KEY-----" in pem


def _int_set(conn_id: str, name: str, value: Any) -> frozenset[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise EndpointConfigError(conn_id, f"extra {name!r}", f"must be a list of integers, not {value!r}")
    return frozenset(value)


def _number(conn_id: str, name: str, value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise InvalidOperation
        number = Decimal(str(value))
        if not number.is_finite():
            raise InvalidOperation
    except InvalidOperation:
        raise EndpointConfigError(conn_id, f"extra {name!r}", f"must be a number, not {value!r}") from None
    return number


def _positive_int(conn_id: str, name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EndpointConfigError(conn_id, f"extra {name!r}", f"must be a positive integer, not {value!r}")
    return value


def _rate(conn_id: str, value: Any) -> float | None:
    """A rate limit: a positive, finite number of POSTs a second (``0.5`` is one every two seconds)."""
    if value is None:
        return None
    number = _number(conn_id, "rate_limit_per_second", value)
    if number is None or number <= 0 or number > MAX_RATE:
        raise EndpointConfigError(
            conn_id,
            "extra 'rate_limit_per_second'",
            f"must be a number of POSTs a second above 0 and at most {MAX_RATE}, not {value!r}",
        )
    return float(number)
