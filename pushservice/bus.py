"""
Everything Redis, in front: the node's connections (three, and the Pub/Sub one of
presence, L{pushservice.presence}), its two loops
(L{pushservice.mover}: list -> log; L{pushservice.tailer}: log -> hub), the
requests of clients (publish, offsets) and health.

Keys, for a queue named Q:
    Q               the list producers LPUSH onto
    Q:log           a stream: the ordered log of every message (offset = entry ID)
    Q:dead          items that could not be delivered, as pushed (the newest --dead-maxlen)
    Q:seq           the last sequence number given to a log entry
    Q:nodes         ids of the nodes reading the log; Q:node:<id> is a node's place, with a TTL
    Q:presence...   presence (see L{pushservice.presencestore})
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .config import Config, RedisAddress
from .hub import Hub
from .ingest import IngestRules
from .metrics import Stats
from .mover import BLOCK_SECONDS, Mover
from .redislink import RedisLink, Unavailable
from .tailer import Tailer
from .wire import Offset, format_offset

__all__ = ["Bus", "Unavailable"]

#: The most /healthz waits for Redis' PING: load balancers give up after about a second.
HEALTH_PING_SECONDS = 0.8


class Bus:
    """The node's Redis side; start() after construction, stop() to finish."""

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        config: Config,
        hub: Hub,
        stats: Stats,
        framer: Callable[[bytes], bytes],
        rules: IngestRules,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._hub = hub
        self._stats = stats
        self._framer = framer
        self._rules = rules
        self._address = RedisAddress()
        self._links: list[RedisLink] = []
        self._pubsub: list[RedisLink] = []
        self._requests: RedisLink | None = None  # set by start(); requests before it are unavailable
        self._loops: list[defer.Deferred[None]] = []
        self._moving = False
        self._ever_up = False
        self._tail_seen: tuple[bytes | None, float] = (None, 0.0)
        self.node_id = uuid.uuid4().hex[:12]
        self.mover: Mover | None = None
        self.tailer: Tailer | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self, address: RedisAddress) -> None:
        config, reactor = self._config, self._reactor
        self._address = address
        timeout = config.redis_timeout
        # one connection for requests: a client's publishes keep their order on it
        self._requests = self._link(timeout)
        mover_link = self._link(BLOCK_SECONDS + timeout)
        tailer_link = self._link(BLOCK_SECONDS + timeout)
        self.mover = Mover(reactor, mover_link, config, self._rules, self._stats)
        self.tailer = Tailer(
            reactor,
            tailer_link,
            self.request,
            self._requests.when_up,
            config,
            self._hub,
            self._stats,
            self._framer,
            self._rules,
            self.node_id,
        )
        for link in self._links:
            link.start()
        self._loops = [defer.ensureDeferred(self.tailer.run(self._start_moving))]
        self._reactor.callLater(timeout, self._still_down)

    def _still_down(self) -> None:
        if not self._ever_up and self._requests is not None:
            self._log.warn(
                "cannot reach Redis at {redis} ({why}); still trying",
                redis=self._address.describe(),
                why=self._requests.last_error,
            )

    def _link(self, reply_timeout: float) -> RedisLink:
        link = RedisLink(self._reactor, self._address, reply_timeout, self._config.redis_timeout, self._link_changed)
        self._links.append(link)
        return link

    def pubsub_link(
        self, on_message: Callable[[bytes, bytes], None], on_change: Callable[[RedisLink], None]
    ) -> RedisLink:
        """
        A further connection, in Pub/Sub mode (presence events), started now and
        stopped with the others. It has no reply deadline (messages come when
        they come; its user pings it) and is not part of L{health}: presence
        is not what the node is for.
        """
        link = RedisLink(self._reactor, self._address, None, self._config.redis_timeout, on_change, on_message)
        self._pubsub.append(link)
        link.start()
        return link

    def _start_moving(self) -> None:
        # Move nothing before the history is loaded: an item moved earlier would count as
        # history and never reach clients already connected (e.g. a node started while Redis was down).
        assert self.mover is not None
        self._moving = True
        self._loops.append(defer.ensureDeferred(self.mover.run()))

    def stop(self) -> defer.Deferred[None]:
        """Stop both loops, give up this node's place, disconnect. Loses nothing: BLMOVE and XREAD take nothing."""
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self.mover is not None:
            self.mover.stop()
        if self.tailer is not None:
            await self.tailer.stop().addTimeout(self._config.redis_timeout, self._reactor).addErrback(lambda _: None)
        # a coroutine, not a DeferredList chain: DeferredList.cancel() does not reach a Deferred
        # chained to it, so the service's shutdown timeout could not interrupt a hung stop
        await defer.DeferredList([link.stop() for link in self._links + self._pubsub], consumeErrors=True)
        for loop in self._loops:
            loop.cancel()
        await defer.DeferredList(self._loops, consumeErrors=True)

    # -- state -----------------------------------------------------------------

    def _link_changed(self, link: RedisLink) -> None:
        """One line when Redis is lost, one when it is back: not one per connection or attempt."""
        up = all(link.up for link in self._links)
        if up == self._stats.redis_up:
            return
        self._stats.redis_up = up
        where = self._address.describe()
        if up:
            self._log.info("connected to Redis at {redis}", redis=where)
            self._ever_up = True
        elif self._ever_up:
            self._log.warn("lost Redis at {redis} ({why}); reconnecting", redis=where, why=link.last_error)

    def health(self) -> str | None:
        """Why this node cannot serve right now, or None: Redis lost, loops not ready or stuck."""
        if not self._stats.redis_up:
            return "Redis unavailable"
        if self.tailer is None or self.mover is None or not self._moving:
            return "loading history"
        for progress in (self.mover.progress, self.tailer.progress):
            stalled = progress.stalled_for()
            if stalled > self._config.stall_timeout:
                return f"{progress.name} loop made no progress for {stalled:.0f}s"
        return None

    # -- requests ----------------------------------------------------------

    def request(self, *command: Any) -> defer.Deferred[Any]:
        """A command on the request connection; fails with L{Unavailable} when Redis is down or slow."""
        if self._requests is None:
            return defer.fail(Unavailable("not connected to Redis yet"))
        d = self._requests.command(*command)
        d.addTimeout(self._config.redis_timeout, self._reactor)

        def unavailable(failure: Any) -> None:
            failure.trap(Exception)
            raise Unavailable(failure.getErrorMessage() or "Redis did not answer in time")

        return d.addErrback(unavailable)

    def publish(self, *items: bytes) -> defer.Deferred[Any]:
        """LPUSH C{items} (in this order, in one command) onto the queue; fails with L{Unavailable} if Redis does not confirm."""
        return self.request("LPUSH", self._config.queue, *items)

    def ping(self) -> defer.Deferred[bool]:
        """True if Redis answers a PING within a second (what /healthz can afford)."""
        if self._requests is None or not self._requests.up:
            return defer.succeed(False)
        d = self._requests.command("PING")
        d.addTimeout(min(HEALTH_PING_SECONDS, self._config.redis_timeout), self._reactor)
        return d.addCallbacks(lambda _: True, lambda _: False)

    def offset_exists(self, offset: Offset) -> defer.Deferred[bool]:
        """Whether the log holds an entry at exactly C{offset} (one this deployment issued and still keeps)."""
        text = format_offset(offset)
        d = self.request("XRANGE", self._config.log_key, text, text, "COUNT", 1)
        return d.addCallback(bool)

    async def sample_queue(self) -> None:
        """
        Update the queue depth and how long the queue has gone without an
        item moved (the age of its oldest item, near enough), for /metrics:
        LLEN and the log's sequence counter, never the items themselves.
        """
        config = self._config
        try:
            depth = await self.request("LLEN", config.queue)
            moved = await self.request("GET", config.seq_key) if depth else None
        except Unavailable:
            self._stats.queue_depth = self._stats.queue_oldest_age = None
            return
        now = time.time()
        seen, since = self._tail_seen
        if not depth or moved != seen:
            self._tail_seen = (moved, now)
            since = now
        self._stats.queue_depth = int(depth)
        self._stats.queue_oldest_age = now - since
