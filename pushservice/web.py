"""
The twisted.web Site on every listening port: WebSocket at ``/`` (requests
that ask to upgrade), the demo page at ``/`` (those that do not), the
browser client at ``/pushservice.js``, ``/healthz`` and ``/metrics``.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet import defer, protocol, task
from twisted.protocols.policies import ProtocolWrapper
from twisted.web import pages, resource, server

from .bus import Bus
from .metrics import Stats, render
from .websocket import PushFactory

__all__ = ["make_port_factory"]


class _Static(resource.Resource):
    """A file of the package, read once at start."""

    isLeaf = True

    def __init__(self, name: str, content_type: bytes) -> None:
        super().__init__()
        self._data = resources.files("pushservice").joinpath("static").joinpath(name).read_bytes()
        self._type = content_type

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", self._type)
        request.setHeader(b"cache-control", b"no-cache")
        return self._data

    render_HEAD = render_GET


class _Root(resource.Resource):
    def __init__(self, websocket: Any, demo: Any) -> None:
        super().__init__()
        self._websocket = websocket
        self._demo = demo

    def getChild(self, path: bytes, request: Any) -> Any:
        if path == b"":
            upgrade = request.getHeader(b"upgrade") or b""
            return self._websocket if upgrade.lower() == b"websocket" else self._demo
        return pages.notFound()


class _Health(resource.Resource):
    """200 while Redis answers a PING and the node's Redis loops are connected, else 503."""

    isLeaf = True

    def __init__(self, bus: Bus, stats: Stats) -> None:
        super().__init__()
        self._bus = bus
        self._stats = stats

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        finished = request.notifyFinish()
        gone: list[bool] = []
        finished.addErrback(lambda _: gone.append(True))

        def answer(ok: bool) -> None:
            if gone:
                return
            ok = ok and self._stats.redis_up
            request.setResponseCode(200 if ok else 503)
            request.write(b"ok\n" if ok else b"redis unavailable\n")
            request.finish()

        self._bus.ping().addCallback(answer)
        return server.NOT_DONE_YET


class _Metrics(resource.Resource):
    """Prometheus text exposition."""

    isLeaf = True

    def __init__(self, bus: Bus, stats: Stats) -> None:
        super().__init__()
        self._bus = bus
        self._stats = stats

    def render_GET(self, request: Any) -> Any:
        finished = request.notifyFinish()
        gone: list[bool] = []
        finished.addErrback(lambda _: gone.append(True))

        def answer(_: object) -> None:
            if gone:
                return
            request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
            request.write(render(self._stats))
            request.finish()

        defer.ensureDeferred(self._bus.sample_queue()).addBoth(answer)
        return server.NOT_DONE_YET


class _Site(server.Site):
    noisy = False

    def log(self, request: Any) -> None:
        """No access log line per request: one line per notable event only."""


# "GET /" or "GET /?query" with an "Upgrade: websocket" header, in a lower-cased request head
_WEBSOCKET_HEAD = re.compile(rb"\Aget /(?:\?\S*)? http/1\.1\r\n(?:.*\r\n)*?upgrade:[ \t]*websocket[ \t]*(?:\r\n|\Z)")
_MAX_HEAD = 16384


class _FirstRequest(protocol.Protocol):
    """
    Reads a connection's request head, then hands the connection over:
    WebSocket upgrades of ``/`` straight to Autobahn (which parses the head
    itself), anything else to twisted.web. Saves WebSocket handshakes
    twisted.web's parse and Autobahn's re-parse of a replayed request, and
    bounds the whole head, not only the gaps between its bytes, by the
    handshake timeout.
    """

    transport: Any

    def __init__(self, port: _PortFactory) -> None:
        self._port = port
        self._head = b""

    def connectionMade(self) -> None:
        self._port.waiting[self] = self._port.reactor.seconds()

    def dataReceived(self, data: bytes) -> None:
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0 and len(self._head) <= _MAX_HEAD:
            return
        self._port.waiting.pop(self, None)
        upgrade = end >= 0 and _WEBSOCKET_HEAD.match(self._head[: end + 2].lower())
        factory = self._port.websocket if upgrade else self._port.site
        successor: Any = factory.buildProtocol(self.transport.getPeer())
        transport = self.transport
        if isinstance(transport, ProtocolWrapper):  # TLS: the wrapper feeds its wrapped protocol
            transport.wrappedProtocol = successor
        else:
            transport.protocol = successor
        successor.makeConnection(transport)
        successor.dataReceived(self._head)

    def connectionLost(self, reason: Any = None) -> None:
        self._port.waiting.pop(self, None)


class _PortFactory(protocol.ServerFactory):
    """What every --listen endpoint serves: WebSocket and HTTP on one port."""

    noisy = False

    def __init__(self, reactor: Any, websocket: PushFactory, site: server.Site, timeout: float) -> None:
        self.reactor = reactor
        self.websocket = websocket
        self.site = site
        self.timeout = timeout
        #: Connections still sending their request head, and since when.
        self.waiting: dict[_FirstRequest, float] = {}
        # one sweep a fraction of the timeout apart, not a timer per connection (handshake CPU)
        self._sweeper = task.LoopingCall(self._sweep)
        self._sweeper.clock = reactor

    def buildProtocol(self, addr: Any) -> _FirstRequest:
        return _FirstRequest(self)

    def _sweep(self) -> None:
        expired = self.reactor.seconds() - self.timeout
        late = []
        for head, since in self.waiting.items():  # oldest first: insertion order
            if since > expired:
                break
            late.append(head)
        for head in late:
            del self.waiting[head]
            head.transport.abortConnection()

    def startFactory(self) -> None:
        self.site.doStart()
        self._sweeper.start(min(1.0, self.timeout / 4), now=False)

    def stopFactory(self) -> None:
        self._sweeper.stop()
        self.site.doStop()


def make_port_factory(
    reactor: Any, factory: PushFactory, bus: Bus, stats: Stats, demo: bool, timeout: float
) -> _PortFactory:
    """The factory to listen with: WebSocket at ``/``, the demo page, the client, /healthz, /metrics."""
    page: Any = _Static("demo.html", b"text/html; charset=utf-8") if demo else pages.notFound()
    root = _Root(WebSocketResource(factory), page)
    root.putChild(b"pushservice.js", _Static("pushservice.js", b"application/javascript; charset=utf-8"))
    root.putChild(b"healthz", _Health(bus, stats))
    root.putChild(b"metrics", _Metrics(bus, stats))
    # keep-alive HTTP clients (scrapers) may idle a while; the head itself is bounded above
    site = _Site(root, timeout=60)
    return _PortFactory(reactor, factory, site, timeout)
