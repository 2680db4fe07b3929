"""A webhook receiver that verifies signatures and records every request it gets.

Used by the demo and the tests (on 127.0.0.1), and as the compose file's ``receiver`` service:

    python -m demo.receiver --host 0.0.0.0 --port 8000   (RECEIVER_API_KEY, RECEIVER_SIGNING_SECRET)
    python -m demo.receiver --show-bodies --save-bodies received/   (print and keep every body)

Each CDR can be given a *script*: the statuses to answer its successive requests with (e.g.
``[503, 200]`` fails once, then accepts). Unscripted CDRs get 200.

For the tests it also serves HTTPS (``tls``, mutual TLS when the context asks for a client
certificate), and can play a careless receiver that echoes the request's secrets back (``echo``).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import http.server
import json
import os
import re
import signal
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class Received:
    """One request as the receiver saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    signature_ok: bool | None  # None: the receiver has no secret to check with
    answered: int
    at: float = 0.0  # when it arrived (time.time())

    @property
    def payload(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def cdr_id(self) -> str | None:
        try:
            return self.payload.get("cdr_id")
        except (ValueError, AttributeError):
            return None


class Receiver:
    """
    A threaded HTTP server on ``host`` (127.0.0.1 unless given), on an ephemeral port unless given.

    :param secret: The ``whsec_`` secret to verify ``webhook-signature`` with (the reference library).
    :param api_key: When set, a request without this ``x-api-key`` gets 401.
    :param redirect_to: The Location of 302 answers.
    :param before_answer: Called with each request's headers and body before it is answered, in the
        request's own thread: a test can hold a reply there (it is also settable as an attribute).
    :param delay_ms: Answer every request this many milliseconds after it arrived (a slow receiver,
        for benchmarks); its arrival time is recorded before the wait.
    :param tls: Serve HTTPS with this context (its ``url`` is then https); a context that requires a
        client certificate makes it a mutual-TLS endpoint.
    :param echo: Answer as a careless receiver would: every reply's body, headers and reason phrase
        carry back what it was given (:meth:`echoed`), as received and base64-encoded.
    """

    def __init__(
        self,
        *,
        secret: str | None = None,
        api_key: str | None = None,
        redirect_to: str = "http://127.0.0.1:9/elsewhere",
        host: str = "127.0.0.1",
        port: int = 0,
        before_answer: Callable[[dict[str, str], bytes], None] | None = None,
        delay_ms: float = 0,
        tls: ssl.SSLContext | None = None,
        echo: bool = False,
    ) -> None:
        self._verifier = Webhook(secret) if secret else None
        self.secret = secret
        self.tls = tls
        self.echo = echo
        self.api_key = api_key
        self.redirect_to = redirect_to
        self.before_answer = before_answer
        self.delay_ms = delay_ms
        self.requests: list[Received] = []
        self._scripts: dict[str, list[int | tuple[int, dict[str, str]]]] = {}
        self._lock = threading.Lock()
        self._server = _Server((host, port), self._handler(), tls)
        self._thread = threading.Thread(target=self._server.serve_forever, name="receiver", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}/cdr-hook"

    def script(self, cdr_id: str, statuses: Iterable[int | tuple[int, dict[str, str]]]) -> None:
        """Answer the CDR's next requests with these statuses (or (status, headers)), in order; then 200."""
        with self._lock:
            self._scripts[str(cdr_id)] = list(statuses)

    def received(self, cdr_id: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if cdr_id is None or r.cdr_id == cdr_id]

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def echoed(self, path: str, headers: dict[str, str]) -> dict[str, str]:
        """What an echoing reply carries back: the path, the ``x-api-key`` (as sent, in base64 and in
        basic auth's base64url) and the receiver's signing secret, as an error page might."""
        key = headers.get("x-api-key") or ""
        return {
            "path": path,
            "api-key": key,
            "api-key-base64": base64.b64encode(key.encode()).decode(),
            "basic-auth": base64.urlsafe_b64encode(f"cdr:{key}".encode()).decode().rstrip("="),
            "signing-secret": self.secret or "",
        }

    def _answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes, *, at: float | None = None
    ) -> tuple[int, dict[str, str]]:
        signature_ok = None
        extra_headers: dict[str, str] = {}
        if self._verifier is not None:
            try:
                self._verifier.verify(body, headers, json_parse=False)
                signature_ok = True
            except WebhookVerificationError:
                signature_ok = False
        status = 200
        if method != "POST":
            status = 405
        elif self.api_key is not None and headers.get("x-api-key") != self.api_key:
            status = 401
        elif signature_ok is False:
            status = 401
        else:
            try:
                cdr_id = json.loads(body).get("cdr_id")
            except (ValueError, AttributeError):
                cdr_id = None
            with self._lock:
                script = self._scripts.get(str(cdr_id))
                if script:
                    step = script.pop(0)
                    status, extra_headers = step if isinstance(step, tuple) else (step, {})
        with self._lock:
            self.requests.append(
                Received(
                    method=method,
                    path=path,
                    headers=headers,
                    body=body,
                    signature_ok=signature_ok,
                    answered=status,
                    at=time.time() if at is None else at,
                )
            )
        return status, extra_headers

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The headers and the body go out in two writes: with Nagle's algorithm the body waits
            # for the client's delayed ACK of the headers, 40 ms per reply on a kept-alive connection.
            disable_nagle_algorithm = True

            def _serve(self) -> None:
                # Its arrival: before reading the body and checking the signature, which a loaded
                # machine's threads take turns at (a rate measured at the receiver counts arrivals).
                arrived = time.time()
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {key.lower(): value for key, value in self.headers.items()}
                if receiver.before_answer is not None:
                    receiver.before_answer(headers, body)
                status, extra_headers = receiver._answer(self.command, self.path, headers, body, at=arrived)
                if receiver.delay_ms:
                    time.sleep(receiver.delay_ms / 1000)
                fields: dict[str, Any] = {"status": status}
                reason = None
                if receiver.echo:
                    echoed = receiver.echoed(self.path, headers)
                    fields |= echoed
                    extra_headers = extra_headers | {f"x-echo-{key}": value for key, value in echoed.items()}
                    reason = f"{self.responses.get(status, ('Error',))[0]} (key {echoed['api-key']})"
                reply = json.dumps(fields).encode()
                self.send_response(status, reason)
                for name, value in extra_headers.items():
                    self.send_header(name, value)
                if 300 <= status < 400:
                    self.send_header("location", receiver.redirect_to)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_POST = _serve
            do_GET = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the recorded requests are the log

        return Handler


