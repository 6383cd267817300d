"""Test helpers: an in-process node, and an Autobahn WebSocket client with bounded waits."""

from __future__ import annotations

import json
import time
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from pushservice.config import Config, parse_redis_url
from pushservice.service import PushService

TIMEOUT = 10.0


def timed(d: Any, seconds: float = TIMEOUT) -> Any:
    """A Deferred (or coroutine) that fails with TimeoutError after C{seconds}."""
    return (
        defer.ensureDeferred(d).addTimeout(seconds, reactor)
        if not isinstance(d, defer.Deferred)
        else d.addTimeout(seconds, reactor)
    )


async def until(predicate: Any, timeout: float = TIMEOUT, what: str = "condition", interval: float = 0.02) -> float:
    """Poll C{predicate} while the reactor runs; return the seconds it took, fail after C{timeout}."""
    from twisted.internet.task import deferLater

    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not true after {timeout}s")
        await deferLater(reactor, interval, lambda: None)
    return time.monotonic() - start


class Node:
    """A PushService started in this process, on a free port."""

    def __init__(self, redis_url: str, queue: str, **overrides: Any) -> None:
        overrides.setdefault("redis", parse_redis_url(redis_url))
        self.config = Config(listen=("tcp:0:interface=127.0.0.1",), queue=queue, **overrides)
        self.service = PushService(self.config)

    async def start(self) -> None:
        self.service.startService()
        await timed(self.hub.when_ready())

    @property
    def running(self) -> Any:
        return self.service.parts

    @property
    def hub(self) -> Any:
        return self.running.hub

    @property
    def stats(self) -> Any:
        return self.running.factory.node.stats

    @property
    def port(self) -> int:
        return int(self.running.ports[0].getHost().port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.service.running:
            await timed(self.service.stopService(), 30)


class Refused(Exception):
    """The server closed before the WebSocket opened."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason or ""


class Client(WebSocketClientProtocol):
    """Collects every frame; `await next()` takes them in order, with a timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: defer.DeferredQueue[dict[str, Any]] = defer.DeferredQueue()
        self.opened: defer.Deferred[None] = defer.Deferred()
        self.closed: defer.Deferred[tuple[int | None, str | None]] = defer.Deferred()
        self.raw: list[bytes] = []

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.raw.append(payload)
        self.frames.put(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(Refused(code, reason))
        if not self.closed.called:
            self.closed.callback((code, reason))

    def send(self, frame: Any) -> None:
        self.sendMessage(json.dumps(frame).encode() if not isinstance(frame, bytes) else frame)

    async def next(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        return await timed(self.frames.get(), timeout)  # type: ignore[no-any-return]

    async def next_of(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next frame of type C{kind}, failing on any other frame first."""
        frame = await self.next(timeout)
        assert frame["type"] == kind, frame
        return frame

    async def messages(self, n: int, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        return [await self.next_of("message", timeout) for _ in range(n)]

    async def request(self, frame: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
        self.send(frame)
        return await self.next(timeout)

    def pending(self) -> int:
        return len(self.frames.pending)

    async def close(self) -> None:
        if self.state == self.STATE_OPEN:
            self.sendClose(1000)
        await timed(self.closed, 5)


async def connect(
    port: int, query: str = "", headers: dict[str, str] | None = None, timeout: float = TIMEOUT
) -> Client:
    """Open a WebSocket to the node; raises L{Refused} if the handshake is refused."""
    url = f"ws://127.0.0.1:{port}/" + (f"?{query}" if query else "")
    factory = WebSocketClientFactory(url, headers=headers or {})
    factory.protocol = Client
    protocol = await timed(TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory), timeout)
    await timed(protocol.opened, timeout)
    return protocol  # type: ignore[no-any-return]
