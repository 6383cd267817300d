"""
Every connection on every --listen endpoint starts in a L{_Router}: it reads
the request head, parses it strictly (L{pushservice.httphead}), charges the
client address (L{AddressLimits}), then answers it itself or hands the
connection over: a WebSocket upgrade of ``/`` straight to Autobahn's
factory (which parses the head again, as it must, but twisted.web never
does: ~3x the handshakes a second of a WebSocketResource), any other GET or
HEAD to twisted.web for that one request.

Invariants:
  - One rule makes a request a WebSocket upgrade (C{RequestHead.wants_websocket}),
    applied here only; twisted.web never serves WebSocket.
  - Nothing reads a request body: only GET and HEAD are served, and a request
    that carries a body is refused on its head (413; 400 for an upgrade).
  - A connection still sending its head, or served as plain HTTP (refusals
    too), counts against --max-http-connections; beyond it a new connection
    is aborted before anything is read.
  - Deadlines without a timer per connection: one sweep aborts heads older
    than --handshake-timeout and plain HTTP connections older than
    --http-timeout (counted from accept), whatever they send.
  - An admitted head holds one slot of its address until its connection
    closes; whoever owns the connection then (the router, L{_OneRequestChannel}
    or PushProtocol) releases it, once, in connectionLost.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet import protocol, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import HTTPChannel

from ._internals import replace_protocol
from .config import Config
from .httphead import HeadError, RequestHead, parse_head
from .limits import AddressLimits
from .websocket import PushFactory

__all__ = ["SERVER", "PortFactory"]

#: The Server header of every response, from whichever part of the node answers.
SERVER = "pushservice"
#: The longest request head read (twisted.web's own line limit).
MAX_HEAD = 16384
#: Seconds between two log lines saying --max-http-connections is reached.
_FULL_LOG_INTERVAL = 60.0

_REASONS = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    505: "HTTP Version Not Supported",
}


def _response(status: int, why: str, head_only: bool, extra: tuple[tuple[str, str], ...]) -> bytes:
    """A complete response that closes the connection; C{why} is its text body."""
    body = f"{why}\n".encode()
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Server: {SERVER}",
        "Connection: close",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in extra),
    ]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + (b"" if head_only else body)


class _Router(protocol.Protocol):
    """A connection until its request head is read: then refused, or handed over."""

    transport: Any
    client_address: str | None = None

    def __init__(self, port: PortFactory) -> None:
        self._port = port
        #: the head so far; None once answered (nothing more is read)
        self._head: bytes | None = b""

    def connectionMade(self) -> None:
        self._port.waiting[self] = self._port.reactor.seconds()

    def dataReceived(self, data: bytes) -> None:
        seen = self._head
        if seen is None:
            return
        head = seen + data
        end = head.find(b"\r\n\r\n", max(0, len(seen) - 3))
        stop = len(head) if end < 0 else end + 4
        # a bare LF ends nothing here: refuse it at once rather than wait for a CRLF CRLF that never comes
        if head.count(b"\n", len(seen), stop) != head.count(b"\r\n", max(0, len(seen) - 1), stop):
            self._refuse(400, "lines end in CRLF")
        elif stop > MAX_HEAD:
            self._refuse(431, f"the request head is over {MAX_HEAD} bytes")
        elif end < 0:
            self._head = head
        else:
            self._head = None
            self._route(head, stop)

    def _route(self, data: bytes, size: int) -> None:
        port = self._port
        try:
            head = parse_head(data[:size])
        except HeadError as e:
            return self._refuse(e.status, str(e))
        peer = self.transport.getPeer()
        address = port.limits.address_of(peer, head.fields.get(b"x-forwarded-for"))
        refused = port.limits.admit(address)
        if refused is not None:
            return self._refuse(429, refused.why, head, (("Retry-After", str(refused.retry_after)),))
        self.client_address = address
        if head.method not in (b"GET", b"HEAD"):
            return self._refuse(405, "only GET and HEAD are served", head, (("Allow", "GET, HEAD"),))
        if not head.target.startswith(b"/"):
            return self._refuse(400, "the request target is a path", head)
        websocket = head.wants_websocket()
        if head.has_body:
            return self._refuse(400 if websocket else 413, "requests here carry no body", head)
        if not websocket:
            channel = port.site.buildProtocol(peer)
            channel.port = port
            # the rest of the buffer is not a body (there is none): a pipelined request, not served
            return self._hand_over(channel, data[:size], http=True)
        if head.path != b"/":
            return self._refuse(404, "WebSocket connections go to /", head)
        if head.method != b"GET":
            return self._refuse(405, "a WebSocket upgrade is a GET", head, (("Allow", "GET"),))
        # all of the buffer: Autobahn parses the head itself, and frames may follow it
        self._hand_over(port.websocket.buildProtocol(peer), data, http=False)

    def _hand_over(self, successor: Any, data: bytes, http: bool) -> None:
        port = self._port
        since = port.waiting.pop(self, None)
        if http and since is not None:
            port.serving[successor] = since
        successor.client_address, self.client_address = self.client_address, None
        transport = self.transport
        replace_protocol(transport, successor)
        successor.makeConnection(transport)
        successor.dataReceived(data)

    def _refuse(
        self, status: int, why: str, head: RequestHead | None = None, extra: tuple[tuple[str, str], ...] = ()
    ) -> None:
        port = self._port
        self._head = None
        since = port.waiting.pop(self, None)
        if since is not None:  # counted, and on the HTTP deadline, until it is gone
            port.serving[self] = since
        head_only = head is not None and head.method == b"HEAD"
        port.stats.http_refusals[str(status)] += 1
        self.transport.write(_response(status, why, head_only, extra))
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._head = None
        self._port.closed(self)


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
        self._handshake_timeout = config.handshake_timeout
        self._http_timeout = config.http_timeout
        self._max_http = config.max_http_connections
        self.waiting: dict[_Router, float] = {}
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
            return _Router(self)
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
        self._sweeper.start(min(1.0, self._handshake_timeout / 4, self._http_timeout / 4), now=False)

    def stopFactory(self) -> None:
        self._sweeper.stop()
        # nothing sweeps them any more
        for connection in [*self.waiting, *self.serving]:
            connection.transport.abortConnection()
        self.waiting.clear()
        self.serving.clear()
        self.site.doStop()
