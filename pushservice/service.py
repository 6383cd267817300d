"""
The node: starts Redis access, the hub and the listeners in order, and stops
them in the reverse order with a bound (one service, because MultiService
stops its children all at once).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from .config import Config

__all__ = ["Parts", "PushService"]


def _with_backlog(description: str, backlog: int) -> str:
    """Add C{backlog} to a tcp/ssl/unix endpoint string that sets none."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl", "unix") and "backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description


class Parts:
    """The live objects of a started service; never pickled."""

    def __init__(self) -> None:
        self.ports: list[Any] = []
        self.local_redis: Any = None
        self.hub: Any = None
        self.bus: Any = None
        self.factory: Any = None
        self.streams: Any = None
        self.startup: defer.Deferred[None] | None = None


class PushService(Service):
    """One pushservice node. Holds only its Config until started, so a .tap can pickle it."""

    _log = Logger()

    def __init__(self, config: Config) -> None:
        self.config = config
        self.name = "pushservice"
        self._running: Parts | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_running", "running")}
        state["_running"] = None
        return state

    @property
    def parts(self) -> Parts | None:
        """The live objects of the started service (ports, hub, bus, factory), or None when stopped: for embedding and tests."""
        return self._running

    def privilegedStartService(self) -> None:
        """Bind the ports and read keys and the token secret before twistd drops privileges (--uid)."""
        super().privilegedStartService()
        self._prepare()

    def _prepare(self) -> None:
        from twisted.internet import reactor

        from .auth import AuthError, Policy
        from .bus import Bus
        from .history import History
        from .http import PortFactory
        from .hub import Hub
        from .ingest import IngestRules
        from .limits import AddressLimits
        from .presence import Presence
        from .publish import Publish
        from .session import Node
        from .strictjson import JSONRules
        from .web import make_site
        from .websocket import PushFactory
        from .wire import text_frame

        config = self.config
        run = self._running = Parts()
        stats = self._make_stats()
        rules = JSONRules(config.max_json_depth, config.max_number_length)
        hub = Hub(History(config.history, config.history_bytes), stats, reactor, config.slow_client_seconds)
        run.hub = hub
        run.bus = bus = Bus(reactor, config, hub, stats, text_frame, IngestRules(rules, config.max_item_size))
        verifier = self._token_verifier()

        def verify(token: str) -> Any:
            if verifier is None:
                raise AuthError("tokens are not enabled on this server")
            return verifier.verify(token)

        presence = Presence(reactor, config, bus)
        hub.membership = presence.book
        node = Node(reactor, config, hub, bus, stats, Policy(config.client_publish), rules, verify, presence)
        addresses = AddressLimits(reactor, config)
        run.factory = factory = PushFactory(node, addresses)
        site = make_site(
            bus, stats, config.demo, Publish(node) if verifier is not None else None, self._metrics(bus, stats)
        )
        port = PortFactory(reactor, factory, site, addresses, config)
        run.streams = port.streams
        self._listen(reactor, port)

    def _make_stats(self) -> Any:
        """The node's counters (pushservice.worker labels them with the worker's number)."""
        from .metrics import Stats

        return Stats()

    def _metrics(self, bus: Any, stats: Any) -> Any:
        """What /metrics answers (None: this node's own metrics; a worker answers with all workers')."""
        return None

    def _token_verifier(self) -> Any:
        """The token verifier, or None without --token-secret-file (a worker is handed the secret instead)."""
        from .auth import TokenVerifier

        path = self.config.token_secret_file
        return TokenVerifier.from_file(path) if path else None

    def startService(self) -> None:
        from twisted.internet import reactor

        if self._running is None:  # started without twistd's privileged step (tests, embedding)
            self._prepare()
        super().startService()
        assert self._running is not None
        self._running.startup = defer.ensureDeferred(self._connect(reactor, self._running))
        self._running.startup.addErrback(self._startup_failed, reactor)

    def _listen(self, reactor: Any, site: Any) -> None:
        """Listen on every endpoint now, so a port in use fails twistd at startup."""
        from twisted.internet import endpoints

        assert self._running is not None
        for description in self.config.listen:
            failures: list[Any] = []
            d = endpoints.serverFromString(reactor, _with_backlog(description, self.config.backlog)).listen(site)
            d.addCallbacks(self._running.ports.append, failures.append)
            if failures:
                for port in self._running.ports:
                    port.stopListening()
                failures[0].raiseException()
            address = self._running.ports[-1].getHost()
            self._log.info("listening on {address}", address=address)
            if getattr(address, "port", None):
                host = address.host if address.host not in ("0.0.0.0", "::") else "127.0.0.1"
                self._log.info("demo page: http://{host}:{port}/", host=host, port=address.port)

    async def _connect(self, reactor: Any, run: Parts) -> None:
        address = self.config.redis
        if address is None:
            from .localredis import LocalRedis

            run.local_redis = LocalRedis(reactor)
            address = await run.local_redis.start()
        run.hub.start()
        run.bus.start(address)
        run.factory.node.presence.start()

    def _startup_failed(self, failure: Any, reactor: Any) -> None:
        self._log.critical("cannot start: {why}", why=failure.getErrorMessage())
        reactor.stop()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        run, self._running = self._running, None
        if run is None:
            return defer.succeed(None)
        from twisted.internet import reactor

        # A timer of its own, not addTimeout: cancelling a coroutine only reaches the Deferred it
        # awaits, and a DeferredList (bus.stop) whose members ignore cancel() never fires.
        timeout = self.config.shutdown_timeout
        done: defer.Deferred[None] = defer.Deferred()

        def expired() -> None:
            self._log.warn("shutdown took over {t}s; exiting anyway", t=timeout)
            done.callback(None)

        def finished(_: object) -> None:
            if timer.active():
                timer.cancel()
                done.callback(None)

        timer = reactor.callLater(timeout, expired)
        d = defer.ensureDeferred(self._stop(run))
        d.addErrback(lambda f: self._log.failure("shutdown failed", f))
        d.addBoth(finished)
        return done

    async def _stop(self, run: Parts) -> None:
        """Stop accepting, close clients with 1001 (event streams with a close event), stop the Redis loops, then Redis."""
        await defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in run.ports])
        clients = [*run.factory.connections(), *run.streams.connections()]
        closed: list[defer.Deferred[None]] = [defer.Deferred() for _ in clients]
        for client, d in zip(clients, closed):
            client.is_closed.addBoth(lambda _, d=d: d.callback(None))
            client.close_for_shutdown()
        self._log.info("stopping: closing {n} connections", n=len(clients))
        await defer.DeferredList(closed)
        await run.factory.node.presence.stop()  # the closed connections' leaves, written
        run.hub.stop()
        await run.bus.stop()
        if run.local_redis is not None:
            await run.local_redis.stop()
        self._log.info("stopped")
