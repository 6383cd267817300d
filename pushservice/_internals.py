"""
Every use of another library's private internals, in one place, each with
why and what it saves. ``tests/test_internals.py`` asserts each one still
exists, so an upgrade that removes one fails CI loudly instead of degrading
delivery. setup.py pins these libraries below their next major version;
README.rst ("Upgrading the libraries") says how to check a new release.

1. Twisted's TCP write buffer (``FileDescriptor.dataBuffer``, ``offset``,
   ``_tempDataBuffer``, ``_tempDataLen``). Why: to know whether anything is
   queued for a connection, so a broadcast can go straight to the socket
   with one ``send()``, and to bound what is queued per connection. Saves:
   the reactor's register-for-write, send, unregister round (three syscalls
   per connection per batch): fan-out 1.36M -> 1.07M deliveries/s without it
   on the bench VM (fanout-1k, the landing note of 0.1). The same socket
   is read once as a connection is accepted (L{read_now}): a client sends
   its request head right behind its connect, so it is usually there, and
   the connection needs no second turn of the reactor to be served.
2. Replacing a connection's protocol after the first request head
   (``transport.protocol``, ``ProtocolWrapper.wrappedProtocol``). Why: to
   hand WebSocket upgrades straight to Autobahn without twisted.web parsing
   the request and Autobahn re-parsing a replay of it. Saves: ~900 -> ~3,300
   handshakes/s (connect-rate, the landing note of 0.1).
3. Autobahn's ``WebSocketProtocol.CONFIG_ATTRS``: the names of the ~40
   options the factory copies onto every connection (and pretty-prints for
   a debug line). Why: to put them on a class made once instead. Saves:
   about a third of a handshake's CPU and a dict per connection (idle memory
   9.0 -> 6.3 KB per connection, the landing note of 0.1).
4. ``twisted.internet.endpoints._parseServer``. Why: to reject a ``--listen``
   string twistd cannot use before it daemonizes, without opening the port
   (``serverFromString`` would read TLS keys and open systemd sockets).
   Saves: a clear usage error instead of a traceback in the log file.
5. txredisapi's protocol-factory contract: ``RedisProtocol.connectionMade``
   calls ``factory.stopTrying()``, ``factory.connectionError(msg)`` and reads
   ``factory.isLazy`` when AUTH or SELECT fails. Why: pushservice manages
   its Redis connections itself (backoff, sentinels, keepalive, one log line
   per outage) and gives the protocol a factory of its own. Saves: the
   ``Scheduling retry`` line txredisapi's pool logs per slot per attempt.
6. Autobahn's permessage-deflate state (``WebSocketProtocol._perMessageCompress``,
   ``PerMessageDeflate._decompressor``). Why: with ``client_no_context_takeover``
   (pushservice.deflate asks every client for it) Autobahn makes a new inflater
   for each compressed message but keeps the last one. Saves: ~40 KB per
   connection that ever sent a compressed frame (zlib's 32 KiB window and
   state; tracemalloc, 100 inflaters), more than an idle connection's 6.3 KB.
7. txredisapi's ``BaseRedisProtocol`` command path: ``_build_command``,
   ``replyQueue``, ``replyReceived``, ``handle_reply``, ``tryConvertData``
   (``pushservice.redisprotocols`` sends with L{encode_command} and keeps
   one deadline timer per connection). Why: txredisapi encodes each argument
   through isinstance chains and ``str.format`` (the mover's script call
   has ~25), copies every reply list, and makes a timer and three Deferreds
   per command. Saves: 75,000 ``_encode_value`` calls per 1,000 messages
   (pipeline-10), and a third of the calls per message (bench/README).
8. What Autobahn's ``WebSocketServerProtocol.succeedHandshake`` does after
   it sent the 101 (``_perMessageCompress``, ``websocket_extensions_in_use``,
   ``state``, ``inside_message``, ``current_frame``, the auto-ping timer on
   ``factory._batched_timer`` calling ``_sendAutoPing``, ``_onOpen``,
   ``is_open``, ``consumeData``). Why: pushservice.handshake answers a
   plain upgrade from the head the port's router already parsed, and must
   leave the connection as Autobahn would. Saves: Autobahn's second parse
   of the head, its URL parsing, the Deferred around ``onConnect`` and its
   debug lines' arguments (with the collector tuned too, 256-290 -> 212-220 us
   of CPU per handshake in connect-rate, bench/README.md).
9. What Autobahn's connection set-up does for a server connection
   (``WebSocketAdapterProtocol.connectionMade``, then the ``_connectionMade``
   of ``WebSocketServerProtocol`` and ``WebSocketProtocol``: the attributes
   it sets, ``factory.countConnections``), and that its adapter's
   ``dataReceived`` only logs before calling ``_dataReceived``. Why:
   pushservice.websocket sets a connection up the same way but without the
   debug lines, whose arguments Autobahn formats even when nobody logs at
   debug level (``hltype`` costs ~5 us, three times per handshake), and
   makes the UTF-8 validator (~7 us) when a client first sends text.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import txaio
from autobahn.twisted.util import create_transport_details
from autobahn.wamp.types import TransportDetails
from autobahn.websocket.protocol import TrafficStats, WebSocketProtocol
from autobahn.websocket.utf8validator import Utf8Validator
from twisted.internet import abstract, tcp
from twisted.protocols.policies import ProtocolWrapper

__all__ = [
    "LAZY_UTF8_VALIDATOR",
    "TRANSPORT_BUFFER_ATTRIBUTES",
    "direct_socket",
    "encode_command",
    "open_connection",
    "parse_server_endpoint",
    "protocol_option_names",
    "read_now",
    "release_inflater",
    "replace_protocol",
    "send_now",
    "set_up_connection",
    "transport_queued",
]

#: (class, attribute) pairs of Twisted's write buffer that 1. reads.
TRANSPORT_BUFFER_ATTRIBUTES = (
    (abstract.FileDescriptor, "dataBuffer"),
    (abstract.FileDescriptor, "offset"),
    (abstract.FileDescriptor, "_tempDataLen"),
)


def transport_queued(transport: Any) -> int:
    """1. Bytes a TCP transport holds for its socket (0 for other transports: they say so by pausing)."""
    if not isinstance(transport, tcp.Connection):
        return 0
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen  # type: ignore[no-any-return]


def send_now(transport: Any, data: bytes | memoryview) -> int:
    """
    1. Write to a TCP transport's socket directly when nothing is queued
    before C{data}; the bytes the socket took (0: use C{transport.write}).
    """
    sock = direct_socket(transport)
    if sock is None:
        return 0
    try:
        return sock.send(data)  # type: ignore[no-any-return]
    except OSError:
        return 0  # EAGAIN, or a broken connection that Twisted will find and report


def read_now(transport: Any) -> bytes:
    """
    1. What a plain TCP transport's socket holds now, read as Twisted's
    C{doRead} reads it: b"" when nothing is there yet, for TLS and other
    transports, and on an end of file or an error (the reactor finds those).
    """
    if not isinstance(transport, tcp.Connection) or transport.TLS or not transport.connected:
        return b""
    try:
        return transport.socket.recv(transport.bufferSize)  # type: ignore[no-any-return]
    except OSError:
        return b""


def open_connection(protocol: Any, pmce: Any) -> None:
    """8. Open C{protocol} as Autobahn does once its 101 is sent; C{pmce}: its permessage-deflate, or None."""
    protocol._perMessageCompress = pmce
    protocol.websocket_extensions_in_use = [pmce] if pmce is not None else []
    protocol.websocket_protocol_in_use = None
    protocol.state = WebSocketProtocol.STATE_OPEN
    if protocol.openHandshakeTimeoutCall is not None:
        protocol.openHandshakeTimeoutCall.cancel()
        protocol.openHandshakeTimeoutCall = None
    protocol.inside_message = False
    protocol.current_frame = None
    if protocol.autoPingInterval:
        timer = protocol.factory._batched_timer
        protocol.autoPingPendingCall = timer.call_later(protocol.autoPingInterval, protocol._sendAutoPing)
    protocol._onOpen()
    txaio.resolve(protocol.is_open, None)  # type: ignore[attr-defined]
    if protocol.data:
        protocol.consumeData()


def set_up_connection(protocol: Any) -> None:
    """9. Set up a server connection's C{protocol} as Autobahn's C{connectionMade} does, but its UTF-8 validator."""
    details = protocol._transport_details = create_transport_details(protocol.transport, True)
    details.channel_framing = TransportDetails.CHANNEL_FRAMING_WEBSOCKET
    protocol.peer = details.peer
    try:
        protocol.transport.setTcpNoDelay(protocol.tcpNoDelay)
    except Exception:  # noqa: S110 - as Autobahn: not a TCP socket (a UNIX socket, a wrapper)
        pass
    factory = protocol.factory
    for name in protocol.CONFIG_ATTRS:  # none where the options are on the class (3.)
        if not hasattr(protocol, name):
            setattr(protocol, name, getattr(factory, name))
    protocol._perMessageCompress = None
    protocol.trackedTimings = None
    protocol.setTrackTimings(protocol.trackTimings)
    protocol.trafficStats = TrafficStats()
    protocol.state = WebSocketProtocol.STATE_CONNECTING
    protocol.send_state = WebSocketProtocol.SEND_STATE_GROUND
    protocol.data = b""
    protocol.send_queue = deque()
    protocol.triggered = False
    for name in _CLEAR:
        setattr(protocol, name, False)
    for name in _UNSET:
        setattr(protocol, name, None)
    protocol.autoPingPendingSeq = 0
    if protocol.openHandshakeTimeout > 0:
        protocol.openHandshakeTimeoutCall = factory._batched_timer.call_later(
            protocol.openHandshakeTimeout, protocol.onOpenHandshakeTimeout
        )
    factory.countConnections += 1


class _LazyValidator:
    """9. A connection's UTF-8 validator, made on first use and then kept on the connection."""

    def __get__(self, protocol: Any, owner: Any = None) -> Any:
        if protocol is None:
            return self
        validator = protocol.__dict__["utf8validator"] = Utf8Validator()
        return validator


