"""
The twisted.web Site on every listening port: WebSocket at ``/`` (requests
that ask to upgrade), the demo page at ``/`` (those that do not), the
browser client at ``/pushservice.js``, ``/healthz`` and ``/metrics``.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet import defer
from twisted.web import pages, resource, server

from .bus import Bus
from .metrics import Stats, render
from .websocket import PushFactory

__all__ = ["make_site"]


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
    """200 while Redis answers a PING, else 503."""

    isLeaf = True

    def __init__(self, bus: Bus) -> None:
        super().__init__()
        self._bus = bus

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        finished = request.notifyFinish()
        gone: list[bool] = []
        finished.addErrback(lambda _: gone.append(True))

        def answer(ok: bool) -> None:
            if gone:
                return
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


def make_site(factory: PushFactory, bus: Bus, stats: Stats, demo: bool, timeout: float) -> server.Site:
    """The Site serving WebSocket and HTTP on one port."""
    page: Any = _Static("demo.html", b"text/html; charset=utf-8") if demo else pages.notFound()
    root = _Root(WebSocketResource(factory), page)
    root.putChild(b"pushservice.js", _Static("pushservice.js", b"application/javascript; charset=utf-8"))
    root.putChild(b"healthz", _Health(bus))
    root.putChild(b"metrics", _Metrics(bus, stats))
    site = _Site(root, timeout=timeout)
    return site
