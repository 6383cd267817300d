"""
One client's frames, served: each is rate limited, parsed (L{pushservice.wire}),
checked against the session's state and grant, acted on, and answered with
exactly one reply or error. The session (L{pushservice.session}) holds the
state; this holds what to do with a frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.logger import Logger

from .auth import AuthError
from .limits import TokenBucket
from .node import Node, State
from .wire import (
    Auth,
    Offset,
    PresenceQuery,
    Publish,
    Request,
    Subscribe,
    Unsubscribe,
    WireError,
    envelope,
    leading_id,
    parse_request,
)

if TYPE_CHECKING:
    from .session import Session

__all__ = ["Requests"]


class Requests:
    """Serves one session's frames: rate limit, parse, check, act, answer."""

    _log = Logger()
    __slots__ = ("_node", "_session", "_bucket")  # one per connection

    def __init__(self, node: Node, session: Session, bucket: TokenBucket) -> None:
        self._node = node
        self._session = session
        self._bucket = bucket

    def received(self, payload: bytes, is_binary: bool) -> None:
        session = self._session
        if not self._bucket.take():
            session.error("rate_limited", "too many frames: slow down", leading_id(payload))
            return
        try:
            config = self._node.config
            self._dispatch(parse_request(payload, is_binary, config.max_message_size, self._node.rules))
        except WireError as e:
            session.error(e.code, e.message, e.request_id)

    def _dispatch(self, request: Request) -> None:
        if self._session.state is State.AUTHENTICATING and not isinstance(request, Auth):
            raise WireError("forbidden", 'authenticate first: send {"type":"auth","token":...}', request.id)
        if isinstance(request, Publish):
            self._publish(request)
        elif isinstance(request, Subscribe):
            self._subscribe(request)
        elif isinstance(request, Unsubscribe):
            self._session.unlisten(request.channel)
            self._session.reply("unsubscribed", request.id, channel=request.channel)
        elif isinstance(request, PresenceQuery):
            self._presence(request)
        else:
            self._auth(request)

    def _publish(self, request: Publish) -> None:
        node, session = self._node, self._session
        if not node.policy.may_publish(session.grant, request.channel):
            where = "broadcast" if request.channel is None else f"publish on {request.channel!r}"
            raise WireError("forbidden", f"not allowed to {where}", request.id)
        try:
            item = envelope(request.content, request.channel)
        except ValueError as e:
            raise WireError("bad_request", str(e), request.id) from None

        def acked(_: object) -> None:
            node.stats.client_publishes += 1
            session.reply("ack", request.id)

        def failed(_: object) -> None:
            session.error("unavailable", "Redis did not confirm the message; it may not be delivered", request.id)

        node.bus.publish(item).addCallbacks(acked, failed)

    def _subscribe(self, request: Subscribe) -> None:
        node, session = self._node, self._session
        channel = request.channel
        if not node.policy.may_subscribe(session.grant, channel):
            raise WireError("forbidden", f"channel {channel!r} not granted", request.id)
        if channel not in session.channels and len(session.channels) >= node.config.max_subscriptions:
            raise WireError("bad_request", f"at most {node.config.max_subscriptions} subscriptions", request.id)
        presence = node.presence
        if presence is None:
            if request.presence:
                raise WireError("unavailable", "presence is not served here", request.id)
        elif request.presence:
            # subscribed once the node follows the channel's presence: every later join/leave reaches it
            presence.watch(session, channel).addCallbacks(
                lambda _: self._subscribe_watched(request),
                lambda f: session.error("unavailable", f"not subscribed: {f.getErrorMessage()}", request.id),
            )
            return
        else:
            presence.unwatch(session, channel)  # the latest subscribe says whether events are wanted
        self._subscribe_now(request)

    def _subscribe_watched(self, request: Subscribe) -> None:
        session = self._session
        if session.state is State.CLOSED:
            return
        try:
            self._subscribe_now(request)
        except WireError as e:
            assert self._node.presence is not None
            self._node.presence.unwatch(session, request.channel)
            session.error(e.code, e.message, e.request_id)

    def _subscribe_now(self, request: Subscribe) -> None:
        node, session = self._node, self._session
        channel = request.channel
        if request.since is None:
            session.listen(channel)
            session.reply("subscribed", request.id, channel=channel)
            return
        if session.state is not State.JOINED:
            raise WireError("unavailable", "this node is still starting: subscribe again in a moment", request.id)
        if request.since > node.hub.history.last_offset:
            defer.ensureDeferred(self._subscribe_ahead(request, request.since))
        else:
            self._subscribe_since(request, request.since)

    def _subscribe_since(self, request: Subscribe, since: Offset) -> None:
        hub, session = self._node.hub, self._session
        hub.subscribe(session, request.channel)
        recovered, start = hub.history.recovery(since)
        session.reply("subscribed", request.id, channel=request.channel, recovered=recovered)  # before the replay
        if start is not None:
            hub.replay_channel(session, request.channel, start)

    async def _subscribe_ahead(self, request: Subscribe, since: Offset) -> None:
        """Subscribe with a C{since} newer than this node has read: issued by a node ahead, or never."""
        session = self._session
        issued = await session.issued(since)
        if session.state is not State.JOINED:
            return
        hub = self._node.hub
        if since <= hub.history.last_offset:  # caught up meanwhile
            self._subscribe_since(request, since)
            return
        hub.subscribe(session, request.channel)
        if issued:
            hub.skip_until(session, since, request.channel)
        session.reply("subscribed", request.id, channel=request.channel, recovered=issued)

    def _presence(self, request: PresenceQuery) -> None:
        node, session = self._node, self._session
        if node.presence is None:
            raise WireError("unavailable", "presence is not served here", request.id)
        if not node.policy.may_subscribe(session.grant, request.channel):
            raise WireError("forbidden", f"channel {request.channel!r} not granted", request.id)

        def answered(reply: tuple[list[str], int, int]) -> None:
            users, count, anonymous = reply
            extra = {"truncated": True} if count > len(users) else {}
            session.reply(
                "presence",
                request.id,
                channel=request.channel,
                users=users,
                user_count=count,
                anonymous=anonymous,
                **extra,
            )

        def failed(_: object) -> None:
            session.error("unavailable", "Redis did not answer: presence unknown, ask again", request.id)

        node.presence.query(request.channel).addCallbacks(answered, failed)

    def _auth(self, request: Auth) -> None:
        node, session = self._node, self._session
        if session.grant is not None:
            raise WireError("bad_request", "already authenticated", request.id)
        try:
            grant = node.verify(request.token)
        except AuthError as e:
            self._log.info("auth frame refused for {peer}: {why}", peer=session.peer, why=e)
            raise WireError("forbidden", str(e), request.id) from None
        for channel in session.query.channels:
            if not node.policy.may_subscribe(grant, channel):
                raise WireError("forbidden", f"channel {channel!r} not granted", request.id)
        session.reply("ack", request.id)
        session.authenticated(grant)
