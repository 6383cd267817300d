"""
The Autobahn side: the handshake, and the bridge between one WebSocket
connection and its L{Session} (wire protocol: see pushservice.wire).

Close codes the server uses: 1001 shutdown, 1007 invalid UTF-8, 1009 frame
over --max-frame-size, 3008 slow consumer, 4001 no auth frame in time,
4003 token expired.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from types import FunctionType
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflate
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import _internals, handshake
from .auth import AuthError, Grant, normalize_origin
from .deflate import offer_accept
from .httphead import RequestHead
from .limits import AddressLimits, TokenBucket
from .session import Node, Query, Session
from .wire import check_channel, parse_offset

__all__ = ["CLOSE_GOING_AWAY", "CLOSE_SLOW", "PushFactory", "PushProtocol"]

CLOSE_GOING_AWAY = 1001
CLOSE_SLOW = 3008

_OPEN = WebSocketProtocol.STATE_OPEN

_HANDSHAKE_LEFTOVERS = tuple(
    "http_request_data http_response_data http_headers http_status_line http_request_uri"
    " http_request_params http_request_path websocket_protocols websocket_extensions".split()
)


_NO_QUERY = Query()


def _query(params: dict[str, list[str]], max_channels: int) -> Query:
    """The connect URL's query. @raise ValueError: with what is wrong."""
    if not params:
        return _NO_QUERY  # most connections: no channels, since or auth in the URL
    channels = tuple(check_channel(c) for v in params.get("channels", []) for c in v.split(",") if c)
    if len(channels) > max_channels:
        raise ValueError(f"at most {max_channels} channels")
    since = parse_offset(params["since"][-1]) if params.get("since") else None
    auth = params.get("auth", [""])[-1]
    if auth not in ("", "0", "1"):
        raise ValueError("auth is 1 (an auth frame comes first) or 0")
    return Query(channels, since, auth == "1")


@implementer(IPushProducer)
class PushProtocol(WebSocketServerProtocol):
    """A client connection: Autobahn's callbacks to its session, its session's writes to the socket."""

    _log = Logger()  # Autobahn owns self.log
    factory: PushFactory
    transport: Any

    # Defaults live on the class: an instance only stores what changes (memory per connection).
    session: Session | None = None
    #: Set by the port's router: the client address whose slot this connection holds (None: not through it).
    client_address: str | None = None
    #: Set by the port's router: the request head it parsed (answered from in processHandshake)
    request_head: RequestHead | None = None
    _bucket: TokenBucket | None = None
    _grant: Grant | None = None
    _query_seen: Query = _NO_QUERY
    _state: int = WebSocketProtocol.STATE_CLOSED

    # Autobahn's set-up and reads without formatting its debug lines; a UTF-8 validator when used (_internals 9.)
    connectionMade = _internals.set_up_connection
    dataReceived = WebSocketProtocol._dataReceived
    utf8validator = _internals.LAZY_UTF8_VALIDATOR

    # -- handshake ---------------------------------------------------------

    def onConnect(self, request: Any) -> None:
        self.admit(request.headers.get("origin"), request.params)

    def processHandshake(self) -> None:
        # a plain upgrade is answered from the head the router parsed; the rest (errors too) by Autobahn
        head, self.request_head = self.request_head, None
        if head is None or not handshake.answer(self, head):
            super().processHandshake()

    def admit(self, origin: str | None, params: dict[str, list[str]]) -> None:
        """Check the upgrade's origin and query (its token, channels): @raise ConnectionDeny: refused."""
        f = self.factory
        if origin is not None and not f.origin_allowed(origin):
            self._log.info("refused {peer}: origin {origin} not allowed", peer=self.peer, origin=origin)
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "origin not allowed")
        try:
            query = _query(params, f.node.config.max_subscriptions)
        except ValueError as e:
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, str(e)) from None
        token = params.get("token", [None])[-1]
        if token is not None:
            try:
                self._grant = f.node.verify(token)
            except AuthError as e:
                self._log.info("refused {peer}: {why}", peer=self.peer, why=e)
                raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "invalid token") from None
        # without a token yet (required, or announced with auth=1) the channels are checked with the auth frame
        if self._grant is not None or not (f.node.config.require_token or query.auth_frame):
            for channel in query.channels:
                if not f.node.policy.may_subscribe(self._grant, channel):
                    raise ConnectionDeny(ConnectionDeny.FORBIDDEN, f"channel {channel!r} not granted")
        self._query_seen = query

    def onOpen(self) -> None:
        f = self.factory
        # where twisted.web handed the connection over, its channel is still the registered producer
        self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)
        f.node.stats.connections += 1
        f.node.stats.connections_total += 1
        # the handshake's request and response stay on the protocol for its life: ~1 KB each
        for name in _HANDSHAKE_LEFTOVERS:
            setattr(self, name, None)
        f.open_protocols.add(self)
        config = f.node.config
        address = self.client_address
        bucket = self._bucket = (
            f.addresses.frame_bucket(address)
            if address is not None
            else TokenBucket(f.node.clock, config.client_rate, config.client_burst)
        )
        deflate = any(isinstance(e, PerMessageDeflate) for e in self.websocket_extensions_in_use)
        self.session = Session(f.node, self, self._query_seen, self._grant, str(self.peer), bucket, deflate)
        self.session.open()

    # -- frames from the client ---------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        _internals.release_inflater(self)  # ~40 KB a connection otherwise keeps after its first compressed frame
        if self.session is not None:
            self.session.received(payload, isBinary)

    # -- Sink: the session's writes ------------------------------------------

    def send_now(self, data: bytes | memoryview) -> int:
        if self.state != _OPEN:
            return len(data)  # closing: nothing more goes out
        return _internals.send_now(self.transport, data)

    def direct_socket(self) -> Any:
        return _internals.direct_socket(self.transport) if self.state == _OPEN else None

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Autobahn's own writes (handshake response, replies, pings, close) go straight to
        # the socket when nothing waits before them, like the fan-out's: no write registration
        if not sync and not chopsize and not self.send_queue:
            sent = _internals.send_now(self.transport, data)
            if sent == len(data):
                return
            data = data[sent:]
        if self.session is not None:
            self.session.outbox.direct = None  # bytes wait in the transport: the fan-out may not pass them
        super().sendData(data, sync, chopsize)

    @property  # type: ignore[override]
    def state(self) -> int:
        """Autobahn's connection state; leaving OPEN stops the fan-out writing to the socket itself."""
        return self._state

    @state.setter
    def state(self, state: int) -> None:
        self._state = state
        if state != _OPEN and self.session is not None:
            self.session.outbox.direct = None

    def queued(self) -> int:
        return _internals.transport_queued(self.transport)

    def write(self, data: bytes) -> None:
        if self.state == _OPEN:
            self.transport.write(data)

    def drop_slow(self, why: str) -> None:
        self.factory.node.stats.slow_disconnects += 1
        self._log.warn("dropping slow client {peer}: {why}", peer=self.peer, why=why)
        if self.state == _OPEN:
            self.sendClose(CLOSE_SLOW, "slow consumer")
        self.dropConnection(abort=True)

    def close(self, code: int, reason: str) -> None:
        if self.state == _OPEN:
            self.sendClose(code, reason)

    # -- IPushProducer: Twisted says when the client's socket buffer is full ----

    def pauseProducing(self) -> None:
        if self.session is not None:
            self.session.outbox.pause()

    def resumeProducing(self) -> None:
        if self.session is not None:
            self.session.outbox.resume()

    def stopProducing(self) -> None:
        pass

    # -- end -----------------------------------------------------------------

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            session.closed()
            self.factory.node.stats.connections -= 1
            self.factory.open_protocols.discard(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)  # onClose runs in here
        # Twisted calls this once per connection, opened or not (refused, 503, closed mid-handshake)
        address, self.client_address = self.client_address, None
        if address is not None:
            if self._bucket is not None:
                self.factory.addresses.save_frame_bucket(address, self._bucket)
            self.factory.addresses.release(address)

    def sendHttpErrorResponse(self, code: int, reason: str, responseHeaders: Any = None) -> None:
        # Autobahn's refusals (403, 503, ...) name no server; every answer of the node does
        headers = [("Server", self.factory.server), *(responseHeaders or ())]
        super().sendHttpErrorResponse(code, reason, headers)

    def close_for_shutdown(self) -> None:
        if self.state == _OPEN:
            self.sendCloseFrame(code=CLOSE_GOING_AWAY, reasonUtf8=b"server shutting down", isReply=False)


