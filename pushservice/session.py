"""
One client's session: who it is, what it listens to, and what it asked for.
Independent of Autobahn: it reads parsed frames and writes through its
connection, so it is tested in memory.

States, in order (a session only moves forward):

  AUTHENTICATING  opened, and an ``auth`` frame must come first: tokens are
                  required, or the query said ``auth=1`` (the browser
                  client's way, so no token sits in a URL). Other frames get
                  ``forbidden``; after --auth-timeout the connection is
                  closed with 4001.
  JOINING         may listen: waits for the node's history, then joins the
                  hub with the query's channels and answers its ``since``.
  JOINED          in the hub: receives messages.
  CLOSED          gone; nothing is sent any more.
"""

from __future__ import annotations

import enum
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from .auth import AuthError, Grant
from .limits import TokenBucket
from .node import Connection, Node, Query
from .outbox import Outbox
from .wire import (
    Auth,
    Offset,
    Publish,
    Request,
    Subscribe,
    Unsubscribe,
    WireError,
    envelope,
    error_frame,
    format_offset,
    leading_id,
    parse_request,
    reply_frame,
    text_frame,
)

__all__ = ["CLOSE_AUTH_REQUIRED", "CLOSE_TOKEN_EXPIRED", "Connection", "Node", "Query", "Session", "State"]

CLOSE_AUTH_REQUIRED = 4001
CLOSE_TOKEN_EXPIRED = 4003


class State(enum.Enum):
    """Where a session is in its life (see the module docstring)."""

    AUTHENTICATING = "authenticating"
    JOINING = "joining"
    JOINED = "joined"
    CLOSED = "closed"


