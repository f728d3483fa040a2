"""Fault injection on the real servers: a TCP relay in front of RabbitMQ or Redis that a test can cut and restore.

Stopping the shared broker would hit every other test on the machine; a relay on its own loopback port gives one
test a broker (or Redis) of its own to lose: while cut, it drops every open connection and refuses new ones, exactly
what clients see when the server goes away.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit


class TcpRelay:
    """Forwards 127.0.0.1:<port> to ``target``; :meth:`cut` makes the server vanish, :meth:`restore` brings it back."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.port = self._listen(0)
        threading.Thread(target=self._accept_loop, name="relay-accept", daemon=True).start()

    @classmethod
    def for_url(cls, url: str) -> TcpRelay:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or {"amqp": 5672, "redis": 6379}[parts.scheme])

    def url(self, original: str) -> str:
        """``original`` with its host and port replaced by the relay's."""
        parts = urlsplit(original)
        credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return parts._replace(netloc=f"{credentials}127.0.0.1:{self.port}").geturl()

    def _listen(self, port: int) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        listener.settimeout(0.2)
        self._listener = listener
        return int(listener.getsockname()[1])

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            listener = self._listener
            if listener is None:
                self._stopped.wait(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """The server is gone: open connections reset, new ones refused (the port is closed)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def restore(self) -> None:
        """The server is back on the same port."""
        if self._listener is None:
            self._listen(self.port)

    def close(self) -> None:
        self._stopped.set()
        self.cut()


@contextlib.contextmanager
def relay_for(url: str) -> Iterator[TcpRelay]:
    relay = TcpRelay.for_url(url)
    try:
        yield relay
    finally:
        relay.close()
