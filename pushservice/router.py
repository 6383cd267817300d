"""
The first protocol of every connection: it reads the request head, parses
it strictly (L{pushservice.httphead}), charges the client address, then
refuses it or hands the connection over (see L{pushservice.http} for the
rules and invariants).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._internals import read_now, replace_protocol
from .httphead import HeadError, RequestHead, parse_head
from .streams import StreamRefusal

if TYPE_CHECKING:
    from .http import PortFactory

__all__ = ["EVENTS_PATH", "MAX_HEAD", "PUBLISH_PATH", "SERVER", "Router"]

#: The Server header of every response, from whichever part of the node answers.
SERVER = "pushservice"
#: The longest request head read (twisted.web's own line limit).
MAX_HEAD = 16384
#: Where event streams are served (L{pushservice.streams}).
EVENTS_PATH = b"/events"
#: Where producers POST messages (L{pushservice.publish}); the only request with a body.
PUBLISH_PATH = b"/publish"

_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Content Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
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


class Router(protocol.Protocol):
    """A connection until its request head is read: then refused, or handed over."""

    _log = Logger()
    transport: Any
    client_address: str | None = None

    def __init__(self, port: PortFactory) -> None:
        self._port = port
        #: the head so far; None once answered (nothing more is read)
        self._head: bytes | None = b""

    def connectionMade(self) -> None:
        self._port.waiting[self] = self._port.reactor.seconds()
        # the head is usually here already: served now, not after the reactor's next poll
        data = read_now(self.transport)
        if data:
            try:
                self.dataReceived(data)
            except Exception:  # inside the port's accept loop: this connection only
                self._log.failure("serving a new connection failed; dropping it")
                self.transport.abortConnection()

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
        if head.method == b"POST" and head.path == PUBLISH_PATH:
            return self._publish(head, data)
        if head.method not in (b"GET", b"HEAD"):
            return self._refuse(
                405, "only GET and HEAD are served (and POST /publish)", head, (("Allow", "GET, HEAD"),)
            )
        if not head.target.startswith(b"/"):
            return self._refuse(400, "the request target is a path", head)
        websocket = head.wants_websocket()
        if head.has_body:
            return self._refuse(400 if websocket else 413, "requests here carry no body", head)
        if not websocket and head.path == EVENTS_PATH:
            return self._stream(head)
        if not websocket:
            channel = port.site.buildProtocol(peer)
            channel.port = port
            # the rest of the buffer is not a body (there is none): a pipelined request, not served
            return self._hand_over(channel, data[:size], http=True)
        if head.path != b"/":
            return self._refuse(404, "WebSocket connections go to /", head)
        if head.method != b"GET":
            return self._refuse(405, "a WebSocket upgrade is a GET", head, (("Allow", "GET"),))
        # all of the buffer: frames may follow the head (answered from C{head}, or by Autobahn)
        successor: Any = port.websocket.buildProtocol(peer)
        successor.request_head = head
        self._hand_over(successor, data, http=False)

    def _stream(self, head: RequestHead) -> None:
        if head.method != b"GET":
            return self._refuse(405, "an event stream is a GET", head, (("Allow", "GET"),))
        stream = self._port.streams.stream_for(head)
        if isinstance(stream, StreamRefusal):
            return self._refuse(stream.status, stream.why, head, stream.headers)
        # not on the --http-timeout deadline: a stream lives as long as its client listens
        self._hand_over(stream, b"", http=False)

    def _publish(self, head: RequestHead, data: bytes) -> None:
        port = self._port
        if not port.publishing:
            why = "POST /publish is off: this node has no --token-secret-file to check publishers' tokens"
            return self._refuse(404, why, head)
        if b"authorization" not in head.fields:
            why = "send a token: Authorization: Bearer <jwt> with a publish grant"
            return self._refuse(401, why, head, (("WWW-Authenticate", 'Bearer realm="pushservice"'),))
        if b"transfer-encoding" in head.fields:
            return self._refuse(411, "send the body with a Content-Length (chunked bodies are not read)", head)
        if head.content_length > port.max_publish_body:
            why = f"the body is over --max-publish-body ({port.max_publish_body} bytes)"
            return self._refuse(413, why, head)
        channel = port.site.buildProtocol(self.transport.getPeer())
        channel.port = port
        # all of the buffer: the body follows the head (at most --max-publish-body of it is read)
        self._hand_over(channel, data, http=True)

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
