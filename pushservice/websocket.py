"""
The Autobahn side: one protocol instance per client, translating frames to
hub and bus calls (wire protocol: see pushservice.wire).

Close codes the server uses: 1001 shutdown, 1009 frame over --max-frame-size,
3008 slow consumer, 4001 no auth frame in time, 4003 token expired.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from types import FunctionType
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import PreparedMessage, WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from .auth import AuthError, Grant, Policy, TokenVerifier, normalize_origin
from .bus import Bus
from .config import Config
from .hub import Hub
from .metrics import Stats
from .wire import (
    Auth,
    Offset,
    Publish,
    Subscribe,
    Unsubscribe,
    WireError,
    check_channel,
    envelope,
    error_frame,
    parse_offset,
    parse_request,
    peek_id,
    reply_frame,
)

__all__ = ["PushFactory", "PushProtocol", "frame"]

_OPEN = WebSocketProtocol.STATE_OPEN


_HANDSHAKE_LEFTOVERS = (
    "http_request_data",
    "http_response_data",
    "http_headers",
    "http_status_line",
    "http_request_uri",
    "http_request_params",
    "http_request_path",
    "websocket_protocols",
    "websocket_extensions",
)


def frame(payload: bytes) -> bytes:
    """One unmasked, uncompressed text frame, built once and sendable to any connection."""
    return PreparedMessage(payload, False, False, True).payloadHybi  # type: ignore[no-any-return]


@implementer(IPushProducer)
class PushProtocol(WebSocketServerProtocol):
    """A client connection; also the push producer Twisted pauses when the client stops reading."""

    _log = Logger()  # Autobahn owns self.log
    factory: PushFactory
    transport: Any

    # Defaults live on the class: an instance only stores what changes (memory per connection).
    user: str | None = None
    _grant: Grant | None = None
    _query: tuple[tuple[str, ...], Offset | None] = ((), None)
    _opened = False
    _started = False
    _paused_at: float | None = None
    _paused_bytes = 0
    _tokens = 0.0
    _refilled = 0.0
    _timers: tuple[Any, ...] = ()
    _socket: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.channels: set[str] = set()

    # -- handshake ---------------------------------------------------------

    def onConnect(self, request: Any) -> None:
        f = self.factory
        origin = request.headers.get("origin")
        if origin is not None and not f.origin_allowed(origin):
            self._log.info("refused {peer}: origin {origin} not allowed", peer=request.peer, origin=origin)
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "origin not allowed")
        params = request.params
        try:
            channels = [check_channel(c) for v in params.get("channels", []) for c in v.split(",") if c]
            since = parse_offset(params["since"][-1]) if params.get("since") else None
        except ValueError as e:
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, str(e)) from None
        if len(channels) > f.config.max_subscriptions:
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "too many channels")
        token = params.get("token", [None])[-1]
        if token is not None:
            try:
                self._grant = f.verify(token)
            except AuthError as e:
                self._log.info("refused {peer}: {why}", peer=request.peer, why=e)
                raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "invalid token") from None
        if self._grant is not None or not f.config.require_token:
            for channel in channels:
                if not f.policy.may_subscribe(self._grant, channel):
                    raise ConnectionDeny(ConnectionDeny.FORBIDDEN, f"channel {channel!r} not granted")
        self._query = (tuple(channels), since)

    def onOpen(self) -> None:
        f = self.factory
        self._opened = True
        # where twisted.web handed the connection over, its channel is still the registered producer
        self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)
        if isinstance(self.transport, tcp.Connection):
            self._socket = self.transport.socket
        self._refilled = f.reactor.seconds()
        self._tokens = float(f.config.client_burst)
        f.stats.connections += 1
        f.stats.connections_total += 1
        # the handshake's request and response stay on the protocol for its life: ~1 KB each
        for name in _HANDSHAKE_LEFTOVERS:
            setattr(self, name, None)
        f.open_protocols.add(self)
        if self._grant is not None:
            self._authenticated(self._grant)
        elif f.config.require_token:
            self._later(f.config.auth_timeout, self._auth_deadline)
        else:
            self._start()

    def _start(self) -> None:
        """Join the hub (authenticated, or no token needed), subscribe the query's channels, replay its ``since``."""
        self._started = True
        channels, since = self._query
        self.factory.hub.add(self)

        def start(_: object) -> None:
            if self.state != _OPEN:
                return
            hub = self.factory.hub
            for channel in channels:
                hub.subscribe(self, channel)
            if since is not None:
                _, replay = hub.replay(self, since, channels, broadcasts=True)
                if replay:
                    self.push(replay)

        self.factory.hub.when_ready().addCallback(start)

    # -- frames from the client ---------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        f = self.factory
        if not self._take_token():
            self._error(
                "rate_limited", "too many frames: slow down", peek_id(payload, isBinary, f.config.max_message_size)
            )
            return
        try:
            request = parse_request(payload, isBinary, f.config.max_message_size)
            if self._grant is None and f.config.require_token and not isinstance(request, Auth):
                raise WireError("forbidden", 'authenticate first: send {"type":"auth","token":...}', request.id)
            if isinstance(request, Publish):
                self._publish(request)
            elif isinstance(request, Subscribe):
                self._subscribe(request)
            elif isinstance(request, Unsubscribe):
                self._unsubscribe(request)
            else:
                self._auth(request)
        except WireError as e:
            self._error(e.code, e.message, e.request_id)

    def _publish(self, request: Publish) -> None:
        f = self.factory
        if not f.policy.may_publish(self._grant, request.channel):
            where = "broadcast" if request.channel is None else f"publish on {request.channel!r}"
            raise WireError("forbidden", f"not allowed to {where}", request.id)
        d = f.bus.publish(envelope(request.content, request.channel))

        def acked(_: object) -> None:
            f.stats.client_publishes += 1
            self._reply("ack", request.id)

        def failed(failure: Any) -> None:
            self._error("unavailable", "Redis did not confirm the message; it may not be delivered", request.id)

        d.addCallbacks(acked, failed)

    def _subscribe(self, request: Subscribe) -> None:
        f = self.factory
        if not f.policy.may_subscribe(self._grant, request.channel):
            raise WireError("forbidden", f"channel {request.channel!r} not granted", request.id)
        if request.channel not in self.channels and len(self.channels) >= f.config.max_subscriptions:
            raise WireError("bad_request", f"at most {f.config.max_subscriptions} subscriptions", request.id)

        # join now (counts against the limit at once); live messages only flow once the hub is ready
        f.hub.subscribe(self, request.channel)

        def subscribed(_: object) -> None:
            if self.state != _OPEN:
                return
            if request.since is None:
                self._reply("subscribed", request.id, channel=request.channel)
                return
            recovered, replay = f.hub.replay(self, request.since, [request.channel], broadcasts=False)
            self._reply("subscribed", request.id, channel=request.channel, recovered=recovered)
            if replay:
                self.push(replay)

        f.hub.when_ready().addCallback(subscribed)

    def _unsubscribe(self, request: Unsubscribe) -> None:
        self.factory.hub.unsubscribe(self, request.channel)
        # through when_ready too, so replies keep the order of the requests
        self.factory.hub.when_ready().addCallback(
            lambda _: self._reply("unsubscribed", request.id, channel=request.channel)
        )

    def _auth(self, request: Auth) -> None:
        if self._grant is not None:
            raise WireError("bad_request", "already authenticated", request.id)
        try:
            grant = self.factory.verify(request.token)
        except AuthError as e:
            self._log.info("auth frame refused for {peer}: {why}", peer=self.peer, why=e)
            raise WireError("forbidden", str(e), request.id) from None
        channels, _ = self._query
        for channel in channels:
            if not self.factory.policy.may_subscribe(grant, channel):
                raise WireError("forbidden", f"channel {channel!r} not granted", request.id)
        self._reply("ack", request.id)
        self._authenticated(grant)

    def _authenticated(self, grant: Grant) -> None:
        f = self.factory
        self._grant = grant
        f.hub.set_user(self, grant.user)
        self._later(max(0.0, grant.expires - f.reactor.seconds()), self._expired)
        if not self._started:
            self._start()

    def _auth_deadline(self) -> None:
        if self._grant is None and self.state == _OPEN:
            self.sendClose(4001, "authentication required")

    def _expired(self) -> None:
        if self.state == _OPEN:
            self.sendClose(4003, "token expired")

    def _take_token(self) -> bool:
        config = self.factory.config
        now = self.factory.reactor.seconds()
        self._tokens = min(float(config.client_burst), self._tokens + (now - self._refilled) * config.client_rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    # -- frames to the client ----------------------------------------------

    def push(self, data: bytes) -> None:
        """Write framed bytes; drop the client instead if it stopped reading long or much enough."""
        if self.state != _OPEN:
            return
        if self._paused_at is not None:
            config = self.factory.config
            self._paused_bytes += len(data)
            if (
                self._paused_bytes > config.slow_client_bytes
                or self.factory.reactor.seconds() - self._paused_at > config.slow_client_seconds
            ):
                self._drop_slow()
                return
        transport = self.transport
        if (
            self._socket is not None
            and not transport._tempDataBuffer
            and transport.offset == len(transport.dataBuffer)
            and transport.connected
        ):
            # Nothing is queued: send now instead of through the reactor's
            # register-for-write, send, unregister round (three syscalls).
            try:
                sent = self._socket.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # let Twisted find and report the broken connection
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    def _drop_slow(self) -> None:
        self.factory.stats.slow_disconnects += 1
        self._log.warn("dropping slow client {peer}: {n} bytes waiting", peer=self.peer, n=self._paused_bytes)
        self.sendClose(3008, "slow consumer")
        self.dropConnection(abort=True)

    def _reply(self, kind: str, request_id: Any, **fields: Any) -> None:
        self.push(frame(reply_frame(kind, request_id, **fields)))

    def _error(self, code: str, message: str, request_id: Any) -> None:
        self.factory.stats.errors[code] += 1
        self.push(frame(error_frame(code, message, request_id)))

    # -- IPushProducer: Twisted tells us when the client's socket buffer is full

    def pauseProducing(self) -> None:
        self._paused_at = self.factory.reactor.seconds()
        self._paused_bytes = 0

    def resumeProducing(self) -> None:
        self._paused_at = None

    def stopProducing(self) -> None:
        pass

    # -- end -----------------------------------------------------------------

    def _later(self, seconds: float, call: Any) -> None:
        self._timers += (self.factory.reactor.callLater(seconds, call),)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        if self._opened:
            self._opened = False
            self.factory.stats.connections -= 1
            self.factory.open_protocols.discard(self)
            self.factory.hub.remove(self)

    def close_for_shutdown(self) -> None:
        if self.state == _OPEN:
            self.sendCloseFrame(code=1001, reasonUtf8=b"server shutting down", isReply=False)


class PushFactory(WebSocketServerFactory):
    """Shared state of every connection on this node, and Autobahn's options, set once."""

    protocol = PushProtocol  # type: ignore[assignment]

    def __init__(self, reactor: Any, config: Config, hub: Hub, bus: Bus, stats: Stats) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.hub = hub
        self.bus = bus
        self.stats = stats
        self.policy = Policy(config.client_publish)
        self.open_protocols: set[PushProtocol] = set()
        self._verifier = TokenVerifier.from_file(config.token_secret_file) if config.token_secret_file else None
        self._origins = tuple(normalize_origin(o) for o in config.allowed_origins)
        # setProtocolOptions resets allowNullOrigin each call: one call, everything spelled out
        self.setProtocolOptions(
            allowedOrigins=["*"],  # checked in onConnect, to answer 403 (Autobahn says 400)
            allowNullOrigin=True,
            maxFramePayloadSize=config.max_frame_size,
            maxMessagePayloadSize=config.max_frame_size,
            autoPingInterval=config.ping_interval,
            autoPingTimeout=config.ping_timeout,
            openHandshakeTimeout=config.handshake_timeout,
            closeHandshakeTimeout=1,
            maxConnections=config.max_connections,
            trustXForwardedFor=config.trusted_proxies,
            # False: a protocol error (frame over the limit, bad UTF-8) sends its close frame
            # (1009, 1007, ...) before the drop, as SPEC promises; closeHandshakeTimeout bounds the wait
            failByDrop=False,
        )
        # Autobahn copies ~40 options from the factory onto every connection
        # (and pretty-prints them for a debug line): a third of a handshake's
        # CPU and a per-connection dict. Give them to a class made once instead.
        # staticmethod: a function option (perMessageCompressionAccept) set on a class would
        # become a method and get the protocol as an extra argument (a browser's handshake hangs)
        options = {
            name: staticmethod(value) if isinstance(value, FunctionType) else value
            for name in PushProtocol.CONFIG_ATTRS
            for value in (getattr(self, name),)
        }
        self.protocol = type("PushProtocol", (PushProtocol,), {**options, "CONFIG_ATTRS": ()})  # type: ignore[assignment]

    def origin_allowed(self, origin: str) -> bool:
        normalized = normalize_origin(origin)
        return any(fnmatchcase(normalized, pattern) for pattern in self._origins)

    def verify(self, token: str) -> Grant:
        if self._verifier is None:
            raise AuthError("tokens are not enabled on this server")
        return self._verifier.verify(token)

    def connections(self) -> list[PushProtocol]:
        """Every open connection, authenticated or not."""
        return list(self.open_protocols)
