"""
``/metrics`` of every worker, from whichever worker a scrape reaches
(``--workers N``: the workers share one port, so Prometheus reaches one of
them per scrape at random).

Every worker writes its own exposition to Redis every L{SHARE_EVERY}
seconds (``<queue>:metrics:<host>:<parent pid>:<n>``, expiring after
L{KEEP_MS}); a scrape answers with its own, rendered now, merged with its
siblings' latest (each line carries its ``worker`` label, one HELP and TYPE
per family). Redis down: the worker's own lines only.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from .metrics import Stats, render

__all__ = ["KEEP_MS", "SHARE_EVERY", "SharedMetrics", "merge"]

#: Seconds between two writes of a worker's metrics to Redis.
SHARE_EVERY = 1.0
#: How long a written copy lives: a worker gone for this long drops out of the scrapes.
KEEP_MS = 10_000


class _Families(Collector):
    def __init__(self, families: Iterable[Any]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Any]:
        return iter(self._families)


def merge(texts: Iterable[bytes]) -> bytes:
    """Several expositions as one: each family once, with every text's samples."""
    families: dict[str, Any] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            known = families.get(family.name)
            if known is None:
                families[family.name] = family
            else:
                known.samples.extend(family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families.values()))
    return generate_latest(registry)


class SharedMetrics:
    """One worker's part: share its metrics, and answer a scrape with everyone's."""

    def __init__(
        self,
        clock: IReactorTime,
        request: Callable[..., defer.Deferred[Any]],
        stats: Stats,
        queue: str,
        parent_pid: int,
        number: int,
        count: int,
    ) -> None:
        self._request = request
        self._stats = stats
        self._prefix = f"{queue}:metrics:{socket.gethostname()}:{parent_pid}:"
        self._number = number
        self._count = count
        self._loop = LoopingCall(self._share)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(SHARE_EVERY, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _share(self) -> defer.Deferred[Any]:
        key = self._prefix + str(self._number)
        # an error must not end the loop (Redis down: /healthz says so; the next share tries again)
        d = defer.maybeDeferred(self._request, "SET", key, render(self._stats), "PX", KEEP_MS)
        return d.addErrback(lambda _: None)

    async def render(self) -> bytes:
        """This worker's metrics, now, with its siblings' latest."""
        own = render(self._stats)
        keys = [self._prefix + str(n) for n in range(1, self._count + 1) if n != self._number]
        if not keys:
            return own
        try:
            theirs = await self._request("MGET", *keys)
        except Exception:
            return own
        return merge([own, *(text for text in theirs if text)])