class _Server(http.server.ThreadingHTTPServer):
    """The receiver's server: each connection's TLS handshake (when ``tls``) in its own thread."""

    daemon_threads = True
    # socketserver's default backlog (5) resets new connections when many senders connect at once
    # (a task of many endpoints opens one per endpoint); a real server's is far larger (nginx: 511).
    request_queue_size = 512

    def __init__(self, address: tuple[str, int], handler: Any, tls: ssl.SSLContext | None) -> None:
        self.tls = tls
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(10)
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # a client the context refuses (no certificate, an untrusted one): no request
        with wrapped:
            super().finish_request(wrapped, client_address)


def request_line(request: Received) -> str:
    """The line the receiver prints for a request: its CDR, webhook-id, signature check and answer."""
    signature = {True: "valid", False: "INVALID", None: "not checked"}[request.signature_ok]
    return (
        f"{request.method} {request.path} cdr_id={request.cdr_id} "
        f"webhook-id={request.headers.get('webhook-id')} signature {signature}: answered {request.answered}"
    )


def show_body(request: Received, number: int, *, show: bool, save_to: Path | None) -> None:
    """Print the request's body as received, and/or write its exact bytes to ``save_to``."""
    if show:
        print(request.body.decode("utf-8", "replace"), flush=True)
    if save_to is not None:
        # A cdr_id is the dialer's text: only its safe characters go into a file name.
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(request.cdr_id))[:80]
        (save_to / f"{number:06d}-{name}.json").write_bytes(request.body)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until stopped, printing one line per request; the secrets come from the environment."""
    parser = argparse.ArgumentParser(prog="python -m demo.receiver", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument(
        "--delay-ms", type=float, default=0, help="answer each request after this many ms (default 0)"
    )
    parser.add_argument("--show-bodies", action="store_true", help="print each request's body after its line")
    parser.add_argument(
        "--save-bodies",
        type=Path,
        metavar="DIR",
        help="write each body, byte for byte, to DIR/<n>-<cdr_id>.json",
    )
    args = parser.parse_args(argv)
    if args.save_bodies:
        args.save_bodies.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # docker stop: close the socket, exit 0
    api_key = os.environ.get("RECEIVER_API_KEY") or None
    secret = os.environ.get("RECEIVER_SIGNING_SECRET") or None
    receiver = Receiver(
        secret=secret, api_key=api_key, host=args.host, port=args.port, delay_ms=args.delay_ms
    ).start()
    print(
        f"Receiver listening on {receiver.url}: x-api-key {'checked' if api_key else 'not checked'}, "
        f"webhook-signature {'verified' if secret else 'not verified'}",
        flush=True,
    )
    shown = 0
    try:
        while True:
            time.sleep(0.5)
            received = receiver.received()
            for number, request in enumerate(received[shown:], start=shown + 1):
                print(request_line(request), flush=True)
                show_body(request, number, show=args.show_bodies, save_to=args.save_bodies)
            shown = len(received)
    except KeyboardInterrupt:
        return 0
    finally:
        receiver.stop()


if __name__ == "__main__":
    sys.exit(main())
