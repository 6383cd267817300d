"""
Everything Redis: the ingest loop (list -> ordered log), the fan-out loop
(log -> hub), client publishes (LPUSH) and health.

Keys, for a queue named Q:
    Q         the list producers LPUSH onto
    Q:log     a stream: the ordered log of every message (offset = entry ID)
    Q:dead    items that could not be delivered, as pushed

Every node blocks on Q with ``BLMOVE Q Q RIGHT RIGHT``, which takes nothing,
then runs move.lua, which pops a batch and appends it to Q:log atomically. So
an item is always either on the list or in the log, in push order, whatever
node dies when. Every node then tails Q:log with XREAD BLOCK and delivers.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from .config import Config, RedisAddress
from .hub import Hub, Message
from .metrics import Stats
from .wire import message_frame, parse_offset

__all__ = ["Bus", "Unavailable"]

_BLOCK_SECONDS = 5
_READ_COUNT = 1000
_MOVE_SCRIPT = resources.files("pushservice").joinpath("move.lua").read_bytes()
_MOVE_SHA = hashlib.sha1(_MOVE_SCRIPT).hexdigest()


class Unavailable(Exception):
    """Redis did not confirm in time."""


def _endpoint(reactor: Any, address: RedisAddress, timeout: float) -> Any:
    from twisted.internet import endpoints, ssl

    if address.unix_path:
        return endpoints.UNIXClientEndpoint(reactor, address.unix_path, timeout=timeout)
    endpoint: Any = endpoints.HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)
    if address.tls:
        trust = None
        if address.tls_ca_file:
            with open(address.tls_ca_file, "rb") as f:
                trust = ssl.Certificate.loadPEM(f.read())
        options = ssl.optionsForClientTLS(address.host, trustRoot=trust)
        endpoint = endpoints.wrapClientTLS(options, endpoint)
    return endpoint


def _connect(reactor: Any, address: RedisAddress, poolsize: int, timeout: float) -> Any:
    """A lazy, self-reconnecting txredisapi factory speaking bytes."""
    import txredisapi

    if address.sentinels:
        # asks the sentinels for the master before every (re)connection, so a failover is followed
        sentinel = txredisapi.Sentinel(list(address.sentinels))
        handler = sentinel.master_for(
            address.service,
            factory_class=_sentinel_factory_class(),
            dbid=address.db,
            poolsize=poolsize,
            isLazy=True,
            charset=None,
            password=address.password,
            username=address.username,
            convertNumbers=False,
        )
        handler._factory.maxDelay = 5
        return _SentinelFactory(handler._factory, sentinel)
    factory = txredisapi.RedisFactory(
        address.describe(),
        address.db,
        poolsize,
        isLazy=True,
        charset=None,
        password=address.password,
        username=address.username,
        convertNumbers=False,
    )
    factory.maxDelay = 5  # resume within seconds once Redis is back
    factory.startConnecting(_endpoint(reactor, address, timeout))
    return factory


def _sentinel_factory_class() -> Any:
    """txredisapi's sentinel factory, whose role check also works with bytes replies (charset=None)."""
    import txredisapi

    class Protocol(txredisapi.SentinelRedisProtocol):  # type: ignore[misc]
        def connectionMade(self) -> Any:
            def check_role(role: list[Any]) -> Any:
                if self.factory.is_master and role[0] not in (b"master", "master"):
                    self.transport.loseConnection()  # not the master (any more): ask the sentinels again
                    return defer.succeed(None)
                return txredisapi.RedisProtocol.connectionMade(self)

            if self.password is not None:
                self.auth(self.password, self.username)
            return self.role().addCallback(check_role)

    class Factory(txredisapi.SentinelConnectionFactory):  # type: ignore[misc]
        protocol = Protocol

    return Factory


class _SentinelFactory:
    """A master's connection factory with the sentinel connections it needs; disconnect() closes both."""

    def __init__(self, factory: Any, sentinel: Any) -> None:
        self._factory = factory
        self._sentinel = sentinel
        self.handler = factory.handler

    def disconnect(self) -> defer.Deferred[Any]:
        return defer.DeferredList([self._factory.disconnect(), self._sentinel.disconnect()], consumeErrors=True)


def _is_connection_error(failure: Any) -> bool:
    import txredisapi

    return bool(failure.check(txredisapi.ConnectionError, defer.CancelledError, defer.TimeoutError))


