"""A real OAuth2 authorization server's token endpoint on 127.0.0.1, and a receiver that wants its tokens.

:class:`TokenServer` implements the client-credentials grant of RFC 6749 (4.4, 5.1, 5.2): client
authentication by HTTP Basic (2.3.1, form-encoded id and secret) or in the body, ``grant_type``,
``scope`` and ``audience`` recorded, tokens that expire after ``lifetime`` seconds and can be revoked,
errors as JSON. :class:`BearerReceiver` is the demo receiver (signature and ``x-api-key`` checked)
that first answers 401 to a request without a valid, unexpired, unrevoked token of that server.
"""

from __future__ import annotations

import base64
import dataclasses
import http.server
import json
import secrets
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

from demo.receiver import Received, Receiver

if TYPE_CHECKING:
    import ssl


@dataclasses.dataclass(frozen=True)
class Issued:
    token: str
    client_auth: str  # client_secret_basic or client_secret_post
    scope: str | None
    audience: str | None
    expires_at: float


class TokenServer:
    """The token endpoint at :attr:`url`; :attr:`issued` lists every token it gave, in order."""

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        lifetime: float = 3600,
        delay: float = 0.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.lifetime = lifetime
        self.delay = delay  # seconds before each answer: concurrent fetches overlap
        self.fail_with: tuple[int, dict[str, Any]] | None = None  # answer this to every request
        self.issued: list[Issued] = []
        self.requests = 0
        self.revoked: set[str] = set()
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, address: None  # a refused handshake: no traceback
        self.tls = tls
        if tls is not None:  # HTTPS: the handshake happens in the request's thread
            self._server.socket = tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread = threading.Thread(target=self._server.serve_forever, name="token-server", daemon=True)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}/tenant-7/oauth/token"

    def valid(self, token: str | None) -> bool:
        with self._lock:
            found = [issued for issued in self.issued if issued.token == token]
            return bool(found) and token not in self.revoked and time.time() < found[0].expires_at

    def revoke_all(self) -> None:
        with self._lock:
            self.revoked.update(issued.token for issued in self.issued)

    def __enter__(self) -> TokenServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _token_reply(self, headers: dict[str, str], form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if self.fail_with is not None:
            return self.fail_with
        authorization = headers.get("authorization", "")
        if authorization.startswith("Basic "):
            user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
            client = (
                urllib.parse.unquote_plus(user),
                urllib.parse.unquote_plus(password),
                "client_secret_basic",
            )
        else:
            client = (form.get("client_id", ""), form.get("client_secret", ""), "client_secret_post")
        if client[:2] != (self.client_id, self.client_secret):
            return 401, {"error": "invalid_client", "error_description": "client authentication failed"}
        if form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type"}
        issued = Issued(
            "at-" + secrets.token_urlsafe(24), client[2], form.get("scope"), form.get("audience"),
            time.time() + self.lifetime,
        )  # fmt: skip
        with self._lock:
            self.issued.append(issued)
        reply = {"access_token": issued.token, "token_type": "Bearer", "expires_in": self.lifetime}
        return 200, reply | ({"scope": issued.scope} if issued.scope else {})

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length).decode()
                with server._lock:
                    server.requests += 1
                time.sleep(server.delay)
                headers = {key.lower(): value for key, value in self.headers.items()}
                form = dict(urllib.parse.parse_qsl(body))
                status, reply = server._token_reply(headers, form)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("cache-control", "no-store")
                if status == 401:
                    self.send_header("www-authenticate", 'Basic realm="token"')
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


class BearerReceiver(Receiver):
    """The demo receiver behind a bearer token of ``tokens``: 401 first to any other request."""

    def __init__(self, tokens: TokenServer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tokens = tokens

    def _answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes, *, at: float | None = None
    ) -> tuple[int, dict[str, str]]:
        authorization = headers.get("authorization", "")
        if not (authorization.startswith("Bearer ") and self.tokens.valid(authorization[7:])):
            arrived = time.time() if at is None else at
            with self._lock:
                self.requests.append(Received(method, path, headers, body, None, 401, arrived))
            return 401, {"www-authenticate": 'Bearer error="invalid_token"'}
        return super()._answer(method, path, headers, body, at=at)

    def echoed(self, path: str, headers: dict[str, str]) -> dict[str, str]:
        """A careless receiver's reply: it carries back the request's headers, the bearer token too."""
        return super().echoed(path, headers) | {"authorization": headers.get("authorization", "")}
