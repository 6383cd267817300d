"""
The txredisapi protocols a L{pushservice.redislink.RedisLink} speaks: commands
(encoded by L{pushservice._internals.encode_command}, a few times faster than
txredisapi's own encoder on the mover's many-argument script calls), or
Pub/Sub for a link made with C{on_message}; and how their sockets are set up.
"""

from __future__ import annotations

import collections
import functools
import socket
from typing import Any

from twisted.protocols.policies import ProtocolWrapper

from . import _internals

__all__ = [
    "KEEPALIVE_COUNT",
    "DirectWrites",
    "KEEPALIVE_IDLE",
    "KEEPALIVE_INTERVAL",
    "command_protocol",
    "subscriber_protocol",
    "tune",
]

#: TCP keepalive: probe after this much idleness, this far apart, this many times.
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3


class DirectWrites:
    """
    A protocol's view of its transport whose writes go straight to the
    socket when nothing is queued before them, as the fan-out's do: a
    command then costs one send, not a register-for-write, a reactor turn,
    a send and an unregister.
    """

    __slots__ = ("wrapped",)

    def __init__(self, transport: Any) -> None:
        self.wrapped = transport

    def write(self, data: bytes) -> None:
        sent = _internals.send_now(self.wrapped, data)
        if sent < len(data):
            self.wrapped.write(data[sent:] if sent else data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


@functools.cache
def command_protocol() -> Any:
    """
    txredisapi's command protocol with the faster encoder, direct writes,
    replies as hiredis reads them, and one timer per connection for the
    reply deadlines instead of a timer and three Deferreds per command:
    about a third of a node's calls per message at steady rates (the mover
    and the fan-out loop send three commands per message). A reply later
    than C{replyTimeout} fails every command waiting and aborts the
    connection, as txredisapi does. Plain commands only: no pipelining, no MULTI.
    """
    import txredisapi
    from twisted.internet import reactor

    class Commands(txredisapi.RedisProtocol):  # type: ignore[misc]
        _timer: Any = None

        def makeConnection(self, transport: Any) -> None:
            # when each command still waiting for its reply went out, oldest first
            self._sent: collections.deque[float] = collections.deque()
            super().makeConnection(DirectWrites(transport))

        def tryConvertData(self, data: Any) -> Any:
            return data  # what txredisapi's returns with charset=None and convertNumbers=False, less a list copy

        def execute_command(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs or self.pipelining or self.inMulti:
                raise NotImplementedError("pushservice sends plain commands only")
            return self.send_encoded(_internals.encode_command(args))

        def send_encoded(self, command: bytes) -> Any:
            """Send one command already in RESP; its reply, or a failure (a ResponseError is raised)."""
            if self.connected == 0:
                raise txredisapi.ConnectionError("Not connected")
            self.transport.write(command)
            if self.replyTimeout:
                self._sent.append(reactor.seconds())
                if self._timer is None:
                    self._timer = self.callLater(self.replyTimeout, self._check_deadline)
            return self.replyQueue.get().addCallback(self.handle_reply)

        def replyReceived(self, reply: Any) -> None:
            if self._sent:
                self._sent.popleft()
            self.replyQueue.put(reply)

        def _check_deadline(self) -> None:
            self._timer = None
            if not self._sent or not self.connected:
                return
            early = self._sent[0] + self.replyTimeout - reactor.seconds()
            if early > 0:
                self._timer = self.callLater(early, self._check_deadline)
                return
            error = txredisapi.TimeoutError(f"Not received Redis response in {self.replyTimeout} seconds")
            while self.replyQueue.waiting:
                self.replyReceived(error)
            self.transport.abortConnection()

        def connectionLost(self, why: Any) -> None:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            super().connectionLost(why)

    return Commands


@functools.cache
def subscriber_protocol() -> Any:
    """A protocol class handing each Pub/Sub message to its link's C{on_message(channel, payload)}."""
    import txredisapi

    class Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]
        link: Any  # set by the link's factory

        def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
            return _internals.encode_command(args)

        def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
            self.link.on_message(channel, message)

    return Subscriber


def tune(transport: Any) -> None:
    """
    TCP keepalive with probes in seconds, not the kernel's default two hours;
    no Nagle delay: a command goes out at once even while the last is unacknowledged.
    """
    while isinstance(transport, (DirectWrites, ProtocolWrapper)):  # TLS: the TCP transport is underneath
        transport = transport.wrapped if isinstance(transport, DirectWrites) else transport.transport
    sock = transport.getHandle() if hasattr(transport, "getHandle") else None
    if not isinstance(sock, socket.socket) or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
