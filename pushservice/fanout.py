"""
Writing a batch to every connection it is for: each live connection gets its
share with one write, a slice of connections per reactor turn. No Redis, no
sockets, no membership: the hub says who a message is for.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter
from socket import socket
from time import perf_counter
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .deflate import deflated_join
from .logentry import Message
from .metrics import Stats
from .outbox import Outbox

__all__ = ["SHARE_LIMIT", "SLICE", "SLICE_SECONDS", "FanOut", "Peer"]

#: Connections written per reactor turn at most (~3-10 us a send on loopback)...
SLICE = 1024
#: ...and seconds: a turn ends early when its sends took this long, checked every
#: CHECK_EVERY connections (a turn per slice costs a reactor iteration for nothing
#: when the sends are quick and nothing else waits).
SLICE_SECONDS = 0.004
CHECK_EVERY = 128
#: A connection's share of a mixed batch is joined into one write up to this
#: size; a bigger share is read from history instead (no per-connection copy).
SHARE_LIMIT = 64 * 1024

_DIRECT = attrgetter("outbox.direct")
_DEFLATE = attrgetter("outbox.deflate")
_SEND = socket.send


def _split(
    peers: list[Peer], sockets: list[Any], keep: list[bool] | None
) -> tuple[list[Peer], list[Any], list[Peer], list[Any]]:
    """C{peers} and their C{sockets} where C{keep} is true, then where it is false (None: all kept)."""
    if keep is None:
        return peers, sockets, [], []
    return (
        [p for p, k in zip(peers, keep) if k],
        [s for s, k in zip(sockets, keep) if k],
        [p for p, k in zip(peers, keep) if not k],
        [s for s, k in zip(sockets, keep) if not k],
    )


class Peer(Protocol):
    """What the hub and the fan-out need of a connection."""

    user: str | None
    channels: set[str]
    outbox: Outbox


@dataclass
class _Batch:
    """A batch being written over several reactor turns."""

    id: int
    first: int  # history indices of its messages
    last: int
    peers: list[Peer]
    blob: bytes | None  # the shared write of a batch for one audience (everyone, a channel, a user)...
    count: int
    shares: dict[Peer, tuple[bytes, int] | None] | None  # ...or each peer's (None: too big, catch up)
    messages: list[Message]
    packed: bytes | None = None  # the shared blob compressed, once a compressing peer needed it
    written: int = 0  # peers[:written] have been handed their share (or skipped)
    _index: dict[Peer, int] | None = None

    def done_with(self, peer: Peer) -> bool:
        """Whether C{peer}'s share of this batch was handed to it (or it was skipped)."""
        if peer.outbox.batch_done == self.id:
            return True
        if self.shares is not None:
            return peer not in self.shares
        if self._index is None:  # made only when asked during a batch written over several turns
            self._index = {p: i for i, p in enumerate(self.peers)}
        return self._index.get(peer, -1) < self.written


