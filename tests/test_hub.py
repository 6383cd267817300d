"""
Routing, history, replay and slow connections in the hub and the outbox,
without a network: connections write into a simulated socket that fills,
pauses its producer past 64 KiB queued, and drains when the client reads.
"""

from __future__ import annotations

import random

from twisted.internet.task import Clock

from pushservice import fanout
from pushservice.fanout import CHECK_EVERY, SLICE
from pushservice.history import History
from pushservice.hub import Hub
from pushservice.logentry import Message, gap_message
from pushservice.metrics import Stats
from pushservice.outbox import Outbox

BUFFER_SIZE = 65536  # Twisted's FileDescriptor.bufferSize
LIMIT = 256 * 1024


class SimulatedConnection:
    """A peer with a socket that takes C{room} bytes until its client reads, and Twisted's pause/resume."""

    def __init__(self, hub: Hub, clock: Clock, user: str | None = None, room: int = 10**12) -> None:
        self.user = user
        self.channels: set[str] = set()
        self.room = room
        self.received = bytearray()  # what the client has read or the kernel holds for it
        self.buffer = bytearray()  # the transport's user-space buffer
        self.paused = False
        self.dropped: str | None = None
        self.writes = 0
        self.peak = 0
        self.outbox = Outbox(self, self, hub, clock, LIMIT)

    # Sink
    def send_now(self, data: bytes | memoryview) -> int:
        if self.buffer:
            return 0
        taken = min(len(data), self.room)
        self.room -= taken
        self.received += data[:taken]
        self.writes += 1
        return taken

    def direct_socket(self) -> None:
        return None  # no socket: every share goes through send_now

    def queued(self) -> int:
        return len(self.buffer)

    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.writes += 1
        self.buffer += data
        self._flush()
        self.peak = max(self.peak, len(self.buffer))
        if len(self.buffer) > BUFFER_SIZE and not self.paused:
            self.paused = True
            self.outbox.pause()

    def drop_slow(self, why: str) -> None:
        self.dropped = why

    # the client
    def read(self, size: int) -> None:
        self.room += size
        self._flush()
        if not self.buffer and self.paused:
            self.paused = False
            self.outbox.resume()

    def _flush(self) -> None:
        taken = min(self.room, len(self.buffer))
        self.received += self.buffer[:taken]
        del self.buffer[:taken]
        self.room -= taken

    def frames(self) -> list[bytes]:
        return (
            [f"<{part}>".encode() for part in self.received.decode().strip("<>").split("><")] if self.received else []
        )


def msg(n: int, channel: str | None = None, user: str | None = None, size: int = 0) -> Message:
    return Message((1000, n), channel, user, f"<{n}{'.' * size}>".encode(), seq=n)


def make_hub(count: int = 1000, max_bytes: int = 10**8) -> tuple[Hub, Clock]:
    clock = Clock()
    return Hub(History(count, max_bytes), Stats(), clock, slow_seconds=10), clock


def run(clock: Clock) -> None:
    """Run everything due now (slices, pumps), as the reactor would in its next turns."""
    for _ in range(100000):
        if not any(call.getTime() <= clock.seconds() for call in clock.getDelayedCalls()):
            return
        clock.advance(0)
    raise AssertionError("calls keep coming")


def connect(hub: Hub, clock: Clock, *channels: str, user: str | None = None, room: int = 10**12) -> SimulatedConnection:
    conn = SimulatedConnection(hub, clock, user, room)
    conn.channels.update(channels)
    hub.add(conn)
    return conn


def numbers(conn: SimulatedConnection) -> list[int]:
    return [int(f[1:-1].rstrip(b".")) for f in conn.frames()]


# -- routing --------------------------------------------------------------------------


def test_broadcast_batch_is_one_write_per_peer():
    """A batch of broadcasts reaches every peer in order with a single write each."""
    hub, clock = make_hub()
    peers = [connect(hub, clock) for _ in range(3)]
    hub.deliver([msg(1), msg(2), msg(3)])
    for p in peers:
        assert bytes(p.received) == b"<1><2><3>" and p.writes == 1
    assert hub.stats.deliveries == 9


def test_channels_and_users_route_only_to_their_peers():
    """Channel messages go to subscribers, user messages to that user, in batch order, one write each."""
    hub, clock = make_hub()
    news, alice, idle = connect(hub, clock, "news"), connect(hub, clock, "news", user="alice"), connect(hub, clock)
    hub.deliver([msg(1), msg(2, "news"), msg(3, None, "alice"), msg(4, "news", "alice"), msg(5, "other"), msg(6)])
    assert numbers(news) == [1, 2, 6]
    assert numbers(alice) == [1, 2, 3, 4, 6]
    assert numbers(idle) == [1, 6]
    assert all(p.writes == 1 for p in (news, alice, idle))


