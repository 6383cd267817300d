"""
A client's session, and the Autobahn protocol around it, in memory: no
sockets, no Redis, time on a task.Clock. Sessions write into a connection
that records every frame; the protocol runs against an Autobahn client over
twisted.test.iosim (as magic-wormhole-mailbox-server tests its WebSocket
protocol), pumped by hand.
"""

from __future__ import annotations

from typing import Any

import pytest
from autobahn.twisted.websocket import WebSocketClientFactory
from support.clients import CLOSED, Client, Refused, strict_loads
from support.raw import take_frames
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.test import iosim

from pushservice.auth import AuthError, Grant, Policy
from pushservice.config import Config
from pushservice.history import History
from pushservice.hub import Hub
from pushservice.limits import TokenBucket
from pushservice.logentry import Message
from pushservice.metrics import Stats
from pushservice.node import Node, Query
from pushservice.session import CLOSE_AUTH_REQUIRED, CLOSE_TOKEN_EXPIRED, Session, State
from pushservice.strictjson import JSONRules
from pushservice.websocket import PushFactory
from pushservice.wire import message_payload, text_frame

# token -> (user, seconds it stays valid, channel grants)
TOKENS = {"alice": ("alice", 60.0, ()), "hr": ("hr-lead", 60.0, ("private:hr",)), "short": ("alice", 5.0, ())}


class FakeBus:
    """The bus as a session uses it: publish (a Deferred the test fires) and offset_exists."""

    def __init__(self) -> None:
        self.published: list[tuple[bytes, defer.Deferred[None]]] = []
        #: Offsets "in the log" (issued by some node).
        self.issued: set[tuple[int, int]] = set()

    def publish(self, item: bytes) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.published.append((item, d))
        return d

    def offset_exists(self, offset: tuple[int, int]) -> defer.Deferred[bool]:
        return defer.succeed(offset in self.issued)


class RecordingConnection:
    """A connection whose socket takes every write at once; records the frames and the closes."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._frames: list[dict[str, Any]] = []
        self.closes: list[tuple[int, str]] = []
        self.dropped: str | None = None

    def send_now(self, data: bytes | memoryview) -> int:
        self._buffer += data
        return len(data)

    def direct_socket(self) -> None:
        return None  # no socket: every share goes through send_now

    def queued(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        self._buffer += data

    def drop_slow(self, why: str) -> None:
        self.dropped = why

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def frames(self) -> list[dict[str, Any]]:
        """Every frame written so far (each parsed as strict JSON), oldest first; they stay."""
        for opcode, payload in take_frames(self._buffer):
            assert opcode == 1, opcode
            self._frames.append(strict_loads(payload))
        return list(self._frames)

    def take(self) -> list[dict[str, Any]]:
        """The frames written since the last take."""
        frames = self.frames()
        self._frames.clear()
        return frames


def make_node(**overrides: Any) -> tuple[Node, Clock, FakeBus]:
    """A node's shared parts on a task.Clock, its history loaded (ready)."""
    clock = Clock()
    config = Config(**overrides)
    stats = Stats()
    hub = Hub(History(config.history, config.history_bytes), stats, clock, config.slow_client_seconds)
    hub.set_ready()
    bus = FakeBus()

    def verify(token: str) -> Grant:
        if token not in TOKENS:
            raise AuthError("invalid token")
        user, ttl, channels = TOKENS[token]
        return Grant(user, clock.seconds() + ttl, channels=channels)

    rules = JSONRules(config.max_json_depth, config.max_number_length)
    node = Node(clock, config, hub, bus, stats, Policy(config.client_publish), rules, verify)  # type: ignore[arg-type]
    return node, clock, bus


def open_session(
    node: Node, query: Query | None = None, grant: Grant | None = None, bucket: TokenBucket | None = None
) -> tuple[Session, RecordingConnection]:
    """A session whose handshake is done (open() called)."""
    query = query or Query()
    conn = RecordingConnection()
    bucket = bucket or TokenBucket(node.clock, node.config.client_rate, node.config.client_burst)
    session = Session(node, conn, query, grant, "test-peer", bucket)
    session.open()
    return session, conn


def request(session: Session, frame: str) -> None:
    session.received(frame.encode(), False)


