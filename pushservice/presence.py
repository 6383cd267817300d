"""
Presence, per channel, across every node: who is subscribed now (users, by
their verified token's ``sub``, each once however many connections it has,
and a count of anonymous connections), and join/leave events for the
connections that ask for them.

  - L{pushservice.presencebook}: this node's counts (pure), fed by the hub at
    every subscribe, unsubscribe, join and leave of a connection;
  - L{pushservice.presencestore}: those counts written to Redis in aggregate,
    with TTLs, and every node's read back (the ``presence`` request);
  - L{pushservice.presencefeed}: join/leave events through Redis Pub/Sub.

Only what the hub holds is counted: channels a connection is subscribed to
after the grant checks, and a user only from a verified token. Nothing here
runs per message: the delivery path does not know presence exists.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from .config import Config
from .presencefeed import PresenceFeed
from .presencestore import PresenceKeys, PresenceStore

__all__ = ["Presence", "PresenceReply"]

#: (up to --presence-max-users users, sorted; how many users in all; anonymous connections).
PresenceReply = tuple[list[str], int, int]


class Presence:
    """This node's presence: its book, its Redis side and its events; C{start} after the bus."""

    def __init__(self, clock: IReactorTime, config: Config, bus: Any) -> None:
        keys = PresenceKeys(config.queue)
        self._bus = bus
        self._config = config
        self.store = PresenceStore(clock, bus.request, keys, bus.node_id, config.presence_ttl, config.presence_flush)
        self.feed = PresenceFeed(clock, self.store, keys, config.presence_ttl, config.redis_timeout)
        #: what the hub tells of every change in who listens to what
        self.book = self.store.book
        # channel -> (callers of the query running, callers of the one after it)
        self._queries: dict[str, tuple[list[defer.Deferred[PresenceReply]], list[defer.Deferred[PresenceReply]]]] = {}

    def start(self) -> None:
        self.feed.start(self._bus.pubsub_link(self.feed.message, self.feed.link_changed))
        self.store.start()

    def stop(self) -> defer.Deferred[None]:
        """After every connection closed: write the last changes (their leaves), and say this node is gone."""
        self.feed.stop()
        return self.store.stop()

    # -- requests ------------------------------------------------------------

    def query(self, channel: str) -> defer.Deferred[PresenceReply]:
        """
        C{channel}'s presence on every node now, including every change this
        node saw before the call. Concurrent calls share one Redis query: at
        most one runs per channel, and one more waits for it.
        """
        d: defer.Deferred[PresenceReply] = defer.Deferred()
        slot = self._queries.get(channel)
        if slot is None:
            self._queries[channel] = ([d], [])
            self._run(channel)
        else:
            slot[1].append(d)
        return d

    def _run(self, channel: str) -> None:
        def done(result: Any) -> None:
            now, later = self._queries.pop(channel)
            if later:
                self._queries[channel] = (later, [])
                self._run(channel)
            for d in now:
                d.callback(result) if not isinstance(result, Exception) else d.errback(result)

        def failed(failure: Any) -> None:
            done(failure.value)

        run = defer.ensureDeferred(self.store.query(channel, self._config.presence_max_users))
        run.addCallbacks(done, failed)

    def watch(self, session: Any, channel: str) -> defer.Deferred[None]:
        return self.feed.watch(session, channel)

    def unwatch(self, session: Any, channel: str) -> None:
        self.feed.unwatch(session, channel)

    def forget(self, session: Any) -> None:
        self.feed.forget(session)