LAZY_UTF8_VALIDATOR = _LazyValidator()

#: 9. The flags and the slots Autobahn's _connectionMade starts False and None.
_CLEAR = tuple(
    "wasMaxFramePayloadSizeExceeded wasMaxMessagePayloadSizeExceeded closedByMe failedByMe droppedByMe wasClean"
    " wasServerConnectionDropTimeout wasOpenHandshakeTimeout wasCloseHandshakeTimeout wasServingFlashSocketPolicyFile".split()
)
_UNSET = tuple(
    "wasNotCleanReason localCloseCode localCloseReason remoteCloseCode remoteCloseReason openHandshakeTimeoutCall"
    " closeHandshakeTimeoutCall autoPingTimeoutCall autoPingPending autoPingPendingCall autoPingPendingSent".split()
)


def direct_socket(transport: Any) -> Any:
    """1. A TCP transport's socket if nothing is queued before what would be sent to it now, else None."""
    if (
        not isinstance(transport, tcp.Connection)
        or transport._tempDataLen
        or transport.offset != len(transport.dataBuffer)
        or not transport.connected
        or transport.disconnecting
    ):
        return None
    return transport.socket


def replace_protocol(transport: Any, successor: Any) -> None:
    """2. Make C{successor} the protocol that receives C{transport}'s data from now on."""
    if isinstance(transport, ProtocolWrapper):  # TLS: the wrapper feeds its wrapped protocol
        transport.wrappedProtocol = successor
    else:
        transport.protocol = successor