def deliver(node: Node, *numbers: int, channel: str | None = None) -> None:
    """Messages 1000-n (broadcasts, or on C{channel}) read from the log, as the tailer hands them over."""
    messages = []
    for n in numbers:
        offset = f"1000-{n}".encode()
        payload = message_payload(f'"m{n}"'.encode(), channel, offset)
        messages.append(Message((1000, n), channel, None, text_frame(payload), seq=n))
    node.hub.deliver(messages)


def run(clock: Clock) -> None:
    """Run what is due now (catch-up pumps), as the reactor would in its next turns."""
    for _ in range(1000):
        if not any(call.getTime() <= clock.seconds() for call in clock.getDelayedCalls()):
            return
        clock.advance(0)
    raise AssertionError("calls keep coming")


# -- states -------------------------------------------------------------------------------


def test_without_auth_a_session_joins_at_once_with_the_query_channels():
    """No token needed and none announced: open() joins the hub (JOINED) with the query's channels, sending nothing."""
    node, _, _ = make_node()
    session, conn = open_session(node, Query(channels=("news", "sport")))
    assert session.state is State.JOINED
    assert node.hub.census()["peers"] == 1 and node.hub.subscribers("news") == node.hub.subscribers("sport") == 1
    assert conn.frames() == []


@pytest.mark.parametrize(
    "config, query",
    [({"require_token": True}, Query(channels=("news",))), ({}, Query(channels=("news",), auth_frame=True))],
    ids=["require_token", "auth=1"],
)
def test_authenticating_forbids_every_frame_but_auth(config, query):
    """AUTHENTICATING (tokens required, or auth=1): subscribe, unsubscribe and publish get forbidden; nothing joins."""
    node, _, bus = make_node(**config)
    session, conn = open_session(node, query)
    assert session.state is State.AUTHENTICATING
    request(session, '{"id":1,"type":"subscribe","channel":"a"}')
    request(session, '{"id":2,"type":"unsubscribe","channel":"news"}')
    request(session, '{"id":3,"type":"message","content":"x"}')
    frames = conn.take()
    assert [(f["type"], f["code"], f["id"]) for f in frames] == [("error", "forbidden", i) for i in (1, 2, 3)], frames
    assert all("auth" in f["message"] for f in frames), frames
    assert node.hub.census()["peers"] == 0 and bus.published == []
    assert node.stats.errors["forbidden"] == 3
    deliver(node, 1)
    assert conn.frames() == [], "no broadcast before auth"


@pytest.mark.parametrize("config, query", [({"require_token": True}, Query()), ({}, Query(auth_frame=True))])
def test_an_auth_frame_unlocks_and_joins_with_the_user(config, query):
    """A good auth frame is acked; the session joins as that user and receives broadcasts and its user's messages."""
    node, _, _ = make_node(**config)
    session, conn = open_session(node, query)
    request(session, '{"id":"a","type":"auth","token":"nope"}')
    assert conn.take() == [{"type": "error", "code": "forbidden", "message": "invalid token", "id": "a"}]
    assert session.state is State.AUTHENTICATING
    request(session, '{"id":"b","type":"auth","token":"alice"}')
    assert conn.take() == [{"type": "ack", "id": "b"}]
    assert session.state is State.JOINED and session.user == "alice"
    assert node.hub.census()["users"] == 1
    request(session, '{"id":"c","type":"auth","token":"alice"}')
    assert conn.take()[0]["code"] == "bad_request", "one auth per connection"


def test_an_auth_frame_must_grant_the_query_channels():
    """With auth=1 the query's private channels are checked against the auth frame's grant."""
    node, _, _ = make_node()
    session, conn = open_session(node, Query(channels=("private:hr",), auth_frame=True))
    request(session, '{"id":1,"type":"auth","token":"alice"}')
    assert conn.take()[0]["code"] == "forbidden"
    assert session.state is State.AUTHENTICATING
    request(session, '{"id":2,"type":"auth","token":"hr"}')
    assert conn.take() == [{"type": "ack", "id": 2}]
    assert node.hub.subscribers("private:hr") == 1


def test_no_auth_frame_by_the_deadline_closes_4001():
    """Without an auth frame within --auth-timeout the connection is closed with 4001, not a moment before."""
    node, clock, _ = make_node(require_token=True, auth_timeout=5.0)
    session, conn = open_session(node)
    clock.advance(4.9)
    assert conn.closes == []
    clock.advance(0.1)
    assert conn.closes == [(CLOSE_AUTH_REQUIRED, "authentication required")]


