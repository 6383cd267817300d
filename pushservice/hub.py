"""
Connections, subscriptions and delivery of log batches: no Redis, no
sockets. The tailer hands the hub batches of messages in log order; the hub
appends them to the history and hands each live connection its share with
one write (see L{pushservice.outbox} for connections that are not live).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from .fanout import FanOut, Peer
from .history import History
from .logentry import Message
from .metrics import Stats
from .outbox import Outbox
from .wire import Offset

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["Hub", "Membership", "Peer"]


class Membership(Protocol):
    """What is told who listens to what at every change (L{pushservice.presencebook})."""

    def joined(self, user: str | None, channels: Iterable[str]) -> None: ...

    def left(self, user: str | None, channels: Iterable[str]) -> None: ...


class _Nobody:
    """The membership of a hub without presence: nothing is told."""

    def joined(self, user: str | None, channels: Iterable[str]) -> None:
        pass

    def left(self, user: str | None, channels: Iterable[str]) -> None:
        pass


class Hub:
    """Who is connected, who listens to what, and delivery of log batches."""

    def __init__(self, history: History, stats: Stats, clock: IReactorTime, slow_seconds: float) -> None:
        self._clock = clock
        self.history = history
        self.stats = stats
        self._slow_seconds = slow_seconds
        self.peers: set[Peer] = set()
        self._by_channel: dict[str, set[Peer]] = {}
        self._by_user: dict[str, set[Peer]] = {}
        self._paused: set[Outbox] = set()
        self._waiting: set[Outbox] = set()
        self._fanout = FanOut(clock, self._targets, stats)
        self._ready = False
        self._when_ready: list[Deferred[None]] = []
        self._sweep = LoopingCall(self._drop_stalled)
        self._sweep.clock = clock
        #: told who listens to what, at every change; the service sets a presence book
        self.membership: Membership = _Nobody()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._sweep.start(1.0, now=False)

    def stop(self) -> None:
        if self._sweep.running:
            self._sweep.stop()

    def set_ready(self) -> None:
        """The history is loaded: replays may run and live delivery begins."""
        self._ready = True
        waiting, self._when_ready = self._when_ready, []
        for d in waiting:
            d.callback(None)

    @property
    def ready(self) -> bool:
        """The history is loaded."""
        return self._ready

    def when_ready(self) -> Deferred[None]:
        if self._ready:
            return succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._when_ready.remove(d) if d in self._when_ready else None)
        self._when_ready.append(d)
        return d

    # -- membership --------------------------------------------------------

    def add(self, peer: Peer) -> None:
        """A connection joins with its user and channels, live from the newest message on."""
        self.peers.add(peer)
        peer.outbox.caught_up_to = self.history.last
        if peer.user is not None:
            self._by_user.setdefault(peer.user, set()).add(peer)
        for channel in peer.channels:
            self._by_channel.setdefault(channel, set()).add(peer)
        self.membership.joined(peer.user, peer.channels)

    def remove(self, peer: Peer) -> None:
        self.peers.discard(peer)
        self._paused.discard(peer.outbox)
        self._waiting.discard(peer.outbox)
        for channel in peer.channels:
            self._leave(self._by_channel, channel, peer)
        if peer.user is not None:
            self._leave(self._by_user, peer.user, peer)
        self.membership.left(peer.user, peer.channels)
        peer.outbox.close()

    def set_user(self, peer: Peer, user: str | None) -> None:
        self._audience_changes(peer)
        if peer in self.peers:
            self.membership.left(peer.user, peer.channels)
            self.membership.joined(user, peer.channels)
        if peer.user is not None:
            self._leave(self._by_user, peer.user, peer)
        peer.user = user
        if user is not None and peer in self.peers:
            self._by_user.setdefault(user, set()).add(peer)

    def subscribe(self, peer: Peer, channel: str) -> None:
        self._audience_changes(peer)
        if channel not in peer.channels:
            self.membership.joined(peer.user, (channel,))
        peer.channels.add(channel)
        self._by_channel.setdefault(channel, set()).add(peer)

    def unsubscribe(self, peer: Peer, channel: str) -> None:
        self._audience_changes(peer)
        if channel in peer.channels:
            self.membership.left(peer.user, (channel,))
        peer.channels.discard(channel)
        self._leave(self._by_channel, channel, peer)

    def subscribers(self, channel: str) -> int:
        return len(self._by_channel.get(channel, ()))

    def census(self) -> dict[str, int]:
        """What the hub holds, by kind: for /metrics and for leak checks."""
        return {
            "peers": len(self.peers),
            "channels": len(self._by_channel),
            "subscriptions": sum(len(members) for members in self._by_channel.values()),
            "users": len(self._by_user),
            "paused": len(self._paused),
            "waiting": len(self._waiting),
        }

    @staticmethod
    def _leave(index: dict[str, set[Peer]], key: str, peer: Peer) -> None:
        members = index.get(key)
        if members is not None:
            members.discard(peer)
            if not members:
                del index[key]

    def _audience_changes(self, peer: Peer) -> None:
        # a share of the batch being written was cut for the old audience: skip it, catch up instead
        position = self.position_of(peer)
        if peer in self.peers and position < self.history.last:
            peer.outbox.behind(position)

    # -- places in the log -------------------------------------------------

    def position_of(self, peer: Peer) -> int:
        """The history index up to which everything for C{peer} has been handed to it."""
        outbox = peer.outbox
        if not outbox.live:
            return outbox.cursor - 1
        pending = self._fanout.pending_from(peer)
        return self.history.last if pending is None else pending - 1

    def resume(self, peer: Peer, since: Offset) -> bool:
        """
        Replay to C{peer} what it should have had after C{since} (not newer than
        the history), then go on live. Whether that is complete.
        """
        recovered, start = self.history.recovery(since)
        if start is not None:
            peer.outbox.behind(start - 1)
        return recovered

    def replay_channel(self, peer: Peer, channel: str, start: int) -> None:
        """Replay C{channel}'s messages from history index C{start} up to C{peer}'s place, before the rest."""
        position = self.position_of(peer)
        if start <= position:
            peer.outbox.behind(position)
            peer.outbox.replay(start, position, channel)

    def skip_until(self, peer: Peer, offset: Offset, channel: str | None) -> None:
        """C{peer} saw messages up to C{offset} (of C{channel}, or all) on a node ahead of this one."""
        peer.outbox.backlog().skip_until(offset, channel)
        peer.outbox.behind(self.position_of(peer))

    # -- slow connections ------------------------------------------------------

    def paused(self, outbox: Outbox, paused: bool) -> None:
        if paused:
            self._paused.add(outbox)
        else:
            self._paused.discard(outbox)

    def wait_for_log(self, outbox: Outbox) -> None:
        """Pump C{outbox} again once the next batch arrives."""
        self._waiting.add(outbox)

    def _drop_stalled(self) -> None:
        now = self._clock.seconds()
        for outbox in list(self._paused):
            outbox.check(now, self._slow_seconds)

    # -- delivery ----------------------------------------------------------

    def deliver(self, batch: list[Message]) -> Deferred[None] | None:
        """Append a batch to the history, write each live connection its share; fires when all are written (or None)."""
        history = self.history
        first = history.next
        for message in batch:
            history.append(message)
        waiting, self._waiting = self._waiting, set()
        for outbox in waiting:
            outbox.wake()
        if not self.peers:
            return None
        return self._fanout.write(batch, first, history.last)

    def _targets(self, message: Message) -> Collection[Peer]:
        """The peers a message is for, from the indexes."""
        if message.channel is not None:
            targets: Collection[Peer] = self._by_channel.get(message.channel, ())
            if message.user is not None:
                targets = [p for p in targets if p.user == message.user]
            return targets
        if message.user is not None:
            return self._by_user.get(message.user, ())
        return self.peers
