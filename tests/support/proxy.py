"""
A TCP proxy on its own threads (it keeps working while a test blocks its
reactor) that can go silent: a Redis host that stops answering, no FIN, no RST.
"""

from __future__ import annotations

import socket
import threading


class SilentProxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:target_port; C{silence()} makes the open connections go quiet."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self._silent: list[tuple[socket.socket, socket.socket]] = []  # kept open, never closed until stop()
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            quiet = threading.Event()
            with self._lock:
                self._pairs.append((client, upstream, quiet))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, quiet), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, quiet: threading.Event) -> None:
        source.settimeout(0.1)
        while not quiet.is_set() and not self._stopped.is_set():
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if quiet.is_set():
                return  # swallowed: nothing goes through, nothing is closed
            if not data:
                for s in (source, sink):
                    s.close()
                return
            try:
                sink.sendall(data)
            except OSError:
                return

    def silence(self) -> int:
        """Make every open connection half-open (new ones still work); how many went silent."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            for client, upstream, quiet in pairs:
                quiet.set()
                self._silent.append((client, upstream))
        return len(pairs)

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        with self._lock:
            for client, upstream, _ in self._pairs:
                client.close()
                upstream.close()
            for client, upstream in self._silent:
                client.close()
                upstream.close()