class FanOut:
    """Writes batches to live connections, a slice per reactor turn; knows which batch is half written."""

    _log = Logger()

    def __init__(self, clock: IReactorTime, targets: Callable[[Message], Collection[Peer]], stats: Stats) -> None:
        self._clock = clock
        self._targets = targets
        self._stats = stats
        self._inflight: _Batch | None = None
        self._batches = 0

    def write(self, batch: list[Message], first: int, last: int) -> Deferred[None] | None:
        """
        Write C{batch} (history indices C{first}..C{last}) to its live
        connections, in order, one write each; consecutive messages to one
        audience are joined once and shared. A Deferred that fires when all
        are written (None if that is already so): read the next batch only
        then, and everything that arrived meanwhile comes as one batch.
        """
        self._batches += 1
        head = batch[0]
        if all(m.channel == head.channel and m.user == head.user for m in batch):  # one audience: one blob
            blob = head.frame if len(batch) == 1 else b"".join(m.frame for m in batch)
            peers = list(self._targets(head))
            return self._write(_Batch(self._batches, first, last, peers, blob, len(batch), None, batch))
        shares = self._shares(batch)
        return self._write(_Batch(self._batches, first, last, list(shares), None, 0, shares, batch))

    def pending_from(self, peer: Peer) -> int | None:
        """The first history index of the half-written batch if C{peer}'s share of it is not written yet."""
        batch, outbox = self._inflight, peer.outbox
        if batch is not None and outbox.live and outbox.caught_up_to < batch.first and not batch.done_with(peer):
            return batch.first
        return None

    def _shares(self, batch: list[Message]) -> dict[Peer, tuple[bytes, int] | None]:
        # consecutive messages to the same audience are joined once and shared, like broadcasts
        runs: list[list[Message]] = []
        for message in batch:
            last = runs[-1][0] if runs else None
            if last is not None and (last.channel, last.user) == (message.channel, message.user):
                runs[-1].append(message)
            else:
                runs.append([message])
        out: dict[Peer, list[tuple[bytes, int]]] = {}
        for run in runs:
            blob = run[0].frame if len(run) == 1 else b"".join(m.frame for m in run)
            packed = None  # the run compressed, once a compressing peer needs it
            for peer in self._targets(run[0]):
                if peer.outbox.deflate:
                    packed = packed or deflated_join(run)
                    out.setdefault(peer, []).append((packed, len(run)))
                else:
                    out.setdefault(peer, []).append((blob, len(run)))
        shares: dict[Peer, tuple[bytes, int] | None] = {}
        for peer, parts in out.items():
            if len(parts) == 1:
                shares[peer] = parts[0]
            elif sum(len(blob) for blob, _ in parts) <= SHARE_LIMIT:
                shares[peer] = (b"".join(blob for blob, _ in parts), sum(n for _, n in parts))
            else:
                shares[peer] = None
        return shares

    def _write(self, batch: _Batch) -> Deferred[None] | None:
        if len(batch.peers) <= CHECK_EVERY:
            self._write_peers(batch, 0, len(batch.peers))
            return None
        done: Deferred[None] = Deferred()
        self._inflight = batch
        self._write_slice(batch, 0, done)
        return None if done.called else done

    def _write_slice(self, batch: _Batch, start: int, done: Deferred[None] | None) -> None:
        peers, end, deadline = batch.peers, start, perf_counter() + SLICE_SECONDS
        stop = min(start + SLICE, len(peers))
        while end < stop:
            end, begin = min(end + CHECK_EVERY, stop), end
            self._write_peers(batch, begin, end)
            batch.written = end
            if perf_counter() >= deadline:
                break
        if end < len(peers):
            self._clock.callLater(0, self._write_slice, batch, end, done)
        elif done is not None:
            self._inflight = None
            done.callback(None)

    def _write_peers(self, batch: _Batch, start: int, end: int) -> None:
        first, bid, blob, shares = batch.first, batch.id, batch.blob, batch.shares
        peers = batch.peers[start:end]
        written = count = size = packed = 0
        if blob is not None:
            # the connections that take the shared blob straight to their socket, in one C-level loop each
            sockets = list(map(_DIRECT, peers))
            direct, sockets, peers, _ = _split(
                peers, sockets, [s is not None for s in sockets] if None in sockets else None
            )
            compressing = list(map(_DEFLATE, direct))
            if True in compressing:
                batch.packed = batch.packed or deflated_join(batch.messages)
                direct, sockets, deflating, packed_sockets = _split(direct, sockets, [not c for c in compressing])
                packed = self._send_direct(deflating, packed_sockets, batch.packed, bid)
            written = self._send_direct(direct, sockets, blob, bid)
        for peer in peers:
            outbox = peer.outbox
            # skipped: not live (it catches up from history), or it already caught up past this batch
            if not outbox.live or outbox.caught_up_to >= first or outbox.batch_done == bid:
                continue
            outbox.batch_done = bid
            try:
                if blob is not None:
                    if outbox.deflate:
                        batch.packed = batch.packed or deflated_join(batch.messages)
                        outbox.offer(batch.packed)
                        packed += 1
                    else:
                        outbox.offer(blob)
                        written += 1
                else:
                    assert shares is not None
                    share = shares[peer]
                    if share is None:
                        outbox.behind(first - 1)  # counted as it catches up
                    else:
                        outbox.offer(share[0])
                        count += share[1]
                        size += len(share[0])
            except Exception:
                self._log.failure("delivery to one connection failed; going on with the next")
        if blob is not None:
            count, size = (written + packed) * batch.count, written * len(blob) + packed * len(batch.packed or b"")
        self._stats.delivered(count, size)

    @staticmethod
    def _send_direct(peers: list[Peer], sockets: list[socket], blob: bytes, bid: int) -> int:
        """Send C{blob} to each of C{sockets} (of C{peers}); what a socket did not take goes to its outbox."""
        taken: list[int] = []
        while len(taken) < len(sockets):
            try:
                taken.extend(map(_SEND, sockets[len(taken) :] if taken else sockets, repeat(blob)))
            except OSError:
                taken.append(0)  # EAGAIN, or a broken connection that Twisted will find and report
        if taken.count(len(blob)) != len(taken):
            for peer, sent in zip(peers, taken):
                if sent != len(blob):
                    peer.outbox.batch_done = bid  # handed its share: a pause while queuing the rest must know
                    peer.outbox.offer(blob, sent)
        return len(sockets)