class Bus:
    """The node's Redis side; start() after construction, stop() to finish."""

    _log = Logger()

    def __init__(
        self, reactor: IReactorTime, config: Config, hub: Hub, stats: Stats, framer: Callable[[bytes], bytes]
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._address = RedisAddress()
        self._hub = hub
        self._stats = stats
        self._framer = framer
        self._stopping = False
        self._factories: list[Any] = []
        self._pool: Any = None  # set by start(); requests before it are unavailable
        self._loops: list[defer.Deferred[None]] = []
        self.last_id = b"0-0"
        self._tail_seen: tuple[bytes | None, float] = (None, 0.0)

    # -- lifecycle ---------------------------------------------------------

    def start(self, address: RedisAddress) -> None:
        self._address = address
        timeout = self._config.redis_timeout
        # one connection: txredisapi picks a pool member at random per command, which would
        # reorder one client's publishes; a single pipelined connection keeps them in order
        self._pool = self._add(_connect(self._reactor, self._address, 1, timeout))
        self._mover = self._add(_connect(self._reactor, self._address, 1, timeout))
        self._tailer = self._add(_connect(self._reactor, self._address, 1, timeout))
        self._loops = [
            defer.ensureDeferred(self._move_loop()),
            defer.ensureDeferred(self._fanout_loop()),
        ]

    def _add(self, factory: Any) -> Any:
        self._factories.append(factory)
        return factory.handler

    def stop(self) -> defer.Deferred[None]:
        """Stop both loops and disconnect. Loses nothing: BLMOVE and XREAD take nothing."""
        self._stopping = True
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        # a coroutine, not a DeferredList chain: DeferredList.cancel() does not reach a Deferred
        # chained to it, so the service's shutdown timeout could not interrupt a hung stop
        await defer.DeferredList([f.disconnect() for f in self._factories], consumeErrors=True)
        # with Redis down, a loop waits for a connection of a factory that disconnect() just
        # stopped: txredisapi never fails that wait, so end it (cancelling takes nothing)
        for loop in self._loops:
            loop.cancel()
        await defer.DeferredList(self._loops, consumeErrors=True)

    # -- the loops ---------------------------------------------------------

    async def _move_loop(self) -> None:
        config = self._config
        # Move nothing before the history is loaded: an item moved earlier would count as
        # history and never reach clients already connected (e.g. a node started while Redis was down).
        await self._hub.when_ready()
        while not self._stopping:
            try:
                tail = await self._mover.execute_command(
                    "BLMOVE", config.queue, config.queue, "RIGHT", "RIGHT", _BLOCK_SECONDS, apply_timeout=False
                )
                while tail is not None and not self._stopping:
                    moved, dead = await self._move_batch()
                    self._redis_back()
                    for reason in dead:
                        self._stats.dead_letters += 1
                        self._log.warn(
                            "moved an item to {dead}: {reason}", dead=config.dead_key, reason=reason.decode()
                        )
                    if moved + len(dead) < config.batch:
                        break
            except Exception:
                await self._after_error("ingest")

    async def _move_batch(self) -> tuple[int, list[bytes]]:
        import txredisapi

        config = self._config
        args = (3, config.queue, config.log_key, config.dead_key, config.batch, config.log_maxlen)
        try:
            moved, dead = await self._mover.execute_command("EVALSHA", _MOVE_SHA, *args)
        except txredisapi.ResponseError as e:
            if "NOSCRIPT" not in str(e):
                raise
            moved, dead = await self._mover.execute_command("EVAL", _MOVE_SCRIPT, *args)
        return int(moved), list(dead)

    async def _fanout_loop(self) -> None:
        await self._load_history()
        self._hub.set_ready()
        config = self._config
        while not self._stopping:
            try:
                reply = await self._tailer.execute_command(
                    "XREAD",
                    "COUNT",
                    _READ_COUNT,
                    "BLOCK",
                    _BLOCK_SECONDS * 1000,
                    "STREAMS",
                    config.log_key,
                    self.last_id,
                    apply_timeout=False,
                )
                self._redis_back()
                if not reply:
                    continue
                entries = reply[0][1]
                batch = [self._message(entry_id, fields) for entry_id, fields in entries]
                self.last_id = entries[-1][0]
                self._stats.messages_in += len(batch)
                self._stats.last_offset_ms = batch[-1].offset[0]
                started = self._reactor.seconds()
                written = self._hub.deliver(batch)
                if written is not None:
                    # what arrives meanwhile waits in Redis and comes as one batch
                    await written
                rest = config.linger - (self._reactor.seconds() - started)
                if rest > 0:
                    # at most one fan-out per linger: each costs a send per connection
                    await deferLater(self._reactor, rest, lambda: None)
            except Exception:
                await self._after_error("fan-out")

    async def _load_history(self) -> None:
        """Fill the replay window from the log, newest last; find where it starts."""
        config = self._config
        while not self._stopping:
            try:
                entries = await self._tailer.execute_command(
                    "XREVRANGE", config.log_key, "+", "-", "COUNT", config.history + 1
                )
                deleted = b"0-0"
                if len(entries) <= config.history:
                    info = await self._tailer.execute_command("XINFO", "STREAM", config.log_key) if entries else []
                    fields = dict(zip(info[::2], info[1::2]))
                    deleted = fields.get(b"max-deleted-entry-id", b"0-0")
                break
            except Exception:
                await self._after_error("history load")
        else:
            return
        self._redis_back()
        history = self._hub.history
        if len(entries) > config.history:
            deleted = entries.pop()[0]
        history.horizon = parse_offset(deleted.decode())
        for entry_id, fields in reversed(entries):
            history.append(self._message(entry_id, fields))
        if entries:
            self.last_id = entries[0][0]
        self._log.info(
            "history: {n} messages from {key}, resuming after {last}",
            n=len(history),
            key=config.log_key,
            last=self.last_id.decode(),
        )

    def _message(self, entry_id: bytes, fields: list[bytes]) -> Message:
        offset_text = entry_id.decode()
        item = dict(zip(fields[::2], fields[1::2]))
        raw = item.get(b"d", b"")
        channel = user = None
        try:
            if item.get(b"k") == b"e":
                envelope = json.loads(raw)
                content = envelope["content"]
                channel, user = envelope.get("channel"), envelope.get("user")
            else:
                content = raw.decode("utf-8")
        except (ValueError, KeyError, TypeError, RecursionError):
            # move.lua vetted it; a disagreement between its JSON and ours lands here
            self._log.warn("log entry {offset} is not what move.lua wrote; delivered as text", offset=offset_text)
            content, channel, user = raw.decode("utf-8", "replace"), None, None
        frame = self._framer(message_frame(content, channel, offset_text))
        return Message(parse_offset(offset_text), channel, user, frame)

    async def _after_error(self, loop: str) -> None:
        from twisted.python.failure import Failure

        failure = Failure()
        if self._stopping:
            return
        if _is_connection_error(failure):
            if self._stats.redis_up:
                self._stats.redis_up = False
                self._log.warn(
                    "lost Redis at {redis} ({why}); reconnecting",
                    redis=self._address.describe(),
                    why=failure.getErrorMessage(),
                )
        else:
            self._log.failure("{loop} loop failed; retrying", failure, loop=loop)
        # the next command waits for the reconnect; this only spaces out retries
        await deferLater(self._reactor, 0.5, lambda: None)

    def _redis_back(self) -> None:
        if not self._stats.redis_up:
            self._stats.redis_up = True
            self._log.info("connected to Redis at {redis}", redis=self._address.describe())

    # -- requests ----------------------------------------------------------

    def _request(self, *command: Any) -> defer.Deferred[Any]:
        """A command on the shared pool that fails with L{Unavailable} past the Redis timeout."""
        if self._pool is None:
            return defer.fail(Unavailable("not connected to Redis yet"))
        d = self._pool.execute_command(*command)
        d.addTimeout(self._config.redis_timeout, self._reactor)

        def unavailable(failure: Any) -> None:
            failure.trap(Exception)
            raise Unavailable(failure.getErrorMessage() or "Redis did not answer in time")

        return d.addErrback(unavailable)

    def publish(self, item: bytes) -> defer.Deferred[Any]:
        """LPUSH C{item} onto the queue; fails with L{Unavailable} if Redis does not confirm."""
        return self._request("LPUSH", self._config.queue, item)

    def ping(self) -> defer.Deferred[bool]:
        """True if Redis answered a PING within the Redis timeout."""
        d = self._request("PING")
        return d.addCallbacks(lambda _: True, lambda _: False)

    async def sample_queue(self) -> None:
        """Update the queue depth and the (approximate) age of its oldest item, for /metrics."""
        queue = self._config.queue
        try:
            depth = await self._request("LLEN", queue)
            tail = await self._request("LINDEX", queue, -1) if depth else None
        except Unavailable:
            self._stats.queue_depth = self._stats.queue_oldest_age = None
            return
        now = time.time()
        seen, since = self._tail_seen
        if tail is None or tail != seen:
            self._tail_seen = (tail, now)
            since = now
        self._stats.queue_depth = int(depth)
        self._stats.queue_oldest_age = now - since if tail is not None else 0.0
