"""
Join and leave events, for the connections that asked for them
(``{"type":"subscribe","channel":...,"presence":true}``).

Every node publishes, with each flush of its presence (L{pushservice.presencestore}),
the users that appeared on or vanished from it, on one Redis Pub/Sub channel,
``<queue>:presence-events``; every node listens on its own connection. Pub/Sub,
not the ordered log: events are ephemeral (no replay, no history), only nodes
can publish there (clients reach Redis only through LPUSH of envelopes, which
become ``message`` frames), and a node forwards them only to its connections
subscribed to that channel with ``presence: true``, which the grant check let
through: private membership goes to nobody else.

For each channel a connection of this node watches, the node keeps a
L{ChannelView} (users per node, versioned), loaded from Redis when the first
watcher comes and dropped with the last. A user joins when its first
connection anywhere comes and leaves when its last one goes. A node that
stops refreshing its presence (killed with -9) is noticed within
--presence-ttl plus a third of it: its users leave. When the Pub/Sub
connection comes back after an outage, every view is read again and the
differences are sent as events, so nothing missed stays wrong.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .presencebook import ChannelView
from .presenceevents import EventSender
from .presencestore import PresenceKeys, PresenceStore
from .redislink import Unavailable

__all__ = ["PresenceFeed"]


class _Watched:
    """One channel some connections of this node watch."""

    __slots__ = ("watchers", "view", "loading", "loaded", "stale", "waiting")

    def __init__(self) -> None:
        self.watchers: set[Any] = set()
        self.view = ChannelView()
        #: The view being read from Redis (first load, or a reload after an outage): events go there.
        self.loading: ChannelView | None = None
        self.loaded = False
        #: a reload failed: read it again at the next check
        self.stale = False
        self.waiting: list[defer.Deferred[None]] = []


def _flush(payload: bytes) -> tuple[str, int, list[tuple[str, dict[str, bool]]]]:
    """``{"n": node, "v": version, "c": {channel: {user: 0|1}}}``: (node, version, [(channel, {user: present})])."""
    event = json.loads(payload)
    changes = [(str(c), {str(u): bool(p) for u, p in f.items()}) for c, f in event["c"].items()]
    return str(event["n"]), int(event["v"]), changes


class PresenceFeed:
    """Views of the watched channels, kept current from Pub/Sub, and their events sent to watchers."""

    _log = Logger()

    def __init__(
        self, clock: IReactorTime, store: PresenceStore, keys: PresenceKeys, ttl: float, timeout: float
    ) -> None:
        self._clock = clock
        self._timeout = timeout
        self._store = store
        self._keys = keys
        self._watched: dict[str, _Watched] = {}
        self._by_session: dict[Any, set[str]] = {}
        self._link: Any = None
        self._subscribed = False
        self._sender = EventSender(clock, self._watchers, self.watching)
        self._check = LoopingCall(self._check_gone)
        self._check.clock = clock
        self._check_every = ttl / 3
        self._bad_events = 0
        #: watch() calls waiting for the subscription (a node just started, or Redis just came back)
        self._waiting: list[defer.Deferred[None]] = []

    # -- lifecycle -----------------------------------------------------------

    def start(self, link: Any) -> None:
        """@param link: a L{RedisLink} in Pub/Sub mode whose messages come to L{message}."""
        self._link = link
        self._check.start(self._check_every, now=False)

    def stop(self) -> None:
        if self._check.running:
            self._check.stop()
        self._sender.stop()

    def link_changed(self, link: Any) -> None:
        """The Pub/Sub connection is up (subscribe, then read every view again) or down."""
        if self._subscribed and not link.up:
            self._log.warn("lost the presence events connection to Redis ({why}); reconnecting", why=link.last_error)
        self._subscribed = False
        if link.up:
            defer.ensureDeferred(self._subscribe(link)).addErrback(
                lambda f: self._log.failure("subscribing to presence events failed", f)
            )

    async def _subscribe(self, link: Any) -> None:
        try:
            await link.command("SUBSCRIBE", self._keys.events).addTimeout(self._timeout, self._clock)
        except Exception:
            link.drop()  # and again when it is back
            return
        self._subscribed = True
        for channel, watched in list(self._watched.items()):
            self._load(channel, watched)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    # -- watchers ----------------------------------------------------------

    def watch(self, session: Any, channel: str) -> defer.Deferred[None]:
        """
        C{session} wants C{channel}'s joins and leaves: fires once every later
        one will reach it; fails with L{Unavailable} if that cannot be within
        the Redis timeout.
        """
        if self._subscribed:
            return self._watch(session, channel)
        d: defer.Deferred[None] = defer.Deferred(lambda d: self._waiting.remove(d) if d in self._waiting else None)
        self._waiting.append(d)

        def late(failure: Any) -> None:
            failure.trap(defer.TimeoutError)
            raise Unavailable("not listening to presence events (Redis unavailable)")

        d.addTimeout(self._timeout, self._clock).addCallbacks(lambda _: self._watch(session, channel), late)
        return d

    def _watch(self, session: Any, channel: str) -> defer.Deferred[None]:
        watched = self._watched.get(channel)
        if watched is None:
            watched = self._watched[channel] = _Watched()
            self._load(channel, watched)
        watched.watchers.add(session)
        self._by_session.setdefault(session, set()).add(channel)
        if watched.loading is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        watched.waiting.append(d)
        return d

    def unwatch(self, session: Any, channel: str) -> None:
        channels = self._by_session.get(session)
        if channels is None or channel not in channels:
            return
        channels.discard(channel)
        if not channels:
            del self._by_session[session]
        watched = self._watched[channel]
        watched.watchers.discard(session)
        if not watched.watchers:
            del self._watched[channel]
            for d in watched.waiting:
                d.errback(Unavailable("unsubscribed meanwhile"))

    def forget(self, session: Any) -> None:
        """C{session} is gone."""
        for channel in list(self._by_session.get(session, ())):
            self.unwatch(session, channel)

    def _watchers(self, channel: str) -> list[Any]:
        watched = self._watched.get(channel)
        return list(watched.watchers) if watched is not None else []

    def watching(self, session: Any, channel: str) -> bool:
        return channel in self._by_session.get(session, ())

    # -- keeping views current ----------------------------------------------------

    def _load(self, channel: str, watched: _Watched) -> None:
        view = watched.loading = ChannelView()
        defer.ensureDeferred(self._store.snapshot(channel)).addCallbacks(
            lambda snapshot: self._loaded(channel, watched, view, snapshot),
            lambda failure: self._load_failed(channel, watched, view, failure),
        )

    def _loaded(self, channel: str, watched: _Watched, view: ChannelView, snapshot: Any) -> None:
        if self._watched.get(channel) is not watched or watched.loading is not view:
            return  # dropped, or loading again meanwhile
        for node, (version, users) in snapshot.items():
            view.replace(node, version, users)
        reload, watched.loaded = watched.loaded, True
        before, watched.view, watched.loading = watched.view.users(), view, None
        if reload:  # after an outage: what changed while events could not reach us
            after = view.users()
            self._sender.send(
                channel, [(u, True) for u in sorted(after - before)] + [(u, False) for u in sorted(before - after)]
            )
        waiting, watched.waiting = watched.waiting, []
        for d in waiting:
            d.callback(None)

    def _load_failed(self, channel: str, watched: _Watched, view: ChannelView, failure: Any) -> None:
        if self._watched.get(channel) is not watched or watched.loading is not view:
            return
        waiting, watched.waiting = watched.waiting, []
        if waiting:  # first load: those who asked get the error and watch nothing
            for session in list(watched.watchers):
                self.unwatch(session, channel)
            for d in waiting:
                if not d.called:
                    d.errback(Unavailable(failure.getErrorMessage() or "Redis did not answer"))
            return
        watched.loading = None  # a reload: keep the old view meanwhile, and read it again at the next check
        watched.stale = True

    def message(self, channel: bytes, payload: bytes) -> None:
        """A node's flush, from Pub/Sub (see L{_flush})."""
        try:
            node, version, changes = _flush(payload)
        except (ValueError, KeyError, TypeError, AttributeError):
            self._bad_events += 1
            if self._bad_events == 1:
                self._log.warn("ignoring a malformed presence event on {key}", key=self._keys.events)
            return
        for name, flipped in changes:
            watched = self._watched.get(name)
            if watched is None:
                continue
            if watched.loading is not None:
                watched.loading.update(node, version, flipped)  # sent by the diff when loaded
            else:
                self._sender.send(name, watched.view.update(node, version, flipped))

    async def _check_gone(self) -> None:
        """Drop the nodes that stopped refreshing their presence: their users leave. Ping the Pub/Sub connection."""
        link = self._link
        if link is not None and link.up:  # a half-open connection would otherwise go unnoticed
            link.command("PING").addTimeout(self._timeout, self._clock).addErrback(lambda _: link.drop())
        for channel, watched in list(self._watched.items()):
            if watched.stale and watched.loading is None and self._subscribed:
                watched.stale = False
                self._load(channel, watched)
        nodes: set[str] = set()
        for watched in self._watched.values():
            nodes.update(watched.view.nodes())
            if watched.loading is not None:
                nodes.update(watched.loading.nodes())
        nodes.discard(self._store.node_id)
        try:
            gone = await self._store.gone(sorted(nodes))
        except Exception:
            return  # Redis down: nobody can tell; next time
        for node in gone:
            self._log.info("presence: node {node} is gone; its users leave", node=node)
            for channel, watched in list(self._watched.items()):
                if watched.loading is not None:
                    watched.loading.drop(node)
                self._sender.send(channel, watched.view.drop(node))