def test_unsubscribe_and_remove_clean_the_index():
    """After unsubscribe and remove, nothing is routed to a peer and no index entry is left."""
    hub, clock = make_hub()
    a, b = connect(hub, clock, "x"), connect(hub, clock, "x", user="u")
    hub.unsubscribe(a, "x")
    assert hub.subscribers("x") == 1
    hub.remove(b)
    assert hub.subscribers("x") == 0 and hub.peers == {a}
    hub.deliver([msg(1, "x"), msg(2, None, "u")])
    assert a.received == b"" and b.received == b""


def test_large_fan_out_is_written_a_slice_per_reactor_turn(monkeypatch):
    """More than SLICE peers are written over several reactor turns; the Deferred fires when all are."""
    monkeypatch.setattr(fanout, "perf_counter", lambda: 0.0)  # however quick the sends
    hub, clock = make_hub()
    peers = [connect(hub, clock) for _ in range(SLICE * 2 + 1)]
    done = hub.deliver([msg(1)])
    assert done is not None and not done.called
    assert sum(1 for p in peers if p.received) == SLICE
    run(clock)
    assert done.called and all(p.received == b"<1>" for p in peers)


def test_consecutive_messages_to_one_audience_are_joined_once():
    """A mixed batch joins runs to one audience into one blob, shared (the same object) by its peers."""
    hub, clock = make_hub()
    a, b = connect(hub, clock, "c"), connect(hub, clock, "c")
    hub.deliver([msg(1, "c"), msg(2, "c"), msg(3, "c"), msg(4, "d")])
    assert a.writes == b.writes == 1 and numbers(a) == numbers(b) == [1, 2, 3]


# -- history and recovery -------------------------------------------------------------


def test_history_is_bounded_by_count_and_bytes():
    """The history keeps the newest messages within both bounds; the horizon is the newest one dropped."""
    history = History(3, 10**6)
    for n in range(1, 6):
        history.append(msg(n))
    assert (history.first, history.next, history.horizon) == (2, 5, (1000, 2))
    small = History(100, 12)
    for n in range(1, 6):
        small.append(msg(n, size=2))  # 5 bytes each
    assert len(small) == 2 and small.horizon == (1000, 3)


def test_recovery_is_truthful():
    """Complete only from an offset that was issued and is held; never across a gap."""
    history = History(3, 10**6)
    for n in range(1, 6):
        history.append(msg(n))  # holds 3, 4, 5; horizon 2
    assert history.recovery((1000, 2)) == (True, 2)  # the horizon itself: all after it are held
    assert history.recovery((1000, 4)) == (True, 4)
    assert history.recovery((1000, 5)) == (True, 5)  # nothing to replay
    assert history.recovery((1000, 1)) == (False, 2)  # older than the history: what is held, and say so
    assert history.recovery((999, 9)) == (False, 2)
    assert history.recovery((1000, 3)) == (True, 3)
    fresh = History(10, 10**6)
    assert fresh.recovery((0, 0)) == (True, 0)  # since=0 on a log that never dropped anything
    for n in (10, 20, 30):
        fresh.append(msg(n))
    assert fresh.recovery((1000, 15)) == (False, None)  # never issued: no replay
    assert fresh.recovery((0, 0)) == (True, 0)
    fresh.append(gap_message((1000, 40), "trimmed", 3, lambda p: p))
    fresh.append(msg(40))
    assert fresh.recovery((1000, 20)) == (False, 2)  # across the gap
    assert fresh.recovery((1000, 40)) == (True, 5)


# -- slow connections ------------------------------------------------------------------


def test_a_full_socket_keeps_its_place_and_catches_up_in_order():
    """A connection whose socket fills stops being written; once its client reads, it gets the rest, in order, once."""
    hub, clock = make_hub()
    fast = connect(hub, clock)
    slow = connect(hub, clock, room=1000)
    for n in range(1, 401):
        hub.deliver([msg(n, size=1000)])
        run(clock)
    assert not slow.outbox.live and slow.peak <= LIMIT + 2000
    assert numbers(fast) == list(range(1, 401))
    for _ in range(1000):
        slow.read(100_000)
        run(clock)
        if slow.outbox.live:
            break
    assert numbers(slow) == list(range(1, 401)) and slow.dropped is None
    hub.deliver([msg(401)])
    slow.read(10**9)
    assert numbers(slow)[-1] == 401


def test_readers_slower_than_bursts_are_never_dropped_or_given_duplicates():
    """Random reads interleaved with random batches (broadcast and channel): every reader gets exactly its stream."""
    rnd = random.Random(7)
    hub, clock = make_hub(count=5000)
    conns = [connect(hub, clock, *(["a"] if i % 2 else []), room=rnd.randint(0, 50000)) for i in range(20)]
    n = 0
    for _ in range(300):
        batch = []
        for _ in range(rnd.randint(1, 20)):
            n += 1
            batch.append(msg(n, rnd.choice([None, None, "a", "b"]), size=rnd.randint(0, 3000)))
        hub.deliver(batch)
        for c in rnd.sample(conns, 5):
            c.read(rnd.randint(0, 200_000))
        run(clock)
    for c in conns:
        c.read(10**9)
    run(clock)
    everything = [m.offset[1] for m in (hub.history[i] for i in range(hub.history.first, hub.history.next))]
    for i, c in enumerate(conns):
        wanted = [k for k in everything if hub.history[k - 1].channel in (None, "a" if i % 2 else None)]
        assert numbers(c) == wanted and c.dropped is None
        assert c.peak <= LIMIT + 4000


