"""
``GET /events``: which request heads may open an event stream (the same
origin, query, token and channel rules as a WebSocket handshake, refused
with an HTTP status instead), the streams open on this node, and their
keep-alive comments.

A stream's resume point is its ``Last-Event-ID`` header (what a browser's
EventSource sends on its own reconnect) or else its ``since`` query; its
token is its ``token`` query or an ``Authorization: Bearer`` header (an
EventSource cannot set headers; curl can).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple
from urllib.parse import parse_qs

from twisted.internet import task
from twisted.logger import Logger

from .auth import AuthError, Grant
from .eventstream import EventStream
from .httphead import RequestHead
from .limits import AddressLimits
from .session import Node, Query
from .websocket import _query
from .wire import parse_offset

__all__ = ["EventStreams", "StreamRefusal"]

#: Streams written a keep-alive comment per reactor turn.
_SLICE = 256


class StreamRefusal(NamedTuple):
    """Why a head may not open a stream: the HTTP status, a sentence, extra response headers."""

    status: int
    why: str
    headers: tuple[tuple[str, str], ...] = ()


def bearer(head: RequestHead) -> str | None:
    """The token of an C{Authorization: Bearer} header (None without one). @raise ValueError: another scheme."""
    value = head.fields.get(b"authorization")
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip() or "," in token:
        raise ValueError("the Authorization header is not one 'Bearer <token>'")
    return token.strip()


class EventStreams:
    """The event streams of this node: opened from request heads, kept alive, closed at shutdown."""

    _log = Logger()

    def __init__(self, node: Node, origin_allowed: Callable[[str], bool], limits: AddressLimits) -> None:
        self.node = node
        self._origin_allowed = origin_allowed
        self._limits = limits
        self._open: dict[EventStream, None] = {}  # insertion-ordered set
        self._keepalive = task.LoopingCall(self._tick)
        self._keepalive.clock = node.clock

    def connections(self) -> list[EventStream]:
        return list(self._open)

    def stream_for(self, head: RequestHead) -> EventStream | StreamRefusal:
        """A stream for C{head} (a GET of /events), or why not."""
        config = self.node.config
        origin = head.fields.get(b"origin")
        origin_text = origin.decode("latin-1") if origin is not None else None
        if origin_text is not None and not self._origin_allowed(origin_text):
            return StreamRefusal(403, "origin not allowed")
        try:
            query, token = self._query(head)
        except ValueError as e:
            return StreamRefusal(400, str(e))
        grant: Grant | None = None
        if token is not None:
            try:
                grant = self.node.verify(token)
            except AuthError as e:
                self._log.info("event stream refused: {why}", why=e)
                return StreamRefusal(403, "invalid token")
        elif config.require_token:
            why = "a token is required: token=<jwt> in the query, or Authorization: Bearer <jwt>"
            return StreamRefusal(401, why, (("WWW-Authenticate", "Bearer"),))
        for channel in query.channels:
            if not self.node.policy.may_subscribe(grant, channel):
                return StreamRefusal(403, f"channel {channel!r} not granted")
        if self.node.stats.connections >= config.max_connections:
            return StreamRefusal(503, "this node has --max-connections connections: try again later")
        return EventStream(self, query, grant, origin_text, config.sse_retry)

    def _query(self, head: RequestHead) -> tuple[Query, str | None]:
        """The stream's query and token. @raise ValueError: with what is wrong."""
        text = head.target.partition(b"?")[2].decode("ascii")
        limit = self.node.config.max_subscriptions + 8
        params = parse_qs(text, keep_blank_values=True, errors="strict", max_num_fields=limit)
        if params.get("auth", ["0"])[-1] != "0":
            raise ValueError("an event stream has no auth frame: send token= or Authorization: Bearer")
        query = _query(params, self.node.config.max_subscriptions)
        last = head.fields.get(b"last-event-id", b"").strip()
        if last:
            try:
                query = replace(query, since=parse_offset(last.decode("ascii")))
            except (ValueError, UnicodeDecodeError):
                raise ValueError("Last-Event-ID is not an offset this service gave out") from None
        token = params.get("token", [None])[-1]
        header = bearer(head)
        if token is not None and header is not None and token != header:
            raise ValueError("two different tokens: send one, in the query or the Authorization header")
        return query, token if token is not None else header

    # -- open streams ------------------------------------------------------------------

    def opened(self, stream: EventStream) -> None:
        self._open[stream] = None

    def closed(self, stream: EventStream) -> None:
        """C{stream}'s connection is gone: uncount it, release its address's slot."""
        self._open.pop(stream, None)
        address, stream.client_address = stream.client_address, None
        if address is not None:
            self._limits.release(address)

    def start(self) -> None:
        self._keepalive.start(self.node.config.sse_keepalive, now=False)

    def stop(self) -> None:
        if self._keepalive.running:
            self._keepalive.stop()

    def _tick(self) -> None:
        self._write_keepalives(list(self._open), 0)

    def _write_keepalives(self, streams: list[EventStream], start: int) -> None:
        end = start + _SLICE
        for stream in streams[start:end]:
            if stream in self._open:
                stream.keepalive()
        if end < len(streams):
            self.node.clock.callLater(0, self._write_keepalives, streams, end)
