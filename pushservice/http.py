"""
Every connection on every --listen endpoint starts in a L{Router}: it reads
the request head, parses it strictly (L{pushservice.httphead}), charges the
client address (L{AddressLimits}), then answers it itself or hands the
connection over: a WebSocket upgrade of ``/`` straight to Autobahn's
factory (which parses the head again, as it must, but twisted.web never
does: ~3x the handshakes a second of a WebSocketResource), a GET of
``/events`` to an event stream (L{pushservice.streams}), a POST of
``/publish`` (with its bounded body) and any other GET or HEAD to
twisted.web for that one request.

Invariants:
  - One rule makes a request a WebSocket upgrade (C{RequestHead.wants_websocket}),
    applied here only; twisted.web never serves WebSocket.
  - Only POST /publish has a body: with a Content-Length of at most
    --max-publish-body (else 413, unread; chunked: 411), and only where
    tokens are configured (else 404). Otherwise only GET and HEAD are
    served, and a request that carries a body is refused on its head (413;
    400 for an upgrade).
  - A connection still sending its head, or served as plain HTTP (refusals
    too), counts against --max-http-connections; beyond it a new connection
    is aborted before anything is read.
  - Deadlines without a timer per connection: one sweep aborts heads older
    than --handshake-timeout and plain HTTP connections older than
    --http-timeout (counted from accept), whatever they send. An event
    stream, once its head is accepted, is on neither deadline (like a
    WebSocket: the slow-client policy bounds it).
  - An admitted head holds one slot of its address until its connection
    closes; whoever owns the connection then (the router, L{_OneRequestChannel},
    PushProtocol or an EventStream) releases it, once, in connectionLost.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet import protocol, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import HTTPChannel

from .config import Config
from .limits import AddressLimits
from .router import SERVER, Router
from .streams import EventStreams
from .websocket import PushFactory

__all__ = ["SERVER", "PortFactory"]

#: Seconds between two log lines saying --max-http-connections is reached.
_FULL_LOG_INTERVAL = 60.0


class _OneRequestChannel(HTTPChannel):
    """
    twisted.web's channel for one request per connection, so that every
    request passes the router's checks: the response says Connection: close.
    """

    port: PortFactory | None = None
    client_address: str | None = None

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        return False

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        super().connectionLost(reason)
        if self.port is not None:
            self.port.closed(self)


class _Closed(protocol.Protocol):
    """A connection over --max-http-connections: aborted before anything is read."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


class PortFactory(protocol.ServerFactory):
    """
    What every --listen endpoint serves: WebSocket and HTTP on one port (one
    instance for all endpoints of a node, so its bounds are the node's).

    @ivar waiting: connections still sending their request head, and since when.
    @ivar serving: plain HTTP connections past their head, and since when they were accepted.
    """

    noisy = False
    _log = Logger()

    def __init__(
        self, reactor: Any, websocket: PushFactory, site: server.Site, limits: AddressLimits, config: Config
    ) -> None:
        """
        @param site: serves plain HTTP; its channels become L{_OneRequestChannel}s.
        """
        self.reactor = reactor
        self.websocket = websocket
        self.stats = websocket.node.stats
        # one request per connection, so that every request passes the router's checks
        site.protocol = _OneRequestChannel  # type: ignore[assignment]
        self.site = site
        self.limits = limits
        #: the node's event streams (GET /events), handed their connections by the router
        self.streams = EventStreams(websocket.node, websocket.origin_allowed, limits)
        #: whether POST /publish is served: only where tokens can be checked
        self.publishing = config.token_secret_file is not None
        self.max_publish_body = config.max_publish_body
        self._handshake_timeout = config.handshake_timeout
        self._http_timeout = config.http_timeout
        self._max_http = config.max_http_connections
        self.waiting: dict[Router, float] = {}
        self.serving: dict[Any, float] = {}
        self._full_logged = -math.inf
        # one sweep a fraction of the timeouts apart, not a timer per connection (handshake CPU)
        self._sweeper = task.LoopingCall(self._sweep)
        self._sweeper.clock = reactor

    def http_connections(self) -> int:
        """Connections counted against --max-http-connections now."""
        return len(self.waiting) + len(self.serving)

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        if len(self.waiting) + len(self.serving) < self._max_http:
            return Router(self)
        self.stats.http_refusals["closed"] += 1
        now = self.reactor.seconds()
        if now - self._full_logged >= _FULL_LOG_INTERVAL:
            self._full_logged = now
            self._log.warn("--max-http-connections ({n}) reached: closing new connections at once", n=self._max_http)
        return _Closed()

    def closed(self, connection: Any) -> None:
        """C{connection} (a router or an HTTP channel) is gone: uncount it and release its address."""
        self.waiting.pop(connection, None)
        self.serving.pop(connection, None)
        address, connection.client_address = connection.client_address, None
        if address is not None:
            self.limits.release(address)

    def _sweep(self) -> None:
        now = self.reactor.seconds()
        late: list[Any] = []
        expired = now - self._handshake_timeout
        for head, since in self.waiting.items():  # oldest first: insertion order
            if since > expired:
                break
            late.append(head)
        expired = now - self._http_timeout
        # all of them: they joined in head-end order, not accept order (at most --max-http-connections)
        late.extend(c for c, since in self.serving.items() if since <= expired)
        for connection in late:
            self.waiting.pop(connection, None)
            self.serving.pop(connection, None)
            connection.transport.abortConnection()

    def startFactory(self) -> None:
        self.site.doStart()
        self.streams.start()
        self._sweeper.start(min(1.0, self._handshake_timeout / 4, self._http_timeout / 4), now=False)

    def stopFactory(self) -> None:
        self._sweeper.stop()
        self.streams.stop()
        # nothing sweeps them any more
        for connection in [*self.waiting, *self.serving]:
            connection.transport.abortConnection()
        self.waiting.clear()
        self.serving.clear()
        self.site.doStop()
