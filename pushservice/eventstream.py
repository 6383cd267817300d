"""
One ``GET /events`` connection after its head: a L{Session} like a
WebSocket's (the same joins, grants, resume and slow-client policy through
its outbox), whose frames go out as Server-Sent Events (L{pushservice.sse}).

The response has no length: its body is the stream, and it ends when the
connection closes. Nothing the client sends after its head is read. The
stream ends with a ``close`` event where the WebSocket would send a close
frame (shutdown 1001, token expired 4003), then the connection closes; the
browser reconnects by itself, with ``Last-Event-ID``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import _internals
from .auth import Grant
from .limits import TokenBucket
from .session import Node, Query, Session
from .sse import KEEPALIVE, MESSAGE_EVENT, FrameEvents, stream_start
from .wire import encode, format_offset, reply_frame

if TYPE_CHECKING:
    from .streams import EventStreams

__all__ = ["EventStream", "StreamSession"]

_CLOSE_GOING_AWAY = 1001


class StreamSession(Session):
    """
    A session whose client cannot ask for anything after its head: on
    joining without a C{since} it says where it joined (a ``joined`` notice
    with the newest offset, an event with that id), so a browser that
    reconnects before any message came still resumes from there.
    """

    __slots__ = ()

    def _joined(self, issued: bool) -> None:
        super()._joined(issued)
        if self.query.since is None:
            offset = format_offset(self._node.hub.history.last_offset)
            self.send(reply_frame("joined", None, offset=offset))


def response_head(origin: str | None) -> bytes:
    """The head of a stream's response; C{origin}: an allowed browser origin, told it may read the stream."""
    lines = [
        "HTTP/1.1 200 OK",
        "Server: pushservice",
        "Content-Type: text/event-stream; charset=utf-8",
        "Cache-Control: no-store",
        "Connection: close",
        "X-Accel-Buffering: no",  # nginx: pass events on as they come
    ]
    if origin is not None:
        lines += [f"Access-Control-Allow-Origin: {origin}", "Vary: Origin"]
    return "\r\n".join(lines).encode() + b"\r\n\r\n"


@implementer(IPushProducer)
class EventStream(protocol.Protocol):
    """A session's connection that writes events: the session's L{Connection}, its transport's producer."""

    _log = Logger()
    transport: Any
    #: Set by the port's router: the client address whose slot this connection holds.
    client_address: str | None = None
    session: Session | None = None

    def __init__(
        self, streams: EventStreams, query: Query, grant: Grant | None, origin: str | None, retry: float
    ) -> None:
        self._streams = streams
        self._query = query
        self._grant = grant
        self._origin = origin
        # each stream its own reconnect delay in [retry, 2 retry): a restart is not followed by a stampede
        self._retry_ms = int(retry * 1000 * (1 + random.random()))
        self._events = FrameEvents()
        self._ended = False
        self.paused = False
        #: Fires once the connection is gone (as Autobahn's C{is_closed} does for a WebSocket).
        self.is_closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        node: Node = self._streams.node
        self.transport.registerProducer(self, True)
        self.transport.write(response_head(self._origin) + stream_start(self._retry_ms))
        node.stats.connections += 1
        node.stats.sse_connections += 1
        node.stats.sse_connections_total += 1
        self._streams.opened(self)
        bucket = TokenBucket(node.clock, node.config.client_rate, node.config.client_burst)  # no frames to take it
        peer = self.transport.getPeer()
        name = f"sse:{peer.host}:{peer.port}" if hasattr(peer, "port") else f"sse:{peer}"  # tcp, or a unix socket
        self.session = StreamSession(node, self, self._query, self._grant, name, bucket)
        self.session.open()

    def dataReceived(self, data: bytes) -> None:
        """Nothing after the head is read: a stream's client only listens."""

    # -- Sink: the session's writes, as events ----------------------------------------

    def send_now(self, data: bytes | memoryview) -> int:
        return 0  # every write is re-encoded: through write()

    def queued(self) -> int:
        return _internals.transport_queued(self.transport)

    def direct_socket(self) -> None:
        return None  # every write is re-encoded

    def write(self, data: bytes) -> None:
        if not self._ended:
            events = self._events.feed(data)
            if events:
                self._streams.node.stats.sse_deliveries += events.count(MESSAGE_EVENT)
                self.transport.write(events)

    def drop_slow(self, why: str) -> None:
        self._streams.node.stats.slow_disconnects += 1
        self._streams.node.stats.sse_slow_disconnects += 1
        self._log.warn("dropping slow event stream {peer}: {why}", peer=self.transport.getPeer(), why=why)
        self._ended = True
        self.transport.abortConnection()

    def close(self, code: int, reason: str) -> None:
        """End the stream with a ``close`` event (the WebSocket's close code and reason), then the connection."""
        if not self._ended:
            self._ended = True
            notice = encode({"type": "close", "code": code, "reason": reason})
            self.transport.write(b"event: close\ndata: " + notice + b"\n\n")
            self.transport.loseConnection()

    def close_for_shutdown(self) -> None:
        self.close(_CLOSE_GOING_AWAY, "server shutting down")

    def keepalive(self) -> None:
        """A comment, unless the stream is ending, or its client is not reading (its outbox holds its place)."""
        if not self._ended and not self.paused:
            self.transport.write(KEEPALIVE)

    # -- IPushProducer ---------------------------------------------------------------

    def pauseProducing(self) -> None:
        self.paused = True
        if self.session is not None:
            self.session.outbox.pause()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.session is not None:
            self.session.outbox.resume()

    def stopProducing(self) -> None:
        pass

    # -- end -------------------------------------------------------------------------

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._ended = True
        streams = self._streams
        if self.session is not None:
            session, self.session = self.session, None
            session.closed()
            streams.node.stats.connections -= 1
            streams.node.stats.sse_connections -= 1
        streams.closed(self)
        self.is_closed.callback(None)
