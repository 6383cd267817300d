"""The node's own Redis connections: how their sockets are set up."""

from __future__ import annotations

import os
import socket

import pytest_twisted


def _sockets_to(port: int) -> list[socket.socket]:
    """Copies of this process's TCP sockets connected to 127.0.0.1:C{port}."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.getpeername()[1] == port:
                found.append(sock)
                continue
        except (OSError, IndexError, TypeError):
            pass
        sock.close()
    return found


@pytest_twisted.ensureDeferred
async def test_redis_sockets_send_at_once_and_probe_when_idle(node, redis_server):
    """Every Redis connection of a node has TCP_NODELAY (no Nagle wait per command) and keepalive probes."""
    sockets = _sockets_to(redis_server.port)
    try:
        assert len(sockets) >= 3, "requests, mover and tailer links"
        for sock in sockets:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) <= 60
    finally:
        for sock in sockets:
            sock.close()
