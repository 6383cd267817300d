"""
The twisted.web Site: what a plain HTTP GET or HEAD gets (the demo page at
``/``, the browser client at ``/pushservice.js``, ``/healthz``, ``/metrics``),
and ``POST /publish`` (L{pushservice.publish}).
It never serves WebSocket, and sees only the requests pushservice.http let
through, one per connection.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from twisted.internet import defer
from twisted.web import pages, resource, server

from .bus import Bus
from .http import SERVER
from .metrics import Stats, render

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
    """The demo page at /, the children put on it, 404 for anything else."""

    def __init__(self, demo: Any) -> None:
        super().__init__()
        self._demo = demo

    def getChild(self, path: bytes, request: Any) -> Any:
        return self._demo if path == b"" else pages.notFound()


class _Health(resource.Resource):
    """
    200 while Redis answers a PING and the node's loops keep up, else 503 with
    why; always within a second (503 at once when the node knows why).
    """

    isLeaf = True

    def __init__(self, bus: Bus, stats: Stats) -> None:
        super().__init__()
        self._bus = bus
        self._stats = stats

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        why = self._bus.health()
        if why is not None:
            request.setResponseCode(503)
            return f"{why}\n".encode()
        finished = request.notifyFinish()
        gone: list[bool] = []
        finished.addErrback(lambda _: gone.append(True))

        def answer(ok: bool) -> None:
            if gone:
                return
            why = None if ok else "Redis did not answer a PING"
            why = why or self._bus.health()
            request.setResponseCode(200 if why is None else 503)
            request.write(b"ok\n" if why is None else f"{why}\n".encode())
            request.finish()

        self._bus.ping().addCallback(answer)
        return server.NOT_DONE_YET


class _Metrics(resource.Resource):
    """Prometheus text exposition."""

    isLeaf = True

    def __init__(self, bus: Bus, stats: Stats, shared: Callable[[], Awaitable[bytes]] | None) -> None:
        super().__init__()
        self._bus = bus
        self._stats = stats
        self._shared = shared

    def render_GET(self, request: Any) -> Any:
        finished = request.notifyFinish()
        gone: list[bool] = []
        finished.addErrback(lambda _: gone.append(True))

        async def text() -> bytes:
            await self._bus.sample_queue()
            return await self._shared() if self._shared is not None else render(self._stats)

        def answer(body: bytes) -> None:
            if gone:
                return
            request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
            request.write(body)
            request.finish()

        d = defer.ensureDeferred(text())
        d.addErrback(lambda _: render(self._stats))  # as before the queue was sampled: this node's own
        d.addCallback(answer)
        return server.NOT_DONE_YET


class _Request(server.Request):
    """A request whose response names no library version: C{Server: pushservice}, like every answer of the node."""

    def gotLength(self, length: int | None) -> None:
        # in memory, never a temporary file (disk I/O on the reactor): the router bounds every body
        self.content = io.BytesIO()

    def write(self, data: bytes) -> None:
        if not self.startedWriting:  # the headers go out with the first write (finish() writes b"" too)
            self.responseHeaders.setRawHeaders(b"server", [SERVER.encode()])
        super().write(data)


class _Site(server.Site):
    """twisted.web's Site without an access log line per request."""

    noisy = False
    requestFactory = _Request

    def log(self, request: Any) -> None:
        """No access log line per request: one line per notable event only."""


def make_site(
    bus: Bus,
    stats: Stats,
    demo: bool,
    publish: resource.Resource | None = None,
    metrics: Callable[[], Awaitable[bytes]] | None = None,
) -> server.Site:
    """
    The Site of plain HTTP: the demo page at /, the browser client, /healthz,
    /metrics (C{metrics}' text, else this node's), C{publish} at /publish.
    """
    page: Any = _Static("demo.html", b"text/html; charset=utf-8") if demo else pages.notFound()
    root = _Root(page)
    root.putChild(b"pushservice.js", _Static("pushservice.js", b"application/javascript; charset=utf-8"))
    root.putChild(b"healthz", _Health(bus, stats))
    root.putChild(b"metrics", _Metrics(bus, stats, metrics))
    if publish is not None:
        root.putChild(b"publish", publish)
    # no idle timer per connection: the router's sweep bounds every plain HTTP connection (--http-timeout)
    return _Site(root, timeout=None)
