"""
Every private internal of another library that pushservice uses still exists
and still means what pushservice/_internals.py says: run this first when
upgrading Twisted, Autobahn or txredisapi (README, "Upgrading the libraries").
"""

from __future__ import annotations

import inspect
import select
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from autobahn.twisted.websocket import WebSocketAdapterProtocol, WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import abstract, tcp
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper

from pushservice import _internals


def test_twisted_write_buffer_attributes_exist():
    """1. FileDescriptor keeps dataBuffer, offset, _tempDataBuffer and _tempDataLen, and pauses past bufferSize."""
    for cls, name in _internals.TRANSPORT_BUFFER_ATTRIBUTES:
        assert name in vars(cls) or name in inspect.getsource(cls), (cls, name)
    source = inspect.getsource(abstract.FileDescriptor.write)
    assert "_tempDataBuffer" in source and "_tempDataLen" in source and "_maybePauseProducer" in source
    assert abstract.FileDescriptor.bufferSize == 65536
    assert issubclass(tcp.Connection, abstract.FileDescriptor)


@contextmanager
def _tcp_server_transport() -> Iterator[tuple[Any, socket.socket]]:
    """A tcp.Server transport on a real loopback connection, and the client's socket."""
    from twisted.internet import reactor

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    client.connect(listener.getsockname())
    accepted, _ = listener.accept()
    transport = None
    try:
        transport = tcp.Server(accepted, _Null(), ("127.0.0.1", 1), None, 1, reactor)
        yield transport, client
    finally:
        if transport is not None:
            # tcp.Server registered the socket with the reactor: unregister it before its fd is closed, or
            # the reactor keeps a stale entry and never watches the next socket that gets the same number
            transport.stopReading()
            transport.stopWriting()
        for s in (client, accepted, listener):
            s.close()


def test_send_now_and_queued_on_a_real_tcp_transport():
    """1. transport_queued and send_now read a real connection's buffer and write to its socket."""
    with _tcp_server_transport() as (transport, client):
        assert _internals.transport_queued(transport) == 0
        assert _internals.send_now(transport, b"hello") == 5
        assert client.recv(5) == b"hello"
        transport.write(b"queued")  # not flushed until the reactor writes: now something is queued
        assert _internals.transport_queued(transport) == 6
        assert _internals.send_now(transport, b"x") == 0  # would overtake what is queued
        assert _internals.transport_queued(object()) == 0 and _internals.send_now(object(), b"x") == 0


def test_read_now_reads_what_a_real_tcp_socket_holds():
    """1. read_now returns what is there, b"" when nothing is, and leaves an end of file to the reactor."""
    with _tcp_server_transport() as (transport, client):
        assert _internals.read_now(transport) == b""  # nothing sent yet: no wait, no error
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert select.select([transport.socket], [], [], 5)[0]
        assert _internals.read_now(transport) == b"GET / HTTP/1.1\r\n\r\n"
        client.close()
        assert select.select([transport.socket], [], [], 5)[0]
        assert _internals.read_now(transport) == b""  # the end of file: the reactor's doRead sees it again
        assert transport.doRead() is not None  # ...as the connection's end (CONNECTION_DONE)
        assert _internals.read_now(object()) == b""


def test_transport_protocol_can_be_replaced():
    """2. tcp.Connection delivers data to its .protocol attribute; ProtocolWrapper to its .wrappedProtocol."""
    assert "self.protocol.dataReceived" in inspect.getsource(tcp.Connection._dataReceived)
    assert "wrappedProtocol.dataReceived" in inspect.getsource(ProtocolWrapper.dataReceived)


def test_autobahn_names_its_per_connection_options():
    """3. Autobahn's protocol lists the options it copies from the factory in CONFIG_ATTRS."""
    names = _internals.protocol_option_names(WebSocketServerProtocol)
    assert {"maxFramePayloadSize", "autoPingInterval", "openHandshakeTimeout", "trustXForwardedFor"} <= set(names)
    from autobahn.websocket.protocol import WebSocketProtocol

    assert "CONFIG_ATTRS" in inspect.getsource(WebSocketProtocol._connectionMade)


