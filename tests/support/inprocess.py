"""A node started in this process, on a free loopback port: its live parts are public (L{PushService.parts})."""

from __future__ import annotations

from typing import Any

from pushservice.config import Config, parse_redis_url
from pushservice.metrics import Stats
from pushservice.service import Parts, PushService

from .waiting import timed, until

__all__ = ["InProcessNode"]


class InProcessNode:
    """A L{PushService} in this process, listening on 127.0.0.1 on a port the kernel picks."""

    def __init__(self, redis_url: str, queue: str, **overrides: Any) -> None:
        overrides.setdefault("redis", parse_redis_url(redis_url))
        overrides.setdefault("listen", ("tcp:0:interface=127.0.0.1",))
        self.config = Config(queue=queue, **overrides)
        self.service = PushService(self.config)

    async def start(self) -> None:
        """
        Start the service and wait (bounded) until its history is loaded and
        it calls itself healthy, as /healthz would: every Redis connection
        up, the loops running.
        """
        self.service.startService()
        await timed(self.hub.when_ready())
        await until(lambda: self.parts.bus.health() is None, what="the node healthy")

    @property
    def parts(self) -> Parts:
        """The started service's parts (ports, hub, bus, factory)."""
        parts = self.service.parts
        assert parts is not None, "the node is not started"
        return parts

    @property
    def hub(self) -> Any:
        return self.parts.hub

    @property
    def stats(self) -> Stats:
        return self.parts.factory.node.stats  # type: ignore[no-any-return]

    @property
    def port(self) -> int:
        return int(self.parts.ports[0].getHost().port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """Stop the service (bounded), if it runs."""
        if self.service.running:
            await timed(self.service.stopService(), 30)
