"""The egress guard: internal addresses refused, DNS rebinding defeated, TLS and mutual TLS verified.

Every server runs on 127.0.0.1 (one decoy on 127.0.0.2); public addresses are only checked, never
contacted. The TLS test PKI (a CA, server certificates, a client certificate) is made here, by
:mod:`tests.support.pki`.
"""

from __future__ import annotations

import dataclasses
import http.server
import ipaddress
import json
import os
import socket
import ssl
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.x509.oid import ExtendedKeyUsageOID

from cdr_webhook.deliver.egress import (
    EndpointRefused,
    GuardedAdapter,
    TlsFiles,
    check_url,
    pem_files,
    resolve,
)
from cdr_webhook.endpoint_config import EndpointConfigError
from cdr_webhook.networks import ALLOWED_NETWORKS_ENV, parse_networks
from tests.support.pki import Issued, issue, pem, tls_context

PUBLIC = "93.184.215.14"
LOOPBACK_ONLY = parse_networks("127.0.0.1/32")


def hooks_resolver(host: str, port: int) -> list[str]:
    return {"hooks.test": ["127.0.0.1"], "wrong.test": ["127.0.0.1"]}[host]


def public_resolver(host: str, port: int) -> list[str]:
    return [PUBLIC]


def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"resolver called for {host!r}")


