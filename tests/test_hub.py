"""Routing, history and replay in the hub, without a network."""

from __future__ import annotations

from twisted.internet.task import Clock

from pushservice.hub import SLICE, History, Hub, Message
from pushservice.metrics import Stats


class FakePeer:
    """A connection as the hub sees it: records every write."""

    def __init__(self, user: str | None = None) -> None:
        self.user = user
        self.channels: set[str] = set()
        self.writes: list[bytes] = []

    def push(self, data: bytes) -> None:
        self.writes.append(data)

    @property
    def received(self) -> bytes:
        return b"".join(self.writes)


def msg(n: int, channel: str | None = None, user: str | None = None) -> Message:
    return Message((1000, n), channel, user, f"<{n}>".encode())


def make_hub(count: int = 100, max_bytes: int = 10**6, clock: Clock | None = None) -> Hub:
    return Hub(History(count, max_bytes), Stats(), clock or Clock())


def test_broadcast_batch_is_one_write_per_peer():
    """A batch of broadcasts reaches every peer in order with a single write each."""
    hub = make_hub()
    peers = [FakePeer() for _ in range(3)]
    for p in peers:
        hub.add(p)
    hub.deliver([msg(1), msg(2), msg(3)])
    for p in peers:
        assert p.writes == [b"<1><2><3>"]
    assert hub.stats.deliveries == 9


def test_channels_and_users_route_only_to_their_peers():
    """Channel messages go to subscribers, user messages to that user, in batch order."""
    hub = make_hub()
    news, alice, idle = FakePeer(), FakePeer("alice"), FakePeer()
    for p in (news, alice, idle):
        hub.add(p)
    hub.subscribe(news, "news")
    hub.subscribe(alice, "news")
    hub.deliver([msg(1), msg(2, "news"), msg(3, None, "alice"), msg(4, "news", "alice"), msg(5, "other"), msg(6)])
    assert news.received == b"<1><2><6>"
    assert alice.received == b"<1><2><3><4><6>"
    assert idle.received == b"<1><6>"
    assert all(len(p.writes) == 1 for p in (news, alice, idle))


def test_unsubscribe_and_remove_clean_the_index():
    """Leaving a channel or disconnecting leaves no trace in the indexes."""
    hub = make_hub()
    p = FakePeer("bob")
    hub.add(p)
    hub.subscribe(p, "a")
    hub.unsubscribe(p, "a")
    hub.deliver([msg(1, "a")])
    assert p.writes == [] and hub.subscribers("a") == 0
    hub.subscribe(p, "b")
    hub.remove(p)
    assert hub.subscribers("b") == 0 and not hub.peers and not hub._by_user


def test_history_is_bounded_by_count_and_bytes():
    """The history keeps the newest messages within both bounds and moves its horizon."""
    history = History(3, 10**6)
    for n in range(1, 6):
        history.append(msg(n))
    assert len(history) == 3 and history.horizon == (1000, 2)
    by_bytes = History(100, 8)
    for n in range(1, 6):
        by_bytes.append(msg(n))
    assert len(by_bytes) == 2 and by_bytes.horizon == (1000, 3)


def test_replay_returns_missed_messages_and_whether_complete():
    """Replay after an offset gives the wanted messages in order; too old means not recovered."""
    hub = make_hub(count=4)
    p = FakePeer()
    hub.add(p)
    hub.deliver([msg(1), msg(2, "news"), msg(3, "x"), msg(4), msg(5, "news")])
    recovered, data = hub.replay(p, (1000, 2), ["news"], broadcasts=True)
    assert recovered and data == b"<4><5>"
    recovered, data = hub.replay(p, (1000, 2), ["news"], broadcasts=False)
    assert recovered and data == b"<5>"
    recovered, data = hub.replay(p, (1000, 0), ["news"], broadcasts=True)
    assert not recovered and data == b"<2><4><5>"


def test_resume_from_a_node_ahead_skips_what_was_seen():
    """A client resuming at an offset this node has not reached gets only newer messages."""
    hub = make_hub()
    p = FakePeer()
    hub.add(p)
    hub.deliver([msg(1)])
    recovered, data = hub.replay(p, (1000, 3), [], broadcasts=True)
    assert recovered and data == b""
    hub.deliver([msg(2), msg(3), msg(4)])
    hub.deliver([msg(5)])
    assert p.received == b"<1><4><5>"


def test_large_fan_out_is_written_a_slice_per_reactor_turn():
    """Past SLICE connections the writes spread over reactor turns, and the returned Deferred says when all are out."""
    clock = Clock()
    hub = make_hub(clock=clock)
    peers = [FakePeer() for _ in range(SLICE * 2 + 1)]
    for p in peers:
        hub.add(p)
    done = hub.deliver([msg(1)])
    assert done is not None and not done.called
    assert sum(1 for p in peers if p.writes) == SLICE
    assert clock.getDelayedCalls(), "the rest waits for a later reactor turn"
    clock.advance(0)
    assert all(p.writes == [b"<1>"] for p in peers) and done.called


def test_consecutive_messages_to_one_audience_are_joined_once():
    """A run of messages to the same channel is joined once and shared by its subscribers, in order."""
    hub = make_hub()
    a, b, other = FakePeer(), FakePeer(), FakePeer()
    for p in (a, b, other):
        hub.add(p)
    hub.subscribe(a, "news")
    hub.subscribe(b, "news")
    hub.deliver([msg(1, "news"), msg(2, "news"), msg(3), msg(4, "news")])
    assert a.writes == b.writes == [b"<1><2><3><4>"]
    assert other.writes == [b"<3>"]
    assert hub.stats.deliveries == 2 * 3 + 3