def test_falling_out_of_the_history_window_drops_the_connection():
    """A connection whose place is no longer in the history is dropped (it will reconnect with since)."""
    hub, clock = make_hub(count=10)
    slow = connect(hub, clock, room=0)
    for n in range(1, 100):
        hub.deliver([msg(n, size=20000)])
        run(clock)
    slow.read(10**9)
    run(clock)
    assert slow.dropped == "fell behind the history window"


def test_a_client_that_never_reads_is_dropped_after_slow_seconds():
    """Paused longer than --slow-client-seconds: dropped by the sweep, even if nothing more is sent."""
    hub, clock = make_hub()
    hub.start()
    slow = connect(hub, clock, room=0)
    hub.deliver([msg(1, size=100_000)])
    assert slow.paused
    clock.advance(9.5)
    assert slow.dropped is None
    clock.advance(1)
    assert slow.dropped is not None and "took nothing" in slow.dropped
    hub.stop()


def test_memory_per_connection_is_bounded_by_the_limit():
    """However big the backlog, a connection never has more than the limit queued (plus one socket write)."""
    hub, clock = make_hub(count=100000, max_bytes=10**9)
    slow = connect(hub, clock, room=0)
    big = msg(0, size=3 * LIMIT)  # one frame bigger than the limit: written a piece at a time
    hub.deliver([big])
    for n in range(1, 200):
        hub.deliver([msg(n, size=50_000)])
        run(clock)
    assert slow.peak <= LIMIT + 2
    for _ in range(200):
        slow.read(LIMIT)
        run(clock)
    assert numbers(slow) == list(range(0, 200)) and slow.peak <= LIMIT + 2


def test_slow_sends_end_a_reactor_turn_early(monkeypatch):
    """When sends take longer than SLICE_SECONDS, a turn ends after CHECK_EVERY peers; later turns write the rest."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(fanout, "perf_counter", lambda: next(ticks) * fanout.SLICE_SECONDS)
    hub, clock = make_hub()
    peers = [connect(hub, clock) for _ in range(CHECK_EVERY * 3)]
    done = hub.deliver([msg(1)])
    assert done is not None and sum(1 for p in peers if p.received) == CHECK_EVERY
    run(clock)
    assert done.called and all(p.received == b"<1>" for p in peers)


def test_quick_sends_write_a_whole_slice_in_one_turn(monkeypatch):
    """Up to SLICE peers whose sends are quick are all written at once: no reactor turn in between."""
    monkeypatch.setattr(fanout, "perf_counter", lambda: 0.0)
    hub, clock = make_hub()
    peers = [connect(hub, clock) for _ in range(CHECK_EVERY * 3)]
    assert hub.deliver([msg(1)]) is None
    assert all(p.received == b"<1>" for p in peers)


# -- joining mid-stream ------------------------------------------------------------------


def test_subscribe_with_since_while_a_batch_is_half_written():
    """A subscribe with since between two slices of a batch neither reorders nor duplicates for that connection."""
    hub, clock = make_hub()
    peers = [connect(hub, clock) for _ in range(SLICE * 2)]
    hub.deliver([msg(1), msg(2, "news")])
    run(clock)
    hub.deliver([msg(3, "news"), msg(4), msg(5, "news")])  # only the first slice is written now
    late = next(p for p in peers if p.received == b"<1>")
    recovered, start = hub.history.recovery((1000, 1))
    hub.subscribe(late, "news")
    assert start is not None and recovered
    hub.replay_channel(late, "news", start)
    run(clock)
    assert numbers(late) == [1, 2, 3, 4, 5]
    hub.deliver([msg(6, "news")])
    assert numbers(late) == [1, 2, 3, 4, 5, 6]


def test_resume_from_a_node_ahead_skips_what_was_seen():
    """A client that saw up to 5 on a node ahead gets nothing up to 5 here, then everything after."""
    hub, clock = make_hub()
    hub.deliver([msg(1), msg(2)])
    conn = connect(hub, clock, "c")
    hub.skip_until(conn, (1000, 5), None)
    for n in range(3, 9):
        hub.deliver([msg(n, "c" if n % 2 else None)])
        run(clock)
    assert numbers(conn) == [6, 7, 8] and conn.outbox.live


def test_resume_replays_the_full_stream_then_live():
    """resume() replays broadcasts, the user's and the channels' messages after since, then goes live."""
    hub, clock = make_hub()
    hub.deliver([msg(1), msg(2, "c"), msg(3, None, "u"), msg(4, "d"), msg(5, None, "v")])
    conn = connect(hub, clock, "c", user="u")
    assert hub.resume(conn, (1000, 1)) is True
    hub.deliver([msg(6)])
    run(clock)
    assert numbers(conn) == [2, 3, 6]