def protocol_option_names(protocol_class: Any) -> tuple[str, ...]:
    """3. The names of the options Autobahn copies from the factory onto each connection."""
    return tuple(protocol_class.CONFIG_ATTRS)


def parse_server_endpoint(description: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """4. Parse a server endpoint string without opening anything: (kind, args, kwargs)."""
    from twisted.internet import endpoints

    return endpoints._parseServer(description, None)  # type: ignore[attr-defined,no-any-return]


def release_inflater(protocol: Any) -> None:
    """6. Drop the inflater of C{protocol}'s last client message, where the next one starts afresh anyway."""
    pmce = protocol._perMessageCompress
    if pmce is not None and pmce.client_no_context_takeover:
        pmce._decompressor = None


def encode_command(args: tuple[Any, ...]) -> bytes:
    """
    7. A Redis command as txredisapi (with C{charset=None}) would send it:
    bytes as they are, text as UTF-8, numbers in decimal.
    """
    return b"*%d\r\n%s" % (len(args), encode_arguments(args))


def encode_arguments(args: Any) -> bytes:
    """7. The arguments of L{encode_command}, without the header counting them: to encode a constant part once."""
    out = []
    for arg in args:
        kind = type(arg)
        if kind is bytes:
            value = arg
        elif kind is int:
            value = b"%d" % arg
        elif kind is str:
            try:
                value = arg.encode()
            except UnicodeError:
                import txredisapi

                raise txredisapi.InvalidData("Encoding charset was not specified") from None
        elif isinstance(arg, float):
            value = format(arg, "f").encode()
        elif isinstance(arg, (bytes, bytearray)):
            value = bytes(arg)
        else:
            value = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(value), value))
    return b"".join(out)