class Session:
    """One client: its grant, its subscriptions, its output, and its requests."""

    _log = Logger()

    def __init__(
        self, node: Node, conn: Connection, query: Query, grant: Grant | None, peer: str, bucket: TokenBucket
    ) -> None:
        self._node = node
        self._conn = conn
        self._query = query
        self._grant = grant
        self._peer = peer
        self._bucket = bucket
        self._timers: list[Any] = []
        self.user: str | None = None
        self.channels: set[str] = set()
        self.outbox = Outbox(self, conn, node.hub, node.clock, node.config.slow_client_bytes)
        self.state = State.AUTHENTICATING

    # -- lifecycle -----------------------------------------------------------

    def open(self) -> None:
        """The handshake is done."""
        config = self._node.config
        if self._grant is not None:
            self._authenticated(self._grant)
        elif config.require_token or self._query.auth_frame:
            self._later(config.auth_timeout, self._auth_deadline)
        else:
            self._join()

    def closed(self) -> None:
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        if self.state is State.JOINED:
            self._node.hub.remove(self)
        self.outbox.close()
        self.state = State.CLOSED

    def _later(self, seconds: float, call: Any) -> None:
        self._timers.append(self._node.clock.callLater(seconds, call))

    def _auth_deadline(self) -> None:
        if self.state is State.AUTHENTICATING:
            self._conn.close(CLOSE_AUTH_REQUIRED, "authentication required")

    def _expired(self) -> None:
        if self.state is not State.CLOSED:
            self._conn.close(CLOSE_TOKEN_EXPIRED, "token expired")

    def _join(self) -> None:
        self.state = State.JOINING
        defer.ensureDeferred(self._joining()).addErrback(
            lambda f: self._log.failure("joining the hub failed for {peer}", f, peer=self._peer)
        )

    async def _joining(self) -> None:
        """Join the hub, subscribe the query's channels, answer its ``since``."""
        node = self._node
        await node.hub.when_ready()
        since = self._query.since
        issued = True
        if since is not None and since > node.hub.history.last_offset:
            issued = await self._issued(since)
        if self.state is not State.JOINING:
            return
        self.state = State.JOINED
        hub = node.hub
        self.channels.update(self._query.channels)
        hub.add(self)
        if since is None:
            return
        if since <= hub.history.last_offset:
            recovered = hub.resume(self, since)
        elif issued:
            hub.skip_until(self, since, None)  # this node lags the one the client came from
            recovered = True
        else:
            recovered = False  # never issued here: a future offset, another deployment's
        self.send(reply_frame("resumed", None, since=format_offset(since), recovered=recovered))

    async def _issued(self, since: Offset) -> bool:
        """Whether the log holds C{since} (a node ahead gave it out); False if Redis cannot say."""
        try:
            return bool(await self._node.bus.offset_exists(since))
        except Exception:
            return False

    # -- frames from the client ----------------------------------------------------

    def received(self, payload: bytes, is_binary: bool) -> None:
        node = self._node
        if not self._bucket.take():
            self._error("rate_limited", "too many frames: slow down", leading_id(payload))
            return
        try:
            request = parse_request(payload, is_binary, node.config.max_message_size, node.rules)
            self._dispatch(request)
        except WireError as e:
            self._error(e.code, e.message, e.request_id)

    def _dispatch(self, request: Request) -> None:
        if self.state is State.AUTHENTICATING and not isinstance(request, Auth):
            raise WireError("forbidden", 'authenticate first: send {"type":"auth","token":...}', request.id)
        if isinstance(request, Publish):
            self._publish(request)
        elif isinstance(request, Subscribe):
            self._subscribe(request)
        elif isinstance(request, Unsubscribe):
            self._unsubscribe(request)
        else:
            self._auth(request)

    def _publish(self, request: Publish) -> None:
        node = self._node
        if not node.policy.may_publish(self._grant, request.channel):
            where = "broadcast" if request.channel is None else f"publish on {request.channel!r}"
            raise WireError("forbidden", f"not allowed to {where}", request.id)
        try:
            item = envelope(request.content, request.channel)
        except ValueError as e:
            raise WireError("bad_request", str(e), request.id) from None
        d = node.bus.publish(item)

        def acked(_: object) -> None:
            node.stats.client_publishes += 1
            self._reply("ack", request.id)

        def failed(_: object) -> None:
            self._error("unavailable", "Redis did not confirm the message; it may not be delivered", request.id)

        d.addCallbacks(acked, failed)

    def _subscribe(self, request: Subscribe) -> None:
        node = self._node
        channel = request.channel
        if not node.policy.may_subscribe(self._grant, channel):
            raise WireError("forbidden", f"channel {channel!r} not granted", request.id)
        if channel not in self.channels and len(self.channels) >= node.config.max_subscriptions:
            raise WireError("bad_request", f"at most {node.config.max_subscriptions} subscriptions", request.id)
        if request.since is None:
            self._listen(channel)
            self._reply("subscribed", request.id, channel=channel)
            return
        if self.state is not State.JOINED:
            raise WireError("unavailable", "this node is still starting: subscribe again in a moment", request.id)
        if request.since > node.hub.history.last_offset:
            defer.ensureDeferred(self._subscribe_ahead(request, request.since))
        else:
            self._subscribe_since(request, request.since)

    def _subscribe_since(self, request: Subscribe, since: Offset) -> None:
        hub = self._node.hub
        hub.subscribe(self, request.channel)
        recovered, start = hub.history.recovery(since)
        self._reply("subscribed", request.id, channel=request.channel, recovered=recovered)  # before the replay
        if start is not None:
            hub.replay_channel(self, request.channel, start)

    async def _subscribe_ahead(self, request: Subscribe, since: Offset) -> None:
        """Subscribe with a C{since} newer than this node has read: issued by a node ahead, or never."""
        issued = await self._issued(since)
        if self.state is not State.JOINED:
            return
        hub = self._node.hub
        if since <= hub.history.last_offset:  # caught up meanwhile
            self._subscribe_since(request, since)
            return
        hub.subscribe(self, request.channel)
        if issued:
            hub.skip_until(self, since, request.channel)
        self._reply("subscribed", request.id, channel=request.channel, recovered=issued)

    def _listen(self, channel: str) -> None:
        if self.state is State.JOINED:
            self._node.hub.subscribe(self, channel)
        else:
            self.channels.add(channel)  # indexed when it joins

    def _unsubscribe(self, request: Unsubscribe) -> None:
        if self.state is State.JOINED:
            self._node.hub.unsubscribe(self, request.channel)
        else:
            self.channels.discard(request.channel)
        self._reply("unsubscribed", request.id, channel=request.channel)

    def _auth(self, request: Auth) -> None:
        node = self._node
        if self._grant is not None:
            raise WireError("bad_request", "already authenticated", request.id)
        try:
            grant = node.verify(request.token)
        except AuthError as e:
            self._log.info("auth frame refused for {peer}: {why}", peer=self._peer, why=e)
            raise WireError("forbidden", str(e), request.id) from None
        for channel in self._query.channels:
            if not node.policy.may_subscribe(grant, channel):
                raise WireError("forbidden", f"channel {channel!r} not granted", request.id)
        self._reply("ack", request.id)
        self._authenticated(grant)

    def _authenticated(self, grant: Grant) -> None:
        node = self._node
        self._grant = grant
        if self.state is State.JOINED:
            node.hub.set_user(self, grant.user)
        else:
            self.user = grant.user
        self._later(max(0.0, grant.expires - node.clock.seconds()), self._expired)
        if self.state is State.AUTHENTICATING:
            self._join()

    # -- frames to the client ------------------------------------------------------

    def send(self, payload: bytes) -> None:
        if self.state is not State.CLOSED:
            self.outbox.send(text_frame(payload))

    def _reply(self, kind: str, request_id: Any, **fields: Any) -> None:
        self.send(reply_frame(kind, request_id, **fields))

    def _error(self, code: str, message: str, request_id: Any) -> None:
        self._node.stats.errors[code] += 1
        self.send(error_frame(code, message, request_id))