def test_an_auth_frame_in_time_cancels_the_4001():
    """An auth frame before the deadline: the deadline passes without a close."""
    node, clock, _ = make_node(require_token=True, auth_timeout=5.0)
    session, conn = open_session(node)
    clock.advance(4.0)
    request(session, '{"type":"auth","token":"alice"}')
    clock.advance(2.0)
    assert conn.closes == [] and session.state is State.JOINED


@pytest.mark.parametrize("how", ["handshake", "auth frame"])
def test_token_expiry_closes_4003(how):
    """A session is closed with 4003 when its token expires, whether it came in the handshake or an auth frame."""
    node, clock, _ = make_node()
    clock.advance(1000)
    if how == "handshake":
        session, conn = open_session(node, grant=node.verify("short"))
    else:
        session, conn = open_session(node, Query(auth_frame=True))
        request(session, '{"type":"auth","token":"short"}')
    assert session.state is State.JOINED and session.user == "alice"
    clock.advance(4.9)
    assert conn.closes == []
    clock.advance(0.1)
    assert conn.closes == [(CLOSE_TOKEN_EXPIRED, "token expired")]


def test_closed_leaves_no_timer_no_hub_entry_and_sends_nothing():
    """closed(): timers cancelled, the hub forgets the session, and nothing more is written (CLOSED)."""
    node, clock, _ = make_node()
    session, conn = open_session(node, Query(channels=("news",)), grant=node.verify("alice"))
    assert clock.getDelayedCalls(), "the expiry timer"
    session.closed()
    assert session.state is State.CLOSED
    assert [call for call in clock.getDelayedCalls() if call.active()] == []
    assert node.hub.census() == dict.fromkeys(("peers", "channels", "subscriptions", "users", "paused", "waiting"), 0)
    request(session, '{"id":1,"type":"subscribe","channel":"a"}')
    deliver(node, 1)
    assert conn.frames() == []


def test_closed_while_authenticating_cancels_the_deadline():
    """A session closed before its auth frame: the 4001 deadline never fires."""
    node, clock, _ = make_node(require_token=True, auth_timeout=5.0)
    session, conn = open_session(node)
    session.closed()
    clock.advance(10)
    assert conn.closes == []


# -- subscriptions ----------------------------------------------------------------------


def test_subscribe_and_unsubscribe_are_answered_and_indexed():
    """subscribe and unsubscribe get their replies (with the id) and change what the session receives."""
    node, _, _ = make_node()
    session, conn = open_session(node)
    request(session, '{"id":1,"type":"subscribe","channel":"news"}')
    assert conn.take() == [{"type": "subscribed", "channel": "news", "id": 1}]
    assert node.hub.subscribers("news") == 1
    deliver(node, 1, channel="news")
    assert [f["content"] for f in conn.take()] == ["m1"]
    request(session, '{"type":"unsubscribe","channel":"news","id":"u"}')
    assert conn.take() == [{"type": "unsubscribed", "channel": "news", "id": "u"}]
    deliver(node, 2, channel="news")
    assert conn.take() == [] and node.hub.subscribers("news") == 0


def test_subscribe_limits_and_grants():
    """Past --max-subscriptions: bad_request; a private channel without its grant: forbidden; a repeat is no new one."""
    node, _, _ = make_node(max_subscriptions=2)
    session, conn = open_session(node)
    for i, channel in enumerate(["a", "b", "a", "c", "private:hr"]):
        request(session, f'{{"id":{i},"type":"subscribe","channel":"{channel}"}}')
    replies = conn.take()
    assert [(f["type"], f.get("code")) for f in replies] == [
        ("subscribed", None),
        ("subscribed", None),
        ("subscribed", None),
        ("error", "bad_request"),
        ("error", "forbidden"),
    ], replies
    assert session.channels == {"a", "b"}


def test_subscribe_with_since_replays_what_the_history_holds():
    """since inside the history: subscribed, recovered, then that channel's messages after it; older: not recovered."""
    node, clock, _ = make_node(history=3)
    session, conn = open_session(node)
    deliver(node, 1, 2, 3, 4, 5, channel="news")  # the history holds 3, 4, 5
    request(session, '{"id":1,"type":"subscribe","channel":"news","since":"1000-3"}')
    run(clock)
    frames = conn.take()
    assert frames[0] == {"type": "subscribed", "channel": "news", "id": 1, "recovered": True}
    assert [f["content"] for f in frames[1:]] == ["m4", "m5"]
    other, conn2 = open_session(node)
    request(other, '{"id":2,"type":"subscribe","channel":"news","since":"1000-1"}')
    run(clock)
    frames = conn2.take()
    assert frames[0] == {"type": "subscribed", "channel": "news", "id": 2, "recovered": False}
    assert [f["content"] for f in frames[1:]] == ["m3", "m4", "m5"], "what is held still comes"