def guarded_session(adapter: GuardedAdapter) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@pytest.fixture
def no_sockets(monkeypatch):
    """Any attempt to open a socket fails the test: checks must not connect anywhere."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(socket, "socket", refuse)


# --- the SSRF rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "rule"),
    [
        ("127.0.0.1", "is a loopback address"),
        ("10.1.2.3", "is a private address (RFC 1918)"),
        ("172.16.0.1", "is a private address (RFC 1918)"),
        ("172.31.255.255", "is a private address (RFC 1918)"),
        ("192.168.1.1", "is a private address (RFC 1918)"),
        ("169.254.169.254", "is a link-local address (cloud metadata"),
        ("100.64.0.1", "is a shared CGNAT address"),
        ("100.127.255.255", "is a shared CGNAT address"),
        ("224.0.0.1", "is a multicast address"),
        ("0.0.0.0", "is an unspecified address"),
        ("0.1.2.3", "is a 'this network' address (0.0.0.0/8)"),
        ("255.255.255.255", "is the broadcast address"),
        ("240.0.0.1", "is a reserved address"),
        ("192.0.2.7", "is a special-purpose (not globally reachable) address"),
        ("::1", "is a loopback address"),
        ("fe80::1", "is a link-local address"),
        ("fc00::1", "is a private address (IPv6 unique local"),
        ("fd12:3456::1", "is a private address (IPv6 unique local"),
        ("fec0::1", "is an IPv6 site-local address"),
        ("ff02::1", "is a multicast address"),
        ("::ffff:127.0.0.1", "is an IPv4-mapped address of 127.0.0.1, a loopback address"),
        ("::ffff:10.0.0.1", "is an IPv4-mapped address of 10.0.0.1, a private address"),
        ("::ffff:169.254.169.254", "is an IPv4-mapped address of 169.254.169.254, a link-local address"),
        ("::7f00:1", "is an IPv4-compatible address of 127.0.0.1, a loopback address"),
        ("64:ff9b::7f00:1", "is a NAT64 address of 127.0.0.1, a loopback address"),
        ("2002:7f00:1::", "is a 6to4 address of 127.0.0.1, a loopback address"),
        ("2002:a9fe:a9fe::1", "is a 6to4 address of 169.254.169.254, a link-local address"),
        ("::", "is an unspecified address"),
        ("2001:db8::1", "is a special-purpose (not globally reachable) address"),
    ],
)
def test_internal_address_is_refused_naming_its_rule_and_the_setting(address, rule, no_sockets):
    with pytest.raises(EndpointRefused) as refused:
        resolve(address, 443, ())
    assert rule in str(refused.value)
    assert rule.removeprefix("is ") in refused.value.rule
    assert ALLOWED_NETWORKS_ENV in str(refused.value)


@pytest.mark.parametrize(
    "address",
    [
        PUBLIC,
        "172.15.255.255",
        "172.32.0.1",
        "100.63.255.255",
        "100.128.0.1",
        "2606:4700::1111",
        "::ffff:93.184.215.14",
        "64:ff9b::5db8:d70e",  # NAT64 of a public IPv4 address: how IPv6-only networks reach it
    ],
)
def test_public_address_is_allowed_without_connecting(address, no_sockets):
    resolve(address, 443, ())
    host = f"[{address}]" if ":" in address else address
    assert check_url(f"https://{host}/x", ()) == [str(ipaddress.ip_address(address))]


def test_allowed_networks_win_over_every_rule():
    resolve("127.0.0.1", 443, LOOPBACK_ONLY)
    resolve("::ffff:10.9.8.7", 443, parse_networks("10.0.0.0/8"))  # the IPv4 it reaches is allowed
    resolve("fe80::1", 443, parse_networks("fe80::/64"))
    with pytest.raises(EndpointRefused, match="127.0.0.2 is a loopback address"):
        resolve("127.0.0.2", 443, LOOPBACK_ONLY)


def test_parse_networks():
    assert parse_networks("") == ()
    assert [str(n) for n in parse_networks(" 10.0.0.0/8, 127.0.0.1 ,fd00::/8,")] == [
        "10.0.0.0/8",
        "127.0.0.1/32",
        "fd00::/8",
    ]
    with pytest.raises(ValueError, match=rf"{ALLOWED_NETWORKS_ENV}: '10.0.0.1/8' is not a CIDR network"):
        parse_networks("127.0.0.1/32, 10.0.0.1/8")
    with pytest.raises(ValueError, match="'intranet' is not a CIDR network"):
        parse_networks("intranet")


# --- resolution -----------------------------------------------------------------------------------


def test_any_refused_answer_refuses_the_host():
    calls = []

    def mixed(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return [PUBLIC, "127.0.0.1"]

    with pytest.raises(EndpointRefused, match=r"'mixed\.test' resolves to 127\.0\.0\.1, which is a loopback"):
        resolve("mixed.test", 443, (), mixed)
    assert calls == [("mixed.test", 443)]
    assert resolve("mixed.test", 443, LOOPBACK_ONLY, mixed) == [PUBLIC, "127.0.0.1"]


def test_literal_ip_hosts_are_checked_without_dns():
    assert resolve(PUBLIC, 443, (), no_dns) == [PUBLIC]
    assert resolve("[2606:4700::1111]", 443, (), no_dns) == ["2606:4700::1111"]
    with pytest.raises(EndpointRefused, match=r"^::1 is a loopback address"):
        resolve("[::1]", 443, (), no_dns)


@pytest.mark.parametrize("host", ["2130706433", "127.1", "0x7f.0.0.1"])
def test_odd_spellings_of_loopback_are_resolved_then_refused(host):
    # socket.getaddrinfo (the default resolver) reads these inet_aton forms as 127.0.0.1, no DNS needed
    with pytest.raises(EndpointRefused, match=r"resolves to 127\.0\.0\.1, which is a loopback address"):
        resolve(host, 443, ())


def test_plain_http_is_refused_outside_allowed_networks(no_sockets):
    with pytest.raises(EndpointRefused) as refused:
        check_url("http://public.test/cdr?token=s3cret", (), public_resolver)
    message = str(refused.value)
    assert refused.value.rule == "plain http is refused"
    assert "plain http is refused for http://public.test:80, which reaches 93.184.215.14" in message
    assert ALLOWED_NETWORKS_ENV in message
    assert "s3cret" not in message  # a URL's query may hold a token: never quoted
    assert check_url("https://public.test/cdr", (), public_resolver) == [PUBLIC]
    assert check_url("http://local.test:8080/x", LOOPBACK_ONLY, lambda h, p: ["127.0.0.1"]) == ["127.0.0.1"]
    with pytest.raises(EndpointRefused, match="plain http is refused"):
        check_url("http://half.test/x", LOOPBACK_ONLY, lambda h, p: ["127.0.0.1", PUBLIC])
    with pytest.raises(ValueError, match="http"):
        check_url("ftp://public.test/x", (), public_resolver)


def test_adapter_refuses_before_connecting(no_sockets):
    session = guarded_session(GuardedAdapter((), resolver=public_resolver))
    with pytest.raises(EndpointRefused, match="plain http is refused"):
        session.post("http://public.test/x", data=b"{}", timeout=5)
    session = guarded_session(GuardedAdapter((), resolver=lambda h, p: [PUBLIC, "169.254.169.254"]))
    with pytest.raises(EndpointRefused, match="169.254.169.254, which is a link-local address"):
        session.post("https://metadata.test/x", data=b"{}", timeout=5)
    with pytest.raises(ValueError, match="proxies are refused"):
        session.post("https://public.test/x", proxies={"https": "http://127.0.0.1:9"}, timeout=5)


# --- real servers ---------------------------------------------------------------------------------


class Server:
    """A threaded HTTP server recording each POST; HTTPS (and SNI) when given an SSL context."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, context: ssl.SSLContext | None = None) -> None:
        self.seen: list[dict[str, Any]] = []
        self.snis: list[str | None] = []
        self.handshake_errors: list[Exception] = []
        outer = self
        if context is not None:
            context.sni_callback = lambda _sock, name, _ctx: self.snis.append(name)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                peer = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
                client = dict(item[0] for item in peer["subject"])["commonName"] if peer else None
                outer.seen.append(
                    {"path": self.path, "host": self.headers["host"], "body": body, "client": client}
                )
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class TlsServer(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def finish_request(self, request: Any, client_address: Any) -> None:
                if context is None:
                    return super().finish_request(request, client_address)
                request.settimeout(5)
                try:
                    tls = context.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError) as err:
                    outer.handshake_errors.append(err)
                    return None
                with tls:
                    return super().finish_request(tls, client_address)

        self._server = TlsServer((host, port), Handler)
        self.port = self._server.server_address[1]

    def __enter__(self) -> Server:
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_dns_rebinding_cannot_move_the_connection(monkeypatch):
    with Server("127.0.0.1") as target, Server("127.0.0.2", target.port) as decoy:
        calls: list[str] = []

        def rebinding(host: str, port: int) -> list[str]:
            calls.append(host)
            return ["127.0.0.1"] if len(calls) == 1 else ["127.0.0.2"]

        # Had urllib3 resolved the name itself, the system resolver would also have said 127.0.0.2.
        system_lookups: list[str] = []
        real_getaddrinfo = socket.getaddrinfo

        def system_resolver(host: Any, *args: Any, **kwargs: Any) -> Any:
            system_lookups.append(host)
            return real_getaddrinfo("127.0.0.2" if host == "rebind.test" else host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", system_resolver)
        session = guarded_session(GuardedAdapter(LOOPBACK_ONLY, resolver=rebinding))
        url = f"http://rebind.test:{target.port}/x"

        response = session.post(url, data=b"first", timeout=5)

        assert (response.status_code, response.text) == (200, "ok")
        assert calls == ["rebind.test"]
        assert "rebind.test" not in system_lookups
        assert target.seen == [
            {"path": "/x", "host": f"rebind.test:{target.port}", "body": b"first", "client": None}
        ]
        assert decoy.seen == []
        # The next request resolves again, gets the rebound answer, and is refused before connecting.
        with pytest.raises(EndpointRefused, match=r"resolves to 127\.0\.0\.2, which is a loopback address"):
            session.post(url, data=b"second", timeout=5)
        assert calls == ["rebind.test", "rebind.test"]
        assert (len(target.seen), decoy.seen) == (1, [])


LOOPBACK_NET = parse_networks("127.0.0.0/8")


def test_the_next_checked_address_is_tried_when_one_cannot_be_connected_to(caplog):
    # Nothing listens on 127.0.0.2 at the target's port: that address refuses the connection.
    with Server("127.0.0.1") as target:
        session = guarded_session(
            GuardedAdapter(LOOPBACK_NET, resolver=lambda h, p: ["127.0.0.2", "127.0.0.1"])
        )

        response = session.post(f"http://two.test:{target.port}/x", data=b"once", timeout=5)

        assert (response.status_code, response.text) == (200, "ok")
        assert target.seen == [
            {"path": "/x", "host": f"two.test:{target.port}", "body": b"once", "client": None}
        ]
        [warning] = [r.getMessage() for r in caplog.records if r.name == "cdr_webhook.deliver.egress"]
        assert warning.startswith("Could not connect to two.test at 127.0.0.2 (")
        assert warning.endswith("; trying its next address, 127.0.0.1")

        # When no address takes the connection, the last error is the request's.
        session = guarded_session(
            GuardedAdapter(LOOPBACK_NET, resolver=lambda h, p: ["127.0.0.2", "127.0.0.3"])
        )
        with pytest.raises(requests.ConnectionError, match="127.0.0.3"):
            session.post(f"http://two.test:{target.port}/x", data=b"never", timeout=5)
        assert len(target.seen) == 1


def test_no_other_address_is_tried_once_the_request_was_sent():
    # 127.0.0.2 takes the connection and the request, then never answers: a read timeout. Sending the
    # CDR to the next address as well could deliver it twice, so the timeout is the request's.
    with Server("127.0.0.1") as target, socket.socket() as silent:
        silent.bind(("127.0.0.2", target.port))
        silent.listen()
        session = guarded_session(
            GuardedAdapter(LOOPBACK_NET, resolver=lambda h, p: ["127.0.0.2", "127.0.0.1"])
        )

        with pytest.raises(requests.ReadTimeout):
            session.post(f"http://two.test:{target.port}/x", data=b"once", timeout=(5, 0.5))

        assert target.seen == []


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: Path
    hooks: tuple[Path, Path]
    wrong: tuple[Path, Path]
    self_signed: tuple[Path, Path]
    client_cert_pem: str
    client_key_pem: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = issue("cdr-webhook test CA")
    server = ExtendedKeyUsageOID.SERVER_AUTH

    def write(name: str, pair: Issued) -> tuple[Path, Path]:
        cert_pem, key_pem = pem(*pair)
        (directory / f"{name}.crt").write_text(cert_pem)
        (directory / f"{name}.key").write_text(key_pem)
        return directory / f"{name}.crt", directory / f"{name}.key"

    (directory / "ca.crt").write_text(pem(ca[0])[0])
    client_cert_pem, client_key_pem = pem(
        *issue("cdr-webhook-client", issuer=ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    )
    return Pki(
        ca=directory / "ca.crt",
        hooks=write("hooks", issue("hooks.test", issuer=ca, usage=server)),
        wrong=write("wrong", issue("wrong.test", issuer=ca, usage=server)),
        self_signed=write("self-signed", issue("hooks.test", usage=server)),
        client_cert_pem=client_cert_pem,
        client_key_pem=client_key_pem,
    )


def test_https_to_the_pinned_address_keeps_host_sni_and_verification(pki):
    with Server(context=tls_context(pki.hooks)) as server:
        session = guarded_session(
            GuardedAdapter(LOOPBACK_ONLY, ca_bundle=str(pki.ca), resolver=hooks_resolver)
        )

        response = session.post(f"https://hooks.test:{server.port}/x", data=b"cdr", timeout=5)

        assert (response.status_code, response.text) == (200, "ok")
        assert server.seen == [
            {"path": "/x", "host": f"hooks.test:{server.port}", "body": b"cdr", "client": None}
        ]
        assert server.snis == ["hooks.test"]
        # Another name on the same address gets its own pool: its check is against its own name.
        with pytest.raises(requests.exceptions.SSLError, match="Hostname mismatch.*'wrong.test'"):
            session.post(f"https://wrong.test:{server.port}/x", data=b"cdr", timeout=5)
        with pytest.raises(ValueError, match="verify=False is refused"):
            session.post(f"https://hooks.test:{server.port}/x", data=b"cdr", timeout=5, verify=False)
        assert len(server.seen) == 1


@pytest.mark.parametrize(
    ("served", "trusted", "error"),
    [
        ("wrong", "test CA", "Hostname mismatch, certificate is not valid for 'hooks.test'"),
        ("self_signed", "test CA", "self.signed certificate"),
        ("hooks", "default store", "unable to get local issuer certificate"),
    ],
)
def test_untrusted_certificate_fails(pki, served, trusted, error):
    ca_bundle = str(pki.ca) if trusted == "test CA" else None
    with Server(context=tls_context(getattr(pki, served))) as server:
        session = guarded_session(GuardedAdapter(LOOPBACK_ONLY, ca_bundle=ca_bundle, resolver=hooks_resolver))
        with pytest.raises(requests.exceptions.SSLError, match=error):
            session.post(f"https://hooks.test:{server.port}/x", data=b"cdr", timeout=5)
        assert server.seen == []


def test_mutual_tls(pki):
    url_path = "/mtls"
    with Server(context=tls_context(pki.hooks, client_ca=pki.ca)) as server:
        url = f"https://hooks.test:{server.port}{url_path}"
        anonymous = guarded_session(
            GuardedAdapter(LOOPBACK_ONLY, ca_bundle=str(pki.ca), resolver=hooks_resolver)
        )
        with pytest.raises(requests.exceptions.RequestException):
            anonymous.post(url, data=b"cdr", timeout=5)
        assert server.seen == []
        # The server refused the handshake for want of a certificate (its thread may report it last).
        deadline = time.monotonic() + 2
        while not server.handshake_errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "certificate" in str(server.handshake_errors[0])

        extra = {
            "ca_bundle": pki.ca.read_text(),
            "client_cert": pki.client_cert_pem,
            "client_key": pki.client_key_pem,
        }
        with pem_files("tls", extra) as files:
            adapter = GuardedAdapter(
                LOOPBACK_ONLY,
                ca_bundle=files.ca_bundle,
                client_cert=files.client_cert,
                resolver=hooks_resolver,
            )
            response = guarded_session(adapter).post(url, data=b"cdr", timeout=5)

        assert response.status_code == 200
        assert server.seen == [
            {
                "path": url_path,
                "host": f"hooks.test:{server.port}",
                "body": b"cdr",
                "client": "cdr-webhook-client",
            }
        ]


# --- PEM text from connection extras ---------------------------------------------------------------


def test_pem_files_are_private_and_removed(pki):
    ca_pem = pki.ca.read_text()
    extra = {"ca_bundle": ca_pem, "client_cert": pki.client_cert_pem + pki.client_key_pem}
    with pem_files("tls", extra) as files:
        assert files.client_cert is not None
        assert files.ca_bundle is not None
        paths = [Path(files.ca_bundle), *map(Path, files.client_cert)]
        assert files.client_cert[0] == files.client_cert[1]  # the key travels in the certificate's PEM
        assert Path(files.ca_bundle).read_text() == ca_pem
        assert all(stat.S_IMODE(os.stat(path).st_mode) == 0o600 for path in paths)
        assert stat.S_IMODE(os.stat(paths[0].parent).st_mode) == 0o700
    assert not any(path.exists() for path in paths)
    assert not paths[0].parent.exists()

    written: list[Path] = []

    def fail_inside() -> None:
        with pem_files("tls", extra) as files:
            written.append(Path(str(files.ca_bundle)))
            raise RuntimeError("the POST failed")

    with pytest.raises(RuntimeError):
        fail_inside()
    assert len(written) == 1
    assert not written[0].exists()

    with pem_files("tls", {"ca_bundle": "", "client_cert": None}) as files:
        assert files == TlsFiles()


def test_pem_files_refuse_what_the_endpoint_rules_refuse():
    """The one PEM rule (``endpoint_config.tls_texts``, unit-tested on its own) guards the files too."""
    with (
        pytest.raises(EndpointConfigError, match="connection 'tls' extra 'ca_bundle': must be PEM text"),
        pem_files("tls", {"ca_bundle": "/etc/ssl/certs/ca-certificates.crt"}),
    ):
        pass


def test_missing_tls_file_is_refused_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="TLS file not found"):
        GuardedAdapter((), ca_bundle=str(tmp_path / "missing.pem"))


# --- the same through CdrWebhookHook and an Airflow connection's extras ------------------------------


def test_hook_uses_the_connection_ca_bundle_and_client_certificate(pki, monkeypatch):
    from cdr_webhook.deliver.hook import CdrWebhookHook

    def connection(**extra: str) -> None:
        monkeypatch.setenv(
            "AIRFLOW_CONN_TLS_TEST",
            json.dumps(
                {"conn_type": "http", "host": f"https://hooks.test:{server.port}/cdr", "extra": extra}
            ),
        )

    with Server(context=tls_context(pki.hooks, client_ca=pki.ca)) as server:

        def hook() -> CdrWebhookHook:  # one hook per task: it reads its connection once
            return CdrWebhookHook(
                "tls_test", timeout=5, allowed_networks=["127.0.0.1/32"], resolver=hooks_resolver
            )

        connection()  # the public CAs only: our test CA is not trusted
        assert hook().post(b"{}", {}).error.startswith(("TLS failed", "connection failed"))
        connection(ca_bundle=pki.ca.read_text())  # trusted, but no client certificate
        assert hook().post(b"{}", {}).http_status is None
        connection(
            ca_bundle=pki.ca.read_text(), client_cert=pki.client_cert_pem, client_key=pki.client_key_pem
        )
        result = hook().post(b"{}", {})
        assert (result.http_status, result.error) == (200, None)
        assert [seen["client"] for seen in server.seen] == ["cdr-webhook-client"]
        assert pki.client_key_pem in hook().endpoint.secrets()  # masked, scrubbed, never stored


def test_hook_deadline_cuts_off_headers_sent_a_byte_at_a_time_over_tls(pki, monkeypatch):
    from cdr_webhook.deliver.hook import CdrWebhookHook
    from tests.support.drip_server import DripServer

    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\nok"
    with DripServer(head=b"HTTP/1.1 200 OK\r\n", drip=reply[17:], context=tls_context(pki.hooks)) as server:
        monkeypatch.setenv(
            "AIRFLOW_CONN_TLS_TEST",
            json.dumps(
                {
                    "conn_type": "http",
                    "host": f"https://hooks.test:{server.port}/cdr",
                    "extra": {"ca_bundle": pki.ca.read_text()},
                }
            ),
        )
        hook = CdrWebhookHook(
            "tls_test", timeout=1.5, allowed_networks=["127.0.0.1/32"], resolver=hooks_resolver
        )
        started = time.monotonic()

        result = hook.post(b"{}", {})

        assert time.monotonic() - started < 2.0
        assert result.http_status is None
        assert result.error.startswith("no complete reply within the 1.5 s deadline")
        assert (
            len(server.requests) == 1
        )  # verified TLS, then the request was sent: the wait is the receiver's
        assert server.finished == 0


def test_hook_refusal_is_reported_not_raised(monkeypatch):
    from cdr_webhook.deliver.hook import CdrWebhookHook

    monkeypatch.setenv(
        "AIRFLOW_CONN_TLS_TEST", json.dumps({"conn_type": "http", "host": "http://127.0.0.1:9/x"})
    )
    result = CdrWebhookHook("tls_test", timeout=1).post(b"{}", {})
    assert result.refused is True
    assert result.http_status is None
    assert "loopback" in result.error
    assert "AIRFLOW__CDR_WEBHOOK__ALLOWED_NETWORKS" in result.error
