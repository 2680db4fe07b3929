"""Egress guard for webhook POSTs: no internal addresses (SSRF), no DNS rebinding, TLS always verified.

:func:`check_url` resolves an endpoint's host once and refuses it when any address is internal;
:class:`GuardedAdapter` does that for every request and then connects only to the checked addresses,
while Host, TLS SNI and certificate verification still use the URL's hostname.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import logging
import os
import socket
import tempfile
import threading
from typing import TYPE_CHECKING, Any

import requests
from requests.adapters import HTTPAdapter
from requests.utils import DEFAULT_CA_BUNDLE_PATH, select_proxy
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError
from urllib3.util import parse_url as _parse_url

from cdr_webhook.deliver.deadline import WATCHED_POOLS, current_deadline
from cdr_webhook.endpoint_config import tls_texts
from cdr_webhook.networks import ALLOWED_NETWORKS_ENV

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

    from requests import PreparedRequest, Response
    from urllib3 import HTTPConnectionPool

    from cdr_webhook.networks import Network

    Address = ipaddress.IPv4Address | ipaddress.IPv6Address
    #: ``(host, port) -> addresses``; the default is :func:`socket.getaddrinfo` over TCP.
    Resolver = Callable[[str, int], Iterable[str]]

log = logging.getLogger(__name__)

#: urllib3's URL parser, once per URL text: a chunk POSTs to one URL thousands of times, and each
#: request parsed it three times (its ``Url`` is an immutable tuple, safe to share).
parse_url = functools.lru_cache(maxsize=256)(_parse_url)

ALLOW_HINT = (
    f"refused; to allow it, add its network to {ALLOWED_NETWORKS_ENV} "
    "(a comma-separated CIDR list, empty by default)"
)

_N = ipaddress.ip_network
# Checked in this order; the first match names the rule. 0.0.0.0 must precede 0.0.0.0/8, and the
# broadcast address the reserved 240.0.0.0/4 that contains it.
_RULES: tuple[tuple[str, tuple[Network, ...]], ...] = (
    ("an unspecified address", (_N("0.0.0.0/32"), _N("::/128"))),
    ("a 'this network' address (0.0.0.0/8)", (_N("0.0.0.0/8"),)),
    ("a loopback address", (_N("127.0.0.0/8"), _N("::1/128"))),
    ("a private address (RFC 1918)", (_N("10.0.0.0/8"), _N("172.16.0.0/12"), _N("192.168.0.0/16"))),
    ("a private address (IPv6 unique local, fc00::/7)", (_N("fc00::/7"),)),
    ("a link-local address (cloud metadata lives at 169.254.169.254)", (_N("169.254.0.0/16"),)),
    ("a link-local address", (_N("fe80::/10"),)),
    ("an IPv6 site-local address", (_N("fec0::/10"),)),
    ("a shared CGNAT address (100.64.0.0/10)", (_N("100.64.0.0/10"),)),
    ("a multicast address", (_N("224.0.0.0/4"), _N("ff00::/8"))),
    ("the broadcast address", (_N("255.255.255.255/32"),)),
    ("a reserved address", (_N("240.0.0.0/4"),)),
)
# IPv6 forms that carry an IPv4 address the packets end up at: (rule, network, shift of the IPv4 bits).
_EMBEDDING: tuple[tuple[str, Network, int], ...] = (
    ("an IPv4-mapped address", _N("::ffff:0:0/96"), 0),
    ("an IPv4-compatible address", _N("::/96"), 0),
    ("a NAT64 address", _N("64:ff9b::/96"), 0),
    ("a 6to4 address", _N("2002::/16"), 80),
)


class EndpointRefused(Exception):
    """An endpoint the egress guard will not connect to; the message names the rule and the setting."""

    def __init__(self, reason: str, rule: str, *, hint: str = ALLOW_HINT) -> None:
        super().__init__(f"{reason}: {hint}")
        self.reason = reason
        self.rule = rule


def _refused_rule(ip: Address, allowed_networks: Sequence[Network]) -> str | None:
    """Return the rule that refuses ``ip``, or None. An allowed network overrides every rule."""
    if any(ip in network for network in allowed_networks):
        return None
    for rule, networks in _RULES:
        if any(ip in network for network in networks):
            return rule
    if isinstance(ip, ipaddress.IPv6Address):
        for rule, network, shift in _EMBEDDING:
            if ip in network:
                embedded = ipaddress.IPv4Address((int(ip) >> shift) & 0xFFFFFFFF)
                inner = _refused_rule(embedded, allowed_networks)
                # A public IPv4 behind these prefixes is reachable on purpose (IPv6-only networks).
                return None if inner is None else f"{rule} of {embedded}, {inner}"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "a special-purpose (not globally reachable) address"
    return None


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


def resolve(
    host: str, port: int, allowed_networks: Sequence[Network], resolver: Resolver | None = None
) -> list[str]:
    """
    Resolve ``host`` once and check every address; return them, in the resolver's order.

    One refused address refuses the host: a name answering both a public and an internal address
    would otherwise reach the internal one whenever a client picks it. A literal IP skips DNS.
    Resolution failures raise :class:`OSError` (as :func:`socket.getaddrinfo` does).
    """
    literal = _literal_address(host)
    answers = [literal] if literal else (resolver or _system_resolver)(host, port)
    addresses = list(dict.fromkeys(_normalised(answer) for answer in answers))
    if not addresses:
        raise OSError(f"{host!r} resolved to no address")
    networks = tuple(allowed_networks)
    for address in addresses:
        rule = _address_rule(address, networks)
        if rule is not None:
            subject = address if literal else f"{host!r} resolves to {address}, which"
            raise EndpointRefused(f"{subject} is {rule}", rule)
    return addresses


@functools.lru_cache(maxsize=1024)
def _literal_address(host: str) -> str | None:
    """The address a host names literally (``[::1]`` too), normalised; None for a name to resolve."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


