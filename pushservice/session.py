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

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from .auth import Grant
from .dispatch import Requests
from .limits import TokenBucket
from .node import Connection, Node, Query, State
from .outbox import Outbox
from .wire import Offset, error_frame, format_offset, reply_frame, text_frame

__all__ = ["CLOSE_AUTH_REQUIRED", "CLOSE_TOKEN_EXPIRED", "Connection", "Node", "Query", "Session", "State"]

CLOSE_AUTH_REQUIRED = 4001
CLOSE_TOKEN_EXPIRED = 4003


class Session:
    """One client's state and life: its grant, subscriptions and output (its frames: L{Requests})."""

    _log = Logger()
    # one per connection: no __dict__ (memory per connection)
    __slots__ = (
        "_node",
        "_conn",
        "grant",
        "query",
        "peer",
        "_timers",
        "user",
        "channels",
        "outbox",
        "state",
        "_requests",
    )

    def __init__(
        self,
        node: Node,
        conn: Connection,
        query: Query,
        grant: Grant | None,
        peer: str,
        bucket: TokenBucket,
        deflate: bool = False,
    ) -> None:
        self._node = node
        self._conn = conn
        self.grant = grant
        self.query = query
        self.peer = peer
        self._timers: list[Any] | None = None  # most sessions never set one
        self.user: str | None = None
        self.channels: set[str] = set()
        # deflate: the connection negotiated permessage-deflate (messages go compressed, replies plain)
        self.outbox = Outbox(self, conn, node.hub, node.clock, node.config.slow_client_bytes, deflate)
        self.state = State.AUTHENTICATING
        self._requests = Requests(node, self, bucket)

    # -- lifecycle -----------------------------------------------------------

    def open(self) -> None:
        """The handshake is done."""
        config = self._node.config
        if self.grant is not None:
            self.authenticated(self.grant)
        elif config.require_token or self.query.auth_frame:
            self._later(config.auth_timeout, self._auth_deadline)
        else:
            self._join()

    def closed(self) -> None:
        for timer in self._timers or ():
            if timer.active():
                timer.cancel()
        if self.state is State.JOINED:
            self._node.hub.remove(self)
        if self._node.presence is not None:
            self._node.presence.forget(self)
        self.outbox.close()
        self.state = State.CLOSED

    def _later(self, seconds: float, call: Any) -> None:
        if self._timers is None:
            self._timers = []
        self._timers.append(self._node.clock.callLater(seconds, call))

    def _auth_deadline(self) -> None:
        if self.state is State.AUTHENTICATING:
            self._conn.close(CLOSE_AUTH_REQUIRED, "authentication required")

    def _expired(self) -> None:
        if self.state is not State.CLOSED:
            self._conn.close(CLOSE_TOKEN_EXPIRED, "token expired")

    def authenticated(self, grant: Grant) -> None:
        """C{grant} was verified: the session is that user's from now on, until the token expires."""
        node = self._node
        self.grant = grant
        if self.state is State.JOINED:
            node.hub.set_user(self, grant.user)
        else:
            self.user = grant.user
        self._later(max(0.0, grant.expires - node.clock.seconds()), self._expired)
        if self.state is State.AUTHENTICATING:
            self._join()

    def _join(self) -> None:
        self.state = State.JOINING
        since = self.query.since
        hub = self._node.hub
        if hub.ready and (since is None or since <= hub.history.last_offset):
            self._joined(True)  # the usual case, at once: no Deferred, no coroutine (handshake CPU)
            return
        defer.ensureDeferred(self._joining()).addErrback(
            lambda f: self._log.failure("joining the hub failed for {peer}", f, peer=self.peer)
        )

    async def _joining(self) -> None:
        """Wait for the node's history, and ask the log about a C{since} newer than it."""
        node = self._node
        await node.hub.when_ready()
        since = self.query.since
        issued = True
        if since is not None and since > node.hub.history.last_offset:
            issued = await self.issued(since)
        if self.state is State.JOINING:
            self._joined(issued)

    def _joined(self, issued: bool) -> None:
        """Join the hub with the query's channels; answer its C{since} (C{issued}: the log holds it)."""
        self.state = State.JOINED
        hub = self._node.hub
        self.channels.update(self.query.channels)
        hub.add(self)
        since = self.query.since
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

    # -- frames from the client ----------------------------------------------------

    def received(self, payload: bytes, is_binary: bool) -> None:
        self._requests.received(payload, is_binary)

    def listen(self, channel: str) -> None:
        """Subscribe C{channel}: in the hub when joined, else with the rest when it joins."""
        if self.state is State.JOINED:
            self._node.hub.subscribe(self, channel)
        else:
            self.channels.add(channel)

    def unlisten(self, channel: str) -> None:
        if self._node.presence is not None:
            self._node.presence.unwatch(self, channel)
        if self.state is State.JOINED:
            self._node.hub.unsubscribe(self, channel)
        else:
            self.channels.discard(channel)

    async def issued(self, since: Offset) -> bool:
        """Whether the log holds C{since} (a node ahead gave it out); False if Redis cannot say."""
        try:
            return bool(await self._node.bus.offset_exists(since))
        except Exception:
            return False

    # -- frames to the client ------------------------------------------------------

    def send(self, payload: bytes) -> None:
        if self.state is not State.CLOSED:
            self.outbox.send(text_frame(payload))

    def reply(self, kind: str, request_id: Any, **fields: Any) -> None:
        self.send(reply_frame(kind, request_id, **fields))

    def error(self, code: str, message: str, request_id: Any) -> None:
        self._node.stats.errors[code] += 1
        self.send(error_frame(code, message, request_id))
