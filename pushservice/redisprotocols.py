"""
The txredisapi protocols a L{pushservice.redislink.RedisLink} speaks: commands
(encoded by L{pushservice._internals.encode_command}, a few times faster than
txredisapi's own encoder on the mover's many-argument script calls), or
Pub/Sub for a link made with C{on_message}; and how their sockets are set up.
"""

from __future__ import annotations

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
    """txredisapi's command protocol with the faster encoder and direct writes."""
    import txredisapi

    class Commands(txredisapi.RedisProtocol):  # type: ignore[misc]
        def makeConnection(self, transport: Any) -> None:
            super().makeConnection(DirectWrites(transport))

        def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
            return _internals.encode_command(args)

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