@functools.lru_cache(maxsize=1024)
def _normalised(answer: str) -> str:
    """A resolver's answer as one text per address (raises ValueError for what is no address)."""
    return str(ipaddress.ip_address(answer))


@functools.lru_cache(maxsize=1024)
def _address_rule(address: str, allowed_networks: tuple[Network, ...]) -> str | None:
    """
    :func:`_refused_rule` of a normalised address: a pure function of its arguments, so it is judged
    once per process. What is cached is the verdict on an address, never a DNS answer: every
    request still resolves its host and checks each address it got.
    """
    return _refused_rule(ipaddress.ip_address(address), allowed_networks)


@functools.lru_cache(maxsize=1024)
def _inside(address: str, allowed_networks: tuple[Network, ...]) -> bool:
    """Whether a normalised address is inside one of ``allowed_networks``."""
    return any(ipaddress.ip_address(address) in network for network in allowed_networks)


def check_url(url: str, allowed_networks: Sequence[Network], resolver: Resolver | None = None) -> list[str]:
    """
    Check an endpoint URL: http or https, a host whose every address passes :func:`resolve`.

    Plain http is allowed only when every address is inside ``allowed_networks``: the API key and
    the CDR would otherwise cross the internet in clear text. Messages never quote the URL's path or
    query, which may carry a token. Return the checked addresses.
    """
    parsed = parse_url(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"endpoint must be an http(s) URL with a host, not {parsed.scheme}://{parsed.host}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = resolve(parsed.host, port, allowed_networks, resolver)
    if parsed.scheme == "http":
        outside = [a for a in addresses if not _inside(a, tuple(allowed_networks))]
        if outside:
            raise EndpointRefused(
                f"plain http is refused for http://{parsed.host}:{port}, which reaches {', '.join(outside)}",
                "plain http is refused",
                hint=f"use https, or add its network to {ALLOWED_NETWORKS_ENV} (comma-separated CIDRs)",
            )
    return addresses


class GuardedAdapter(HTTPAdapter):
    """
    A requests adapter that checks each request's host and connects to exactly the checked address.

    Per request the host is resolved and checked once (:func:`check_url`); the connection pool is then
    keyed by that IP address, so no later DNS answer (rebinding) is ever used. The Host header is the
    URL's, and for https the TLS SNI and certificate hostname check use the URL's hostname (urllib3's
    ``server_hostname``). The checked addresses are tried in the resolver's order, moving on only when
    a connection could not be made (refused, unreachable, connect timeout), so nothing was sent; once
    connected, an error is the request's. Certificates are always verified:
    against ``ca_bundle`` when given (it replaces the default store), else requests' CA bundle.
    ``client_cert`` is ``(cert_path, key_path)`` for mutual TLS. Proxies are refused.

    Inside a :class:`~cdr_webhook.deliver.deadline.Deadline` block, resolving, connecting and every socket
    the adapter opens are bound by that one deadline, and no further address is tried once it passed.
    """

    def __init__(
        self,
        allowed_networks: Sequence[Network],
        *,
        ca_bundle: str | None = None,
        client_cert: tuple[str, str] | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        for path in (ca_bundle, *(client_cert or ())):
            if path is not None and not os.path.isfile(path):
                raise FileNotFoundError(f"TLS file not found: {path}")
        self.allowed_networks = tuple(allowed_networks)
        self.ca_bundle = ca_bundle
        self.client_cert = client_cert
        self.resolver = resolver
        self._pinned = threading.local()  # the address this thread's request is sent to
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        """Make the pools' connections register their sockets with the current deadline."""
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = WATCHED_POOLS

    def send(
        self,
        request: PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Mapping[str, str] | None = None,
    ) -> Response:
        """Send with the URL's Host header (the pool's host is an IP address); refuse ``verify=False``.

        The host is resolved and checked once; then each checked address is tried in turn until a
        connection is made.
        """
        if verify is False:
            raise ValueError("GuardedAdapter always verifies TLS certificates; verify=False is refused")
        url = str(request.url)
        if proxies and select_proxy(url, dict(proxies)):
            raise ValueError("GuardedAdapter connects only to the checked address; proxies are refused")
        parsed = parse_url(url)
        deadline = current_deadline()
        resolver = self.resolver
        if deadline is not None:  # getaddrinfo cannot be interrupted: stop waiting for it instead
            within = resolver or _system_resolver
            resolver = lambda host, port: deadline.call(within, host, port)  # noqa: E731
        try:
            addresses = check_url(url, self.allowed_networks, resolver)
        except OSError as err:
            raise requests.ConnectionError(f"cannot resolve {parsed.host}: {err}", request=request) from err
        request = request.copy()
        default_port = 443 if parsed.scheme == "https" else 80
        port = f":{parsed.port}" if parsed.port and parsed.port != default_port else ""
        request.headers["Host"] = f"{parsed.host}{port}"
        for address, following in zip(addresses, addresses[1:], strict=False):
            try:
                return self._send_to(address, request, stream, timeout, verify, cert, proxies)
            except requests.ConnectionError as err:
                if not _not_connected(err) or (deadline is not None and deadline.passed):
                    raise
                log.warning(
                    "Could not connect to %s at %s (%s); trying its next address, %s",
                    parsed.host,
                    address,
                    _reason(err),
                    following,
                )
        return self._send_to(addresses[-1], request, stream, timeout, verify, cert, proxies)

    def _send_to(
        self,
        address: str,
        request: PreparedRequest,
        stream: bool,
        timeout: Any,
        verify: Any,
        cert: Any,
        proxies: Mapping[str, str] | None,
    ) -> Response:
        """Send through the pool of ``address`` (read by :meth:`get_connection_with_tls_context`)."""
        self._pinned.address = address
        try:
            return super().send(
                request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies
            )
        finally:
            self._pinned.address = None

    def get_connection_with_tls_context(
        self,
        request: PreparedRequest,
        verify: Any,
        proxies: Mapping[str, str] | None = None,
        cert: Any = None,
    ) -> HTTPConnectionPool:
        """Return the pool of the address :meth:`send` checked and is trying now."""
        address = getattr(self._pinned, "address", None)
        if address is None:
            raise RuntimeError("GuardedAdapter opens connections only from send(), to a checked address")
        parsed = parse_url(str(request.url))
        pool_kwargs: dict[str, Any] = {}
        if parsed.scheme == "https":
            pool_kwargs = {
                "cert_reqs": "CERT_REQUIRED",
                "ca_certs": self.ca_bundle or DEFAULT_CA_BUNDLE_PATH,
                "server_hostname": parsed.host.strip("[]"),  # SNI and the certificate hostname check
                "cert_file": self.client_cert[0] if self.client_cert else None,
                "key_file": self.client_cert[1] if self.client_cert else None,
            }
        return self.poolmanager.connection_from_host(
            address, parsed.port or (443 if parsed.scheme == "https" else 80), parsed.scheme, pool_kwargs
        )

    def get_connection(self, url: str, proxies: Mapping[str, str] | None = None) -> HTTPConnectionPool:
        """Refused: this deprecated entry point would connect to the URL's host unchecked."""
        raise NotImplementedError(
            "GuardedAdapter.get_connection is unchecked; use get_connection_with_tls_context"
        )

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        """Do nothing: the TLS settings are in the pool's key (requests would overwrite them per request)."""


def _not_connected(err: requests.ConnectionError) -> bool:
    """Whether the request failed before a connection was made (refused, unreachable, connect timeout)."""
    cause = err.args[0] if err.args else None
    return isinstance(cause, MaxRetryError) and isinstance(cause.reason, ConnectTimeoutError)


def _reason(err: requests.ConnectionError) -> str:
    cause = err.args[0] if err.args else err
    return str(getattr(cause, "reason", cause))


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """Paths for :class:`GuardedAdapter`: a CA bundle and a ``(cert, key)`` pair, each optional."""

    ca_bundle: str | None = None
    client_cert: tuple[str, str] | None = None


@contextlib.contextmanager
def pem_files(conn_id: str, extra: Mapping[str, Any]) -> Iterator[TlsFiles]:
    """
    Write the PEM text of connection extras ``ca_bundle``, ``client_cert``, ``client_key`` to files.

    requests and ssl want paths; the files live in a private directory, each 0600, and are removed
    when the block ends, so use the adapter only inside it (new connections reload them). The key may
    also sit in ``client_cert`` itself. The texts pass :func:`cdr_webhook.endpoint_config.tls_texts` (an
    :class:`~cdr_webhook.endpoint_config.EndpointConfigError` naming ``conn_id`` otherwise).
    """
    texts = tls_texts(conn_id, extra)
    if not texts:  # no PEM extras: nothing to write (a task of many endpoints has one block each)
        yield TlsFiles()
        return
    with tempfile.TemporaryDirectory(prefix="cdr-webhook-tls-") as directory:
        paths: dict[str, str] = {}
        for name, text in texts.items():
            paths[name] = os.path.join(directory, f"{name}.pem")
            fd = os.open(paths[name], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)
        cert = paths.get("client_cert")
        yield TlsFiles(
            ca_bundle=paths.get("ca_bundle"),
            client_cert=(cert, paths.get("client_key", cert)) if cert else None,
        )
