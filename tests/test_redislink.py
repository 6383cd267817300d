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


class _Null:
    """A protocol that ignores everything (the test reads the other end itself)."""

    def makeConnection(self, transport: object) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: object) -> None:
        pass


def test_direct_writes_go_out_at_once_and_never_overtake():
    """A command is sent at once when nothing waits; queued behind what waits otherwise, in order."""
    from twisted.internet import reactor, tcp

    from pushservice import _internals
    from pushservice.redisprotocols import DirectWrites

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    client.connect(listener.getsockname())
    accepted, _ = listener.accept()
    transport = tcp.Server(accepted, _Null(), ("127.0.0.1", 1), None, 1, reactor)
    try:
        direct = DirectWrites(transport)
        direct.write(b"PING\r\n")
        assert client.recv(100) == b"PING\r\n", "sent without a reactor turn"
        transport.write(b"first ")  # queued in Twisted's buffer until the reactor writes
        direct.write(b"second")
        assert _internals.transport_queued(transport) == len(b"first second"), "queued behind, not sent ahead"
        assert direct.getPeer() == transport.getPeer()
        transport.doWrite()
        assert client.recv(100) == b"first second"
    finally:
        transport.stopReading()
        transport.stopWriting()
        for s in (client, accepted, listener):
            s.close()
