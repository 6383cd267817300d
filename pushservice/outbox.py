"""
One connection's output, with bounded memory whatever the client does.

A connection is I{live} while it takes what is sent: the hub hands it its
share of each batch and it goes straight to the socket. When its socket is
full (Twisted pauses it), or a replay or an audience change needs its stream
rebuilt, it stops being live and keeps only its I{place}: the index of the
next history message it has not had. When the socket drains it catches up
from the node's shared history, a piece at a time, and is live again once it
reaches the newest message. So the node never queues more than
C{--slow-client-bytes} for a connection beyond what its socket took, and a
client that reads slower than a burst arrives is not dropped: it is dropped
only when its place falls out of the history window, or it takes nothing for
C{--slow-client-seconds}.

Pure of sockets: it writes through a L{Sink} and reads the time from a clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IReactorTime

from .backlog import Backlog

if TYPE_CHECKING:
    from .hub import Hub, Peer

__all__ = ["Outbox", "Sink"]

#: Bytes one connection may write in one reactor turn while catching up: the others get theirs.
TURN = 256 * 1024
#: The smallest queue bound: twice Twisted's pause threshold (FileDescriptor.bufferSize, 64 KiB).
MIN_LIMIT = 128 * 1024


class Sink(Protocol):
    """Where an outbox writes: a connection's transport."""

    def send_now(self, data: bytes | memoryview) -> int:
        """Bytes the socket took at once (0 when they must go through the transport)."""

    def queued(self) -> int:
        """Bytes the transport holds for the socket."""

    def write(self, data: bytes) -> None:
        """Queue bytes on the transport; it may pause the outbox before returning."""

    def drop_slow(self, why: str) -> None:
        """Close the connection as a slow consumer."""

    def direct_socket(self) -> Any:
        """The socket the fan-out may write to itself while nothing else is written (None: never)."""


@dataclass
class _Range:
    """History messages to replay for one channel: indices C{start} to C{end} inclusive."""

    start: int
    end: int
    channel: str