def test_subscribe_with_a_since_never_issued_is_not_recovered():
    """A since this node has not read and the log does not hold (another deployment's): subscribed, not recovered, live."""
    node, clock, _ = make_node()
    session, conn = open_session(node)
    request(session, '{"id":1,"type":"subscribe","channel":"news","since":"1000-9"}')
    assert conn.take() == [{"type": "subscribed", "channel": "news", "id": 1, "recovered": False}]
    deliver(node, 5, channel="news")
    run(clock)
    assert [f["content"] for f in conn.take()] == ["m5"]


def test_subscribe_with_a_since_from_a_node_ahead_is_recovered_and_skips_what_the_client_saw():
    """A since the log holds but this node has not read yet: recovered; then only the messages after it."""
    node, clock, bus = make_node()
    bus.issued.add((1000, 9))
    session, conn = open_session(node)
    request(session, '{"id":1,"type":"subscribe","channel":"news","since":"1000-9"}')
    run(clock)
    assert conn.take() == [{"type": "subscribed", "channel": "news", "id": 1, "recovered": True}]
    deliver(node, 8, 9, 10, channel="news")
    run(clock)
    assert [f["content"] for f in conn.take()] == ["m10"], "the client had up to 9 from the node ahead"


def test_since_in_the_query_is_answered_with_resumed():
    """The connect query's since: a resumed frame saying whether the replay is complete, and the replay."""
    node, clock, _ = make_node()
    deliver(node, 1, 2, 3)
    session, conn = open_session(node, Query(since=(1000, 1)))
    run(clock)
    frames = conn.take()
    assert frames[0] == {"type": "resumed", "since": "1000-1", "recovered": True}
    assert [f["content"] for f in frames[1:]] == ["m2", "m3"]


# -- limits and publishing ---------------------------------------------------------------


def test_frames_past_the_budget_are_rate_limited_until_it_refills():
    """Past the token bucket's burst every frame gets rate_limited (its leading id echoed); the rate refills it."""
    node, clock, _ = make_node()
    session, conn = open_session(node, bucket=TokenBucket(clock, 2.0, 3))
    for i in range(5):
        request(session, f'{{"id":{i},"type":"subscribe","channel":"c{i}"}}')
    replies = conn.take()
    assert [(f["type"], f["id"]) for f in replies[:3]] == [("subscribed", 0), ("subscribed", 1), ("subscribed", 2)]
    assert [(f["code"], f["id"]) for f in replies[3:]] == [("rate_limited", 3), ("rate_limited", 4)]
    assert node.stats.errors["rate_limited"] == 2 and session.channels == {"c0", "c1", "c2"}
    clock.advance(0.49)
    request(session, '{"id":5,"type":"unsubscribe","channel":"c0"}')
    assert conn.take()[0]["code"] == "rate_limited"
    clock.advance(0.01)  # 2 a second: one token after half a second
    request(session, '{"id":6,"type":"unsubscribe","channel":"c0"}')
    assert conn.take() == [{"type": "unsubscribed", "channel": "c0", "id": 6}]


def test_a_publish_is_acked_once_redis_confirms_it():
    """A client message goes to the bus as an envelope; ack when it is confirmed, unavailable when it fails."""
    node, _, bus = make_node()
    session, conn = open_session(node)
    request(session, '{"id":1,"type":"message","content":{"a":1},"channel":"news"}')
    request(session, '{"id":2,"type":"message","content":"x"}')
    (item, first), (_, second) = bus.published
    assert strict_loads(item) == {"content": {"a": 1}, "channel": "news"}
    assert conn.take() == [], "nothing before Redis answers"
    first.callback(None)
    second.errback(ConnectionError("gone"))
    frames = conn.take()
    assert frames[0] == {"type": "ack", "id": 1}
    assert (frames[1]["code"], frames[1]["id"]) == ("unavailable", 2)
    assert node.stats.client_publishes == 1 and node.stats.errors["unavailable"] == 1


