"""The node's own Redis connections: how their sockets are set up."""

from __future__ import annotations

import os
import socket
import time

import pytest
import pytest_twisted
from support.waiting import timed, until


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


@pytest_twisted.ensureDeferred
async def test_a_late_reply_fails_every_waiting_command_and_drops_the_connection(redis_server, queue):
    """
    Each command has its own reply deadline (one timer per connection): replies
    in time, however many deadlines the timer passed, leave the connection up;
    a late one fails with a timeout, so does every command behind it, and the
    connection is dropped and made again.
    """
    import txredisapi
    from twisted.internet import reactor

    from pushservice.redislink import Prefix, RedisLink
    from pushservice.redisurl import parse_redis_url

    changes: list[bool] = []
    link = RedisLink(reactor, parse_redis_url(redis_server.url), 1.0, 5.0, lambda link: changes.append(link.up))
    link.start()
    try:
        await timed(link.when_up())
        first = link._protocol
        # three blocking reads of 0.7 s each, back to back: each replies within its own second
        for _ in range(3):
            assert await timed(link.command_after(Prefix.of("BLPOP", f"{queue}:empty"), 0.7)) is None
        assert link._protocol is first and changes == [True]
        started = time.monotonic()
        late = link.command("BLPOP", f"{queue}:empty", 0)  # never answered
        behind = link.command("PING")  # Redis answers it only after the BLPOP
        for d in (late, behind):
            with pytest.raises(txredisapi.TimeoutError):
                await timed(d)
        assert 0.9 < time.monotonic() - started < 5
        await until(lambda: link.up and link._protocol is not first, what="connected again")
        assert changes == [True, False, True]
        assert await timed(link.command("PING")) == b"PONG"
    finally:
        await link.stop()