class Outbox:
    """One connection's output: live writes, or its place in history and a catch-up (slots: memory per connection)."""

    __slots__ = tuple(
        "_peer _sink _hub _clock _limit _queue _backlog _pumping _closed "
        "live paused paused_at cursor caught_up_to batch_done deflate direct".split()
    )

    def __init__(
        self, peer: Peer, sink: Sink, hub: Hub, clock: IReactorTime, limit: int, deflate: bool = False
    ) -> None:
        self._peer = peer
        self._sink = sink
        self._hub = hub
        self._clock = clock
        self._limit = max(limit, MIN_LIMIT)  # above Twisted's pause threshold, or a full socket would spin
        self._queue: deque[bytes | memoryview | _Range] | None = None
        self._backlog: Backlog | None = None  # made when it first has to catch up
        self._pumping: Any = None
        self._closed = False
        #: Written to as the hub delivers (True), or catching up from C{cursor} (False).
        self.live = True
        self.paused = False
        self.paused_at = 0.0
        #: While not live: the next history index this connection has not had.
        self.cursor = 0
        #: History index it last caught up to; batches up to it are not written again.
        self.caught_up_to = -1
        #: Id of the last batch whose share was handed to it.
        self.batch_done = -1
        #: It negotiated permessage-deflate: messages go to it as their compressed frames (pushservice.deflate).
        self.deflate = deflate
        #: The socket the fan-out writes shares to itself: set when one went whole, cleared by what could pass it.
        self.direct: Any = None

    # -- from the hub ------------------------------------------------------------

    def offer(self, data: bytes, sent: int | None = None) -> None:
        """A live connection's share of a batch (counted by the caller): to the socket, the rest queued."""
        if sent is None:
            sent = self._sink.send_now(data)  # live, so not paused (C{sent}: the fan-out sent it already)
        if sent != len(data):
            self._keep_first(self._write_rest(data, sent))
        else:
            self.direct = self._sink.direct_socket()

    def send(self, data: bytes) -> None:
        """A reply or notice: now, or after what is already queued."""
        if self.live and not self.paused and not self._queue:
            self._keep_first(self._write(data))
        else:
            self._enqueue(data)
            self.wake()

    def behind(self, position: int) -> None:
        """Stop being live; catch up from the message after history index C{position}."""
        self.direct = None
        if self.live:
            self.live = False
            self.cursor = position + 1
        self.wake()

    def replay(self, start: int, end: int, channel: str) -> None:
        """Queue the history messages of C{channel} from index C{start} to C{end}, before the rest."""
        if start <= end:
            self._enqueue(_Range(start, end, channel))
        self.wake()

    def backlog(self) -> Backlog:
        """What this connection reads from history while it catches up (made when first needed)."""
        if self._backlog is None:
            self._backlog = Backlog(self._hub, self._peer, self.deflate)
        return self._backlog

    def close(self) -> None:
        self._closed = True
        self.direct = None
        self.live = False  # a batch being written skips it
        self._queue = None
        if self._pumping is not None and self._pumping.active():
            self._pumping.cancel()
        self._pumping = None

    # -- from the transport (IPushProducer, through the connection) ------------

    def pause(self) -> None:
        self.paused = True
        self.paused_at = self._clock.seconds()
        self._hub.paused(self, True)
        if self.live:
            self.behind(self._hub.position_of(self._peer))

    def resume(self) -> None:
        self.paused = False
        self._hub.paused(self, False)
        self.wake()

    def check(self, now: float, max_paused: float) -> None:
        """Drop the connection if it has taken nothing for longer than C{max_paused} seconds."""
        if self.paused and now - self.paused_at > max_paused:
            self._drop(f"took nothing for {now - self.paused_at:.0f}s")

    # -- writing -------------------------------------------------------------------

    def _write(self, data: bytes | memoryview) -> memoryview | None:
        """Hand C{data} to the socket, or to the transport up to the limit; the rest, if any."""
        sent = 0 if self.paused else self._sink.send_now(data)
        return None if sent == len(data) else self._write_rest(data, sent)

    def _write_rest(self, data: bytes | memoryview, sent: int) -> memoryview | None:
        """What the socket did not take of C{data}: to the transport up to the limit; the rest, if any."""
        sink = self._sink
        self.direct = None  # bytes wait in the transport: nothing may pass them
        rest = memoryview(data)[sent:]
        room = self._limit - sink.queued()
        if len(rest) <= room:
            sink.write(data if sent == 0 and isinstance(data, bytes) else bytes(rest))
            return None
        if room > 0:
            sink.write(bytes(rest[:room]))  # over the transport's buffer size: it pauses us
            rest = rest[room:]
        return rest

    def _keep_first(self, rest: memoryview | None) -> None:
        """Keep the unsent rest of a write, if any, at the front; the connection catches up after it."""
        if rest is None:
            return
        self._enqueue(rest, front=True)
        if self.live:
            self.behind(self._hub.position_of(self._peer))

    def _enqueue(self, item: bytes | memoryview | _Range, front: bool = False) -> None:
        if self._queue is None:
            self._queue = deque()
        if front:
            self._queue.appendleft(item)
        else:
            self._queue.append(item)

    def _dequeue(self) -> None:
        assert self._queue is not None
        self._queue.popleft()
        if not self._queue:
            self._queue = None  # an empty deque is 760 bytes; most connections never queue anything

    def wake(self) -> None:
        """Pump in the next reactor turn (the log moved on, a write was queued, the socket drained)."""
        if self._pumping is None and not self.paused and not self._closed:
            self._pumping = self._clock.callLater(0, self._pump)

    def _pump(self) -> None:
        """Write what is queued, then catch up from history, until paused or a turn's worth is written."""
        self._pumping = None
        budget = TURN
        while budget > 0 and not self.paused and not self._closed:
            piece = self._next_piece()
            if piece is None:
                return
            budget -= len(piece)
            self._keep_first(self._write(piece))  # the unsent rest goes first
        self.wake()

    def _next_piece(self) -> bytes | memoryview | None:
        """The next bytes to write: queued data, a replay piece, a catch-up piece; None when caught up."""
        history = self._hub.history
        while self._queue:
            head = self._queue[0]
            if not isinstance(head, _Range):
                self._dequeue()
                return head
            if head.start < history.first:
                self._drop("fell behind the history window")
                return None
            head.start, piece = self.backlog().gather(head.start, head.end, head.channel)
            if head.start > head.end:
                self._dequeue()
            if piece:
                return piece
        if self.live:
            return None
        if self.cursor < history.first:
            self._drop("fell behind the history window")
            return None
        if self.cursor >= history.next:
            self._caught_up()
            return None
        self.cursor, piece = self.backlog().gather(self.cursor, history.last, None)
        return piece if piece else self._next_piece()

    def _caught_up(self) -> None:
        if self._backlog is not None and not self._backlog.settled():
            self._hub.wait_for_log(self)  # pumped again when the log moves on
            return
        self.live = True
        self.caught_up_to = self._hub.history.last

    def _drop(self, why: str) -> None:
        if not self._closed:
            self.close()
            self._sink.drop_slow(why)