def test_publishing_follows_the_policy():
    """--client-publish off forbids every client message, without asking Redis."""
    node, _, bus = make_node(client_publish="off")
    session, conn = open_session(node)
    request(session, '{"id":1,"type":"message","content":1}')
    assert (conn.take()[0]["code"], bus.published) == ("forbidden", [])


def test_bad_frames_get_their_error_and_the_session_goes_on():
    """A frame that does not parse gets bad_request (or too_large) and the next one is served."""
    node, _, _ = make_node(max_message_size=100)
    session, conn = open_session(node)
    request(session, "not json")
    request(session, '{"id":"big","type":"message","content":"' + "x" * 200 + '"}')
    session.received(b'{"type":"subscribe","channel":"a"}', True)
    request(session, '{"id":3,"type":"subscribe","channel":"a"}')
    frames = conn.take()
    assert [f.get("code") for f in frames[:3]] == ["bad_request", "too_large", "bad_request"]
    assert frames[1]["id"] == "big" and frames[3] == {"type": "subscribed", "channel": "a", "id": 3}


# -- the Autobahn protocol, in memory ----------------------------------------------------------


def in_memory(factory: PushFactory, query: str = "", headers: dict[str, str] | None = None) -> tuple[Client, Any]:
    """An Autobahn test client connected to a protocol of C{factory} over iosim, handshake pumped."""
    client_factory = WebSocketClientFactory(f"ws://127.0.0.1:8080/?{query}", headers=headers or {})
    client_factory.protocol = Client
    client = client_factory.buildProtocol(None)
    server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    pump = iosim.connect(
        server,
        iosim.FakeTransport(server, isServer=True, peerAddress=IPv4Address("TCP", "127.0.0.1", 40000)),
        client,
        iosim.FakeTransport(client, isServer=False, peerAddress=IPv4Address("TCP", "127.0.0.1", 8080)),
    )
    pump.flush()
    return client, pump


def push_factory(**overrides: Any) -> tuple[PushFactory, Clock]:
    # Autobahn's own timers (handshake, pings) run on the global reactor: off, so nothing outlives the test
    node, clock, _ = make_node(handshake_timeout=0, ping_interval=0, **overrides)
    return PushFactory(node), clock


def received(client: Client) -> list[dict[str, Any]]:
    return [f for f in client.drain() if f["type"] != CLOSED]


def test_the_protocol_opens_a_session_and_answers_its_frames():
    """Handshake, then frames both ways through PushProtocol: the factory counts the connection while it is open."""
    factory, _ = push_factory()
    client, pump = in_memory(factory, "channels=news")
    assert client.opened.called and len(factory.connections()) == 1
    assert factory.node.stats.connections == 1 and factory.node.hub.subscribers("news") == 1
    client.send({"id": 1, "type": "subscribe", "channel": "sport"})
    pump.flush()
    assert received(client) == [{"type": "subscribed", "channel": "sport", "id": 1}]
    deliver(factory.node, 1, channel="news")
    pump.flush()
    assert [f["content"] for f in received(client)] == ["m1"]
    client.sendClose(1000)
    pump.flush()
    assert client.closed.called and factory.connections() == []
    assert factory.node.stats.connections == 0 and factory.node.hub.census()["peers"] == 0


def test_the_auth_deadline_closes_the_websocket_with_4001():
    """The session's 4001, on the node's clock, reaches the client as a WebSocket close."""
    factory, clock = push_factory(require_token=True, auth_timeout=2.0)
    client, pump = in_memory(factory)
    clock.advance(2.0)
    pump.flush()
    assert client.closed.called and client.closed.result[0] == CLOSE_AUTH_REQUIRED


@pytest.mark.parametrize(
    "query, headers, status",
    [
        ("token=not-a-token", {}, "403"),
        ("channels=private:hr", {}, "403"),
        ("since=yesterday", {}, "400"),
        ("auth=2", {}, "400"),
        ("", {"Origin": "https://evil.example"}, "403"),
    ],
)
def test_the_handshake_refuses_what_it_must(query, headers, status):
    """Bad tokens, ungranted private channels and other origins get 403, a bad query 400; no session opens."""
    factory, _ = push_factory(allowed_origins=("https://good.example",))
    client, _ = in_memory(factory, query, headers)
    failure = client.opened.result
    assert isinstance(failure.value, Refused) and status in failure.value.reason, failure.value
    client.opened.addErrback(lambda _: None)
    assert factory.connections() == [] and factory.node.stats.connections == 0
