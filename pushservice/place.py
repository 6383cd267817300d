"""
This node's place in the log, kept in Redis so the movers never trim past
what it has not read: ``<queue>:node:<id>`` holds the last sequence number
it read (0 holds the whole log), with a TTL of --node-ttl, refreshed while
the node runs; ``<queue>:nodes`` names the nodes (step.lua drops those whose
key expired).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from .config import Config

__all__ = ["Place"]

#: At most one write per this many seconds while reading (it only has to beat the TTL).
REPORT_EVERY = 1.0


class Place:
    """Writes where this node is in the log, with a TTL, often enough and no more."""

    def __init__(
        self,
        clock: IReactorTime,
        request: Callable[..., defer.Deferred[Any]],
        config: Config,
        node_id: str,
        read: Callable[[], int],
    ) -> None:
        """@param read: the number of the last entry read (0 before any)."""
        self._clock = clock
        self._request = request
        self._key = config.node_key_prefix + node_id
        self._nodes_key = config.nodes_key
        self._node_id = node_id
        self._ttl_ms = int(config.node_ttl * 1000)
        self._read = read
        self._reported = 0.0
        self._refresh = LoopingCall(self.report)
        self._refresh.clock = clock
        self._every = min(10.0, config.node_ttl / 3)

    async def hold_everything(self) -> None:
        """Before the node knows its place: place 0, so nothing is trimmed meanwhile."""
        await self._request("SET", self._key, 0, "PX", self._ttl_ms)
        await self._request("SADD", self._nodes_key, self._node_id)

    def keep_fresh(self) -> None:
        """Write the place now, and again before the TTL runs out, until L{give_up}."""
        self._refresh.start(self._every, now=True)

    def moved(self) -> None:
        """The node read further: write it, at most once a second."""
        if self._clock.seconds() - self._reported >= REPORT_EVERY:
            self.report()

    def report(self) -> defer.Deferred[Any]:
        self._reported = self._clock.seconds()
        d = self._request("SET", self._key, self._read(), "PX", self._ttl_ms)
        d.addCallback(lambda _: self._request("SADD", self._nodes_key, self._node_id))
        return d.addErrback(lambda _: None)  # Redis down: the loops say so; the TTL decides

    def give_up(self) -> defer.Deferred[Any]:
        """The node stops: its place no longer holds the log."""
        if self._refresh.running:
            self._refresh.stop()
        d = self._request("DEL", self._key)
        d.addCallback(lambda _: self._request("SREM", self._nodes_key, self._node_id))
        return d.addErrback(lambda _: None)