class PushFactory(WebSocketServerFactory):
    """Shared state of every connection on this node, and Autobahn's options, set once."""

    protocol = PushProtocol  # type: ignore[assignment]

    def __init__(self, node: Node, addresses: AddressLimits | None = None) -> None:
        super().__init__(server="pushservice")
        config = node.config
        self.node = node
        #: per-address slots and frame budgets, shared with the port's router
        self.addresses = addresses if addresses is not None else AddressLimits(node.clock, config)
        self.open_protocols: set[PushProtocol] = set()
        self._origins = tuple(normalize_origin(o) for o in config.allowed_origins)
        # setProtocolOptions resets allowNullOrigin each call: one call, everything spelled out
        self.setProtocolOptions(
            allowedOrigins=["*"],  # checked in onConnect, to answer 403 (Autobahn says 400)
            allowNullOrigin=True,
            maxFramePayloadSize=config.max_frame_size,
            maxMessagePayloadSize=config.max_frame_size,
            autoPingInterval=config.ping_interval,
            autoPingTimeout=config.ping_timeout,
            # 0: the port's router hands a connection over with its whole request head, and
            # Autobahn answers it at once; the router's --handshake-timeout covers the head
            openHandshakeTimeout=0,
            closeHandshakeTimeout=1,
            maxConnections=config.max_connections,
            trustXForwardedFor=config.trusted_proxies,
            # False: a protocol error (frame over the limit, bad UTF-8) sends its close frame
            # (1009, 1007, ...) before the drop, as SPEC promises; closeHandshakeTimeout bounds the wait
            failByDrop=False,
            # None (--no-compression): Autobahn's default, which declines every offer
            perMessageCompressionAccept=offer_accept(config.max_frame_size) if config.compression else None,
        )
        # Autobahn copies ~40 options from the factory onto every connection (and
        # pretty-prints them for a debug line): put them on a class made once instead.
        # staticmethod: a function option (perMessageCompressionAccept) set on a class would
        # become a method and get the protocol as an extra argument (a browser's handshake hangs)
        options = {
            name: staticmethod(value) if isinstance(value, FunctionType) else value
            for name in _internals.protocol_option_names(PushProtocol)
            for value in (getattr(self, name),)
        }
        self.protocol = type("PushProtocol", (PushProtocol,), {**options, "CONFIG_ATTRS": ()})  # type: ignore[assignment]

    def origin_allowed(self, origin: str) -> bool:
        normalized = normalize_origin(origin)
        return any(fnmatchcase(normalized, pattern) for pattern in self._origins)

    def connections(self) -> list[PushProtocol]:
        """Every open connection, authenticated or not."""
        return list(self.open_protocols)
