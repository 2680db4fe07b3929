"""A slow receiver on 127.0.0.1: reads one request, then sends its reply a byte at a time (TLS optional)."""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl


class DripServer:
    """
    Answer every connection with ``head`` at once, then ``drip`` one byte every ``interval`` seconds.

    It stops dripping when the client goes away or the server is stopped. ``finished`` counts the
    connections whose whole reply was sent: a deadline that works leaves it at 0.

    :param context: A server-side SSL context: the reply is sent over TLS.
    """

    def __init__(
        self,
        *,
        head: bytes = b"",
        drip: bytes = b"",
        interval: float = 0.2,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.head = head
        self.drip = drip
        self.interval = interval
        self.context = context
        self.requests: list[bytes] = []
        self.finished = 0
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._serve, name="drip-server", daemon=True)

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    def __enter__(self) -> DripServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._answer, args=(client,), daemon=True).start()

    def _answer(self, client: socket.socket) -> None:
        client.settimeout(5)
        try:
            if self.context is not None:
                client = self.context.wrap_socket(client, server_side=True)
            with client:
                self.requests.append(_read_request(client))
                client.sendall(self.head)
                for byte in self.drip:
                    if self._stop.wait(self.interval):
                        return
                    client.sendall(bytes([byte]))
                self.finished += 1
        except OSError:
            pass  # the client hung up (the deadline), or the TLS handshake failed


def _read_request(client: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = client.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body