def test_parse_server_endpoint_opens_nothing():
    """4. endpoints._parseServer parses an endpoint string into (kind, args, kwargs)."""
    kind, args, kwargs = _internals.parse_server_endpoint("tcp:8000:interface=127.0.0.1")
    assert (kind, args[0], kwargs["interface"]) == ("TCP", 8000, "127.0.0.1")


def test_txredisapi_protocol_factory_contract():
    """5. txredisapi's protocol calls factory.stopTrying/connectionError and reads isLazy when AUTH fails."""
    import txredisapi

    source = inspect.getsource(txredisapi.BaseRedisProtocol.connectionMade)
    assert "self.factory.stopTrying()" in source
    assert "self.factory.connectionError(" in source
    assert "self.factory.isLazy" in source
    for name in ("whenConnected", "whenDisconnected", "execute_command", "replyReceived"):
        assert callable(getattr(txredisapi.RedisProtocol, name)), name
    assert "replyTimeout" in inspect.signature(txredisapi.BaseRedisProtocol.__init__).parameters


class _Null:
    def makeConnection(self, transport: object) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: object = None) -> None:
        pass


def test_autobahn_keeps_the_last_inflater_where_it_can_be_released():
    """6. _perMessageCompress._decompressor is remade per message when None: releasing it keeps the next readable."""
    import zlib

    from autobahn.websocket.compress import PerMessageDeflate
    from autobahn.websocket.protocol import WebSocketProtocol

    assert "self._perMessageCompress = None" in inspect.getsource(WebSocketProtocol._connectionMade)
    source = inspect.getsource(PerMessageDeflate.start_decompress_message)
    assert "self._decompressor is None or self.client_no_context_takeover" in source

    class Conn:
        _perMessageCompress = PerMessageDeflate(True, True, True, 15, 15, 8)

    pmce = Conn._perMessageCompress
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = (compressor.compress(b"hello hello hello") + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
    for _ in range(2):
        pmce.start_decompress_message()
        assert pmce.decompress_message_data(body) == b"hello hello hello"
        pmce.end_decompress_message()
        _internals.release_inflater(Conn())
        assert pmce._decompressor is None


def test_command_encoding_matches_txredisapi():
    """7. txredisapi still builds commands in _build_command, and encode_command sends the very same bytes."""
    import txredisapi

    from pushservice.redisprotocols import command_protocol, subscriber_protocol

    assert "_build_command" in vars(txredisapi.BaseRedisProtocol)
    assert "self._build_command(" in inspect.getsource(txredisapi.BaseRedisProtocol.execute_command)
    reference = txredisapi.RedisProtocol(charset=None)
    for args in [
        ("EVALSHA", "ab" * 20, 5, "q", b"q:log", 0, -17, 2**70, 1.5, True, bytearray(b"\x00\xff"), "é€", b""),
        ("PING",),
        ("SET", "k", "v" * 100_000),
    ]:
        assert _internals.encode_command(args) == reference._build_command(*args)
        commands = command_protocol()(charset=None)
        sent = StringTransport()
        commands.makeConnection(sent)
        commands.execute_command(*args)
        assert sent.value() == reference._build_command(*args)
        assert subscriber_protocol()(charset=None)._build_command(*args) == reference._build_command(*args)
        for cut in range(len(args) + 1):  # a constant first part encoded once (redislink.Prefix)
            parts = _internals.encode_arguments(args[:cut]) + _internals.encode_arguments(args[cut:])
            assert b"*%d\r\n%s" % (len(args), parts) == reference._build_command(*args)
    with pytest.raises(txredisapi.InvalidData):
        _internals.encode_command(("SET", "k", "\ud800"))


def test_txredisapi_reply_path_is_what_commands_relies_on():
    """7. Replies go through replyReceived into replyQueue (waiting Deferreds), errors are raised by handle_reply,
    a lost connection fails what waits through replyReceived, and tryConvertData changes nothing with our settings."""
    import txredisapi

    assert "self.replyQueue.put(reply)" in inspect.getsource(txredisapi.BaseRedisProtocol.replyReceived)
    lost = inspect.getsource(txredisapi.BaseRedisProtocol.connectionLost)
    assert "while self.replyQueue.waiting:" in lost and "self.replyReceived(ConnectionError(" in lost
    assert "self.replyReceived(res)" in inspect.getsource(txredisapi.RedisProtocol.dataReceived)
    protocol = txredisapi.RedisProtocol(charset=None, convertNumbers=False)
    assert (protocol.pipelining, protocol.inMulti, protocol.replyQueue.waiting) == (False, False, [])
    reply = [[b"q:log", [[b"1-0", [b"s", b"1", b"c", b"{}"]]]], 5, b"", b"3.5", None]
    assert protocol.tryConvertData(reply) == reply
    with pytest.raises(txredisapi.ResponseError):
        protocol.handle_reply(txredisapi.ResponseError("NOSCRIPT"))


def test_autobahn_opens_a_connection_as_open_connection_does():
    """8. What succeedHandshake does after sending its 101 is what open_connection repeats, statement for statement."""
    source = inspect.getsource(WebSocketServerProtocol.succeedHandshake)
    after = source.split('self.sendData(response.encode("utf8"))', 1)[1]
    statements = [
        line.strip()
        for line in after.splitlines()
        if line.strip() and not line.strip().startswith(("#", "self.log.debug(", '"', ")"))
    ]
    assert statements == [
        "self.http_response_data = response",  # a handshake leftover: onOpen clears it
        "self.state = WebSocketProtocol.STATE_OPEN",
        "if self.openHandshakeTimeoutCall is not None:",
        "self.openHandshakeTimeoutCall.cancel()",
        "self.openHandshakeTimeoutCall = None",
        "self.inside_message = False",
        "self.current_frame = None",
        "if self.autoPingInterval:",
        "self.autoPingPendingCall = self.factory._batched_timer.call_later(",
        "self.autoPingInterval,",
        "self._sendAutoPing,",
        "if self.trackedTimings:",  # off: pushservice never tracks timings
        'self.trackedTimings.track("onOpen")',
        "self._onOpen()",
        "txaio.resolve(self.is_open, None)",
        "if len(self.data) > 0:",
        "self.consumeData()",
    ], statements
    before = source.split('self.sendData(response.encode("utf8"))', 1)[0]
    assert "self._perMessageCompress = PMCE" in before and "self.websocket_extensions_in_use = []" in before
    assert "self.websocket_protocol_in_use = protocol" in before


def _statements(function: Any) -> list[str]:
    """The statements of C{function}'s body, one a line, without comments, docstring and debug lines."""
    body = inspect.getsource(function).split(":\n", 1)[1]
    body = body.split('"""', 2)[2] if body.lstrip().startswith('"""') else body
    lines, in_debug = [], False
    for line in (raw.strip() for raw in body.splitlines()):
        if in_debug or line.startswith("self.log.debug("):
            in_debug = not line.endswith(")") or line == "self.log.debug("
            continue
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def test_autobahn_sets_a_connection_up_as_set_up_connection_does():
    """9. Autobahn's connection set-up is what set_up_connection repeats, statement for statement."""
    assert _statements(WebSocketAdapterProtocol.connectionMade) == [
        "self._transport_details = create_transport_details(",
        "self.transport, self.is_server",
        ")",
        "self._transport_details.channel_framing = (",
        "TransportDetails.CHANNEL_FRAMING_WEBSOCKET",
        ")",
        "self.peer = self._transport_details.peer",
        "try:",
        "self.transport.setTcpNoDelay(self.tcpNoDelay)",
        "except:  # don't touch this! does not work: AttributeError, OSError",
        "pass",
        "self._connectionMade()",
    ]
    assert _statements(WebSocketServerProtocol._connectionMade) == [
        "WebSocketProtocol._connectionMade(self)",
        "self.factory.countConnections += 1",
    ]
    assert _statements(WebSocketAdapterProtocol.dataReceived) == ["self._dataReceived(data)"]
    flags = [f"self.{name} = False" for name in _internals._CLEAR]
    unset = [f"self.{name} = None" for name in _internals._UNSET]
    base = _statements(WebSocketProtocol._connectionMade)
    assert base[:9] == [
        "configAttrLog = []",
        "for configAttr in self.CONFIG_ATTRS:",
        "if not hasattr(self, configAttr):",
        "setattr(self, configAttr, getattr(self.factory, configAttr))",
        "configAttrSource = self.factory.__class__.__name__",
        "else:",
        "configAttrSource = self.__class__.__name__",
        "configAttrLog.append(",
        "(configAttr, getattr(self, configAttr), configAttrSource)",
    ], base
    rest = base[10:]  # after the closing parenthesis of append
    assert (
        rest[:16]
        == [
            "self._perMessageCompress = None",
            "self.trackedTimings = None",
            "self.setTrackTimings(self.trackTimings)",
            "self.trafficStats = TrafficStats()",
            "if not self.factory.isServer and self.factory.proxy is not None:",
            "self.state = WebSocketProtocol.STATE_PROXY_CONNECTING",
            "else:",
            "self.state = WebSocketProtocol.STATE_CONNECTING",
            "self.send_state = WebSocketProtocol.SEND_STATE_GROUND",
            'self.data = b""',
            "self.send_queue = deque()",
            "self.triggered = False",
            "self.utf8validator = Utf8Validator()",  # made on first use instead (LAZY_UTF8_VALIDATOR)
            *flags[:2],
            "self.closedByMe = False",
        ]
    ), rest
    assigned = sorted(line for line in rest[16:] if line.startswith("self.") and line.endswith((" = False", " = None")))
    assert assigned == sorted([*flags[3:], *unset, "self.serverConnectionDropTimeoutCall = None"]), assigned
    assert "self.autoPingPendingSeq = 0" in rest
    assert rest[-5:] == [
        "if self.openHandshakeTimeout > 0:",
        "self.openHandshakeTimeoutCall = self.factory._batched_timer.call_later(",
        "self.openHandshakeTimeout,",
        "self.onOpenHandshakeTimeout,",
        ")",
    ], rest[-5:]


def test_set_up_connection_leaves_what_autobahn_leaves():
    """9. On a real TCP connection, set_up_connection leaves the attributes Autobahn's set-up leaves."""
    from twisted.internet import reactor

    from pushservice.websocket import PushProtocol

    class Factory(WebSocketServerFactory):
        protocol = WebSocketServerProtocol

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(2)
    states = []
    factory = Factory()
    try:
        for make in (WebSocketServerProtocol, PushProtocol):
            client = socket.create_connection(listening.getsockname())
            accepted, _ = listening.accept()
            count = factory.countConnections
            transport = tcp.Server(accepted, None, client.getsockname(), None, 1, reactor)
            protocol = make()
            protocol.factory = factory
            transport.protocol = protocol
            protocol.makeConnection(transport)
            state = {k: v for k, v in vars(protocol).items() if k not in ("transport", "_transport_details")}
            state["details"] = protocol._transport_details.marshal()
            state["utf8"] = type(protocol.utf8validator)
            state["count"] = factory.countConnections - count
            state["timer"] = type(state.pop("openHandshakeTimeoutCall"))
            protocol.openHandshakeTimeoutCall.cancel()
            states.append(state)
            transport.stopReading()
            accepted.close()
            client.close()
    finally:
        listening.close()
    autobahn, ours = states
    for d in (autobahn, ours):
        d["trafficStats"] = vars(d["trafficStats"])
        d["send_queue"] = list(d["send_queue"])
        d.pop("utf8validator", None)
        d["details"].pop("own_tid")
        d["state"] = d.pop("_state", d.get("state"))  # PushProtocol keeps Autobahn's state behind a property
        for k in ("is_open", "is_closed"):
            d[k] = type(d[k])
        assert d.pop("peer").startswith("tcp4:127.0.0.1:") and d["details"].pop("peer").startswith("tcp4:127.0.0.1:")
    assert ours == autobahn
    assert ours["count"] == 1 and ours["timer"] is not type(None) and ours["utf8"] is not type(None)
