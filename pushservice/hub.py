"""
Connections, subscriptions, the replay history and delivery: no Redis, no
sockets. The bus hands the hub batches of messages in log order; the hub
writes each connection's share of a batch with one ``push`` call.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .metrics import Stats
from .wire import Offset

__all__ = ["History", "Hub", "Message", "Peer", "SLICE"]

#: Connections written per reactor turn: a fan-out never holds the reactor
#: longer than this many sends (~10 us each on loopback).
SLICE = 256


class Peer(Protocol):
    """What the hub needs of a connection."""

    user: str | None
    channels: set[str]

    def push(self, data: bytes) -> None:
        """Queue already-framed bytes for the client (never raises)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One entry of the ordered log, framed once for every receiver."""

    offset: Offset
    channel: str | None
    user: str | None
    frame: bytes


class History:
    """The most recent messages, bounded by count and bytes, for replay."""

    def __init__(self, count: int, max_bytes: int) -> None:
        self._items: deque[Message] = deque()
        self._count = count
        self._max_bytes = max_bytes
        self._bytes = 0
        #: Newest offset no longer held: replay from before it is incomplete.
        self.horizon: Offset = (0, 0)
        #: Newest offset seen.
        self.last: Offset = (0, 0)

    def __len__(self) -> int:
        return len(self._items)

    def append(self, message: Message) -> None:
        self._items.append(message)
        self._bytes += len(message.frame)
        self.last = message.offset
        while len(self._items) > self._count or (self._bytes > self._max_bytes and len(self._items) > 1):
            old = self._items.popleft()
            self._bytes -= len(old.frame)
            self.horizon = old.offset

    def after(self, since: Offset) -> tuple[bool, list[Message]]:
        """Messages newer than C{since}, oldest first, and whether that is all of them."""
        newer: list[Message] = []
        for message in reversed(self._items):
            if message.offset <= since:
                break
            newer.append(message)
        newer.reverse()
        return since >= self.horizon, newer


class Hub:
    """Who is connected, who listens to what, and delivery of log batches."""

    _log = Logger()

    def __init__(self, history: History, stats: Stats, clock: IReactorTime) -> None:
        self._clock = clock
        self.history = history
        self.stats = stats
        self.peers: set[Peer] = set()
        self._by_channel: dict[str, set[Peer]] = {}
        self._by_user: dict[str, set[Peer]] = {}
        # Peers that resumed from an offset this node has not reached yet.
        self._floors: dict[Peer, Offset] = {}
        self._ready = False
        self._waiting: list[Deferred[None]] = []

    # -- lifecycle ---------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready

    def set_ready(self) -> None:
        """The history is loaded: replays may run and live delivery begins."""
        self._ready = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def when_ready(self) -> Deferred[None]:
        if self._ready:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    # -- membership --------------------------------------------------------

    def add(self, peer: Peer) -> None:
        self.peers.add(peer)
        if peer.user is not None:
            self._by_user.setdefault(peer.user, set()).add(peer)

    def remove(self, peer: Peer) -> None:
        self.peers.discard(peer)
        self._floors.pop(peer, None)
        for channel in peer.channels:
            self._leave(self._by_channel, channel, peer)
        if peer.user is not None:
            self._leave(self._by_user, peer.user, peer)

    def set_user(self, peer: Peer, user: str | None) -> None:
        if peer.user is not None:
            self._leave(self._by_user, peer.user, peer)
        peer.user = user
        if user is not None and peer in self.peers:
            self._by_user.setdefault(user, set()).add(peer)

    @staticmethod
    def _leave(index: dict[str, set[Peer]], key: str, peer: Peer) -> None:
        members = index.get(key)
        if members is not None:
            members.discard(peer)
            if not members:
                del index[key]

    def subscribe(self, peer: Peer, channel: str) -> None:
        peer.channels.add(channel)
        self._by_channel.setdefault(channel, set()).add(peer)

    def unsubscribe(self, peer: Peer, channel: str) -> None:
        peer.channels.discard(channel)
        self._leave(self._by_channel, channel, peer)

    def subscribers(self, channel: str) -> int:
        return len(self._by_channel.get(channel, ()))

    # -- replay ------------------------------------------------------------

    def replay(self, peer: Peer, since: Offset, channels: Iterable[str] | None, broadcasts: bool) -> tuple[bool, bytes]:
        """
        The framed messages after C{since} that C{peer} should have had on
        C{channels} (and broadcasts, if asked), and whether the history
        reached back that far. Call it in the same reactor turn as the
        subscription it completes, so no live message falls in between.
        """
        wanted = set(peer.channels if channels is None else channels)
        recovered, newer = self.history.after(since)
        frames = [
            m.frame
            for m in newer
            if (m.channel in wanted if m.channel is not None else broadcasts)
            and (m.user is None or m.user == peer.user)
        ]
        if since > self.history.last:
            # this node lags the one the client came from: skip what it saw
            self._floors[peer] = max(since, self._floors.get(peer, since))
        return recovered, b"".join(frames)

    # -- delivery ----------------------------------------------------------

    def deliver(self, batch: list[Message]) -> Deferred[None] | None:
        """
        Send a batch of log messages, in order, with one write per connection.
        Consecutive broadcasts are joined once and shared by every connection.

        Who gets what is decided now, with the history, so a replay and this
        batch never overlap; the writes go out C{SLICE} connections per
        reactor turn. Returns a Deferred that fires when they are all written
        (None if that is already so): read the next batch only then, and
        everything that arrived meanwhile comes as one batch, one write each.
        """
        history = self.history
        for message in batch:
            history.append(message)
        peers = self.peers
        if not peers:
            return None
        if not self._floors and all(m.channel is None and m.user is None for m in batch):
            blob = batch[0].frame if len(batch) == 1 else b"".join(m.frame for m in batch)
            self.stats.delivered(len(batch) * len(peers), len(blob) * len(peers))
            return self._write(list(peers), blob, None)
        return self._deliver_mixed(batch)

    def _write(self, peers: list[Peer], blob: bytes | None, parts: list[bytes] | None) -> Deferred[None] | None:
        """Push C{blob} (or C{parts[i]}) to every C{peers[i]}, a slice per reactor turn."""
        if len(peers) <= SLICE:
            self._write_slice(peers, blob, parts, 0, None)
            return None
        done: Deferred[None] = Deferred()
        self._write_slice(peers, blob, parts, 0, done)
        return done

    def _write_slice(
        self, peers: list[Peer], blob: bytes | None, parts: list[bytes] | None, start: int, done: Deferred[None] | None
    ) -> None:
        end = start + SLICE
        try:
            if blob is not None:
                for peer in peers[start:end]:
                    peer.push(blob)
            else:
                assert parts is not None
                for peer, data in zip(peers[start:end], parts[start:end]):
                    peer.push(data)
        except Exception:
            self._log.failure("delivery failed; going on with the next connections")
        if end < len(peers):
            self._clock.callLater(0, self._write_slice, peers, blob, parts, end, done)
        elif done is not None:
            done.callback(None)

    def _deliver_mixed(self, batch: list[Message]) -> Deferred[None] | None:
        # consecutive messages to the same audience are joined once and shared, like broadcasts
        runs: list[tuple[Message, list[bytes]]] = []
        for message in batch:
            last = runs[-1][0] if runs else None
            if last is not None and not self._floors and (last.channel, last.user) == (message.channel, message.user):
                runs[-1][1].append(message.frame)
            else:
                runs.append((message, [message.frame]))
        out: dict[Peer, list[bytes]] = {}
        count = 0
        for first, frames in runs:
            blob = frames[0] if len(frames) == 1 else b"".join(frames)
            targets = self._targets(first)
            for peer in targets:
                out.setdefault(peer, []).append(blob)
            count += len(frames) * len(targets)
        joined = [parts[0] if len(parts) == 1 else b"".join(parts) for parts in out.values()]
        self._lift_floors()
        self.stats.delivered(count, sum(map(len, joined)))
        return self._write(list(out), None, joined)

    def _targets(self, message: Message) -> Collection[Peer]:
        targets: Collection[Peer]
        if message.channel is not None:
            targets = self._by_channel.get(message.channel, ())
            if message.user is not None:
                targets = [p for p in targets if p.user == message.user]
        elif message.user is not None:
            targets = self._by_user.get(message.user, ())
        else:
            targets = self.peers
        if self._floors:
            floors = self._floors
            targets = [p for p in targets if p not in floors or message.offset > floors[p]]
        return targets

    def _lift_floors(self) -> None:
        last = self.history.last
        for peer, floor in list(self._floors.items()):
            if last >= floor:
                del self._floors[peer]
