"""A webhook receiver on 127.0.0.1 that misbehaves at random, reproducibly, and records every request.

Each request is judged by a hash of the seed, its ``webhook-id`` and how many requests with that id
came before it: the same seed gives the same CDR the same fate on its n-th POST, whatever order the
workers send in, so a failing run is replayed by giving its seed again. The fates:

* ``5xx``: answered 500, 502, 503 or 504 (``server_error`` of the requests);
* ``hang``: held ``hang_seconds`` (past the sender's deadline), then the connection closed unanswered;
* ``reset``: the connection reset (``SO_LINGER`` 0, then closed: an RST, no reply);
* otherwise 200.

Signatures are verified with the reference library; a request without the API key gets 401.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import socket
import struct
import threading
import time
from collections import Counter, defaultdict
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

SERVER_ERRORS = (500, 502, 503, 504)


@dataclasses.dataclass(frozen=True)
class ChaosRequest:
    """One request and the fate it was given: an HTTP status, ``"hang"`` or ``"reset"``."""

    at: float
    cdr_id: str | None
    webhook_id: str | None
    signature_ok: bool
    answer: int | str

    @property
    def acknowledged(self) -> bool:
        return isinstance(self.answer, int) and 200 <= self.answer < 300


@dataclasses.dataclass(frozen=True)
class Chaos:
    """The shares of requests given each fault (the rest get 200), and the seed that draws them."""

    seed: int
    server_error: float = 0.20
    hang: float = 0.05
    reset: float = 0.02

    def fate(self, webhook_id: str, nth: int) -> int | str:
        """The answer to the ``nth`` (0-based) request carrying ``webhook_id``."""
        digest = hashlib.sha256(f"{self.seed}:{webhook_id}:{nth}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
        if draw < self.server_error:
            return SERVER_ERRORS[digest[8] % len(SERVER_ERRORS)]
        if draw < self.server_error + self.hang:
            return "hang"
        if draw < self.server_error + self.hang + self.reset:
            return "reset"
        return 200


class ChaosReceiver:
    """A threaded HTTP server answering by :class:`Chaos`; ``requests`` holds every request seen."""

    def __init__(self, chaos: Chaos, *, secret: str, api_key: str, hang_seconds: float) -> None:
        self.chaos = chaos
        self.hang_seconds = hang_seconds
        self.api_key = api_key
        self._verifier = Webhook(secret)
        self.requests: list[ChaosRequest] = []
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="chaos-receiver", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/cdr-hook"

    def start(self) -> ChaosReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def received(self) -> list[ChaosRequest]:
        with self._lock:
            return list(self.requests)

    def judge(self, headers: dict[str, str], body: bytes) -> int | str:
        """Record the request and return its fate (401 for a bad key or signature, whatever the draw)."""
        try:
            self._verifier.verify(body, headers, json_parse=False)
            signature_ok = True
        except WebhookVerificationError:
            signature_ok = False
        try:
            cdr_id = json.loads(body).get("cdr_id")
        except (ValueError, AttributeError):
            cdr_id = None
        webhook_id = headers.get("webhook-id")
        with self._lock:
            if headers.get("x-api-key") != self.api_key or not signature_ok or webhook_id is None:
                answer: int | str = 401
            else:
                answer = self.chaos.fate(webhook_id, self._seen[webhook_id])
                self._seen[webhook_id] += 1
            self.requests.append(ChaosRequest(time.time(), cdr_id, webhook_id, signature_ok, answer))
        return answer

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {key.lower(): value for key, value in self.headers.items()}
                answer = receiver.judge(headers, body)
                if answer == "hang":
                    time.sleep(receiver.hang_seconds)
                    self.close_connection = True
                    return
                if answer == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                reply = json.dumps({"status": answer}).encode()
                self.send_response(int(answer))
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the recorded requests are the log

        return Handler


def tally(requests: list[ChaosRequest]) -> dict[str, Any]:
    """The figures of a run: POSTs, answers by kind, and duplicates (a 2xx beyond a CDR's first)."""
    answers = Counter(
        "2xx" if r.acknowledged else (r.answer if isinstance(r.answer, str) else str(r.answer))
        for r in requests
    )
    acknowledged = Counter(r.webhook_id for r in requests if r.acknowledged)
    ids_per_cdr: dict[str | None, set[str | None]] = defaultdict(set)
    for request in requests:
        ids_per_cdr[request.cdr_id].add(request.webhook_id)
    return {
        "posts": len(requests),
        "answers": dict(answers),
        "acknowledged_ids": set(acknowledged),
        "duplicates": sum(n - 1 for n in acknowledged.values()),
        "cdrs_acknowledged_twice": sum(n > 1 for n in acknowledged.values()),
        "ids_per_cdr": ids_per_cdr,
    }
