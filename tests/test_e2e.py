"""
End to end: real ``twistd -n pushservice`` processes on a real redis-server,
Autobahn clients in this process, producers with redis-py in threads.

Issue 3, "never lose, never reorder": every client sees every message it is
addressed by exactly once, in push order, with the same offset on every node,
whatever node dies, across a Redis restart, and across reconnects (``since``).

Blocking calls made while clients are reading (producers, kills, restarts)
run in threads (deferToThread) so the reactor keeps reading.
"""

from __future__ import annotations

import functools
import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from support.clients import Client, connect
from support.processes import RedisServer
from support.waiting import nothing_more, sleep, timed, until
from twisted.internet import threads

pytestmark = pytest.mark.slow  # real twistd processes

DEADLINE = 60.0  # seconds for a whole stream of messages; every wait below is bounded


# -- helpers --------------------------------------------------------------------


def offset(frame: dict[str, Any]) -> tuple[int, int]:
    ms, seq = frame["offset"].split("-")
    return int(ms), int(seq)


def start_nodes(twistd_service: Any, count: int, *args: str, queue: str, redis: Any = None) -> list[Any]:
    """Start C{count} nodes at once, then wait until each is healthy (blocks: call before clients exist)."""
    nodes = [twistd_service(*args, queue=queue, redis=redis, wait=False) for _ in range(count)]
    for node in nodes:
        node.wait_healthy(timeout=40)
    return nodes


async def read_n(client: Client, n: int, timeout: float = DEADLINE) -> list[dict[str, Any]]:
    """The next C{n} frames, all messages, within C{timeout} seconds in all."""
    return await client.messages(n, timeout)


def pusher(server: RedisServer, queue: str) -> Callable[[str], None]:
    """LPUSH one item on C{queue} (a marker, for L{nothing_more})."""

    def push(item: str) -> None:
        r = server.client()
        try:
            r.lpush(queue, item)
        finally:
            r.close()

    return push


def produce(
    server: Any, queue: str, items: list[str], pipeline: int, pause: float, each: Callable[[int], None] | None = None
) -> None:
    """LPUSH C{items} in order, C{pipeline} at a time, pausing between; C{each(n)} after every batch."""
    r = server.client(socket_timeout=5)
    try:
        for start in range(0, len(items), pipeline):
            r.lpush(queue, *items[start : start + pipeline])
            if each is not None:
                each(start + pipeline)
            time.sleep(pause)
    finally:
        r.close()


def content_key(frame: dict[str, Any]) -> str:
    """Plain items come back as the string pushed; envelopes as their content."""
    content = frame["content"]
    return content if isinstance(content, str) else f"e{content['i']}"


# -- 1. several nodes ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_three_nodes_every_client_every_message_once_in_order(twistd_service, redis_server, queue):
    """Three nodes on one queue: each of 9 clients gets all 1200 items once, in push order, same offsets everywhere."""
    nodes = start_nodes(twistd_service, 3, queue=queue)
    clients = [await connect(node.port) for node in nodes for _ in range(3)]
    # plain strings and broadcast envelopes, mixed
    items = [json.dumps({"content": {"i": i}}) if i % 4 == 3 else f"m{i}" for i in range(1200)]
    expected = [f"e{i}" if i % 4 == 3 else f"m{i}" for i in range(1200)]

    producing = threads.deferToThread(produce, redis_server, queue, items, 20, 0.005)
    received = [await read_n(client, len(items)) for client in clients]
    await timed(producing, DEADLINE)
    r = redis_server.client()
    assert r.llen(queue) == 0 and r.xlen(f"{queue}:log") == len(items) and r.llen(f"{queue}:dead") == 0
    r.close()
    await nothing_more(clients, pusher(redis_server, queue))

    reference = [f["offset"] for f in received[0]]
    for frames in received:
        assert [content_key(f) for f in frames] == expected
        offsets = [offset(f) for f in frames]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets), "offsets must increase"
        assert [f["offset"] for f in frames] == reference, "every node must give a message the same offset"
    for client in clients:
        await client.close()


# -- 2. a node dies ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_node_killed_mid_burst_loses_nothing(twistd_service, redis_server, queue):
    """SIGKILL of one of two nodes after 30% of a 2000-item burst: the other's clients still get all 2000 once, in order."""
    a, b = start_nodes(twistd_service, 2, queue=queue)
    on_a = [await connect(a.port) for _ in range(2)]
    on_b = [await connect(b.port) for _ in range(3)]
    items = [f"k{i}" for i in range(2000)]
    killed_at: list[int] = []

    def each(pushed: int) -> None:
        if pushed >= 600 and not killed_at:
            killed_at.append(pushed)
            a.kill()  # SIGKILL, while the burst goes on

    await threads.deferToThread(produce, redis_server, queue, items, 10, 0.002, each)
    assert killed_at and killed_at[0] < len(items), "node A must die in the middle of the burst"

    for client in on_b:
        frames = await read_n(client, len(items))
        assert [f["content"] for f in frames] == items
    r = redis_server.client()
    assert r.llen(queue) == 0, "the list must be drained"
    assert r.xlen(f"{queue}:log") == len(items), "the log must hold every item exactly once"
    r.close()
    await nothing_more(on_b, pusher(redis_server, queue))
    # A's clients were cut off: what they got is an in-order prefix, nothing twice
    for client in on_a:
        await timed(client.closed)
        got = [f["content"] for f in client.drain() if f["type"] == "message"]
        assert got == items[: len(got)]
    for client in on_b:
        await client.close()


# -- 3. Redis restarts --------------------------------------------------------------


class RetryingProducer:
    """LPUSHes ``"<n>:<attempt>"`` items until stopped, retrying failed pushes with a new attempt number."""

    def __init__(self, server: RedisServer, queue: str) -> None:
        self.server = server
        self.queue = queue
        self.confirmed: list[str] = []
        self.unconfirmed: list[str] = []
        self.stop = threading.Event()

    def run(self, hard_deadline: float) -> None:
        import redis

        r = self.server.client(socket_timeout=5)
        n = 0
        try:
            while not self.stop.is_set() and time.monotonic() < hard_deadline:
                attempt = 0
                while time.monotonic() < hard_deadline:
                    item = f"{n}:{attempt}"
                    try:
                        r.lpush(self.queue, item)
                    except (redis.ConnectionError, redis.TimeoutError):
                        # it may or may not have landed; retry under a new name so duplicates stay visible
                        self.unconfirmed.append(item)
                        attempt += 1
                        time.sleep(0.05)
                        continue
                    self.confirmed.append(item)
                    break
                n += 1
                time.sleep(0.002)
        finally:
            r.close()


def _parse(item: str) -> tuple[int, int]:
    n, attempt = item.split(":")
    return int(n), int(attempt)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
@pytest_twisted.ensureDeferred
async def test_redis_restart_under_load_keeps_confirmed_items(twistd_service, queue, stop_signal, own_redis):
    """Redis (AOF, fsync always) stopped and restarted mid-stream: every confirmed push reaches every client once, in order."""
    server = own_redis(persistent=True)
    nodes = start_nodes(twistd_service, 2, queue=queue, redis=server)
    clients = [await connect(node.port) for node in nodes for _ in range(2)]
    producer = RetryingProducer(server, queue)
    producing = threads.deferToThread(producer.run, time.monotonic() + 60)

    async def wait_confirmed(n: int) -> None:
        def confirmed() -> bool:
            assert not producing.called, "producer ended early"
            return len(producer.confirmed) >= n

        await until(confirmed, 30, f"{n} pushes confirmed")

    await wait_confirmed(300)
    await threads.deferToThread(server.stop, stop_signal)
    await sleep(1.0)  # time on purpose: Redis stays down a while, and the producer's pushes fail
    await threads.deferToThread(server.start)
    before = len(producer.confirmed)
    await wait_confirmed(before + 300)
    producer.stop.set()
    await timed(producing, 30)
    assert producer.unconfirmed, "the outage must have hit the producer"

    last = producer.confirmed[-1]
    for client in clients:
        frames = await client.messages_until(lambda fs: bool(fs) and fs[-1]["content"] == last, DEADLINE)
        got = [f["content"] for f in frames]
        assert len(got) == len(set(got)), "no item twice"
        assert [_parse(i) for i in got] == sorted(_parse(i) for i in got), "push order kept"
        missing = set(producer.confirmed) - set(got)
        assert not missing, f"{len(missing)} confirmed items lost, e.g. {sorted(missing, key=_parse)[:5]}"
        assert set(got) <= set(producer.confirmed) | set(producer.unconfirmed)
        offsets = [offset(f) for f in frames]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
        assert not client.closed.called, "clients stay connected through a Redis outage"
    await nothing_more(clients, pusher(server, queue))
    for client in clients:
        await client.close()


# -- 4. recovery with since ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reconnect_with_since_on_another_node(twistd_service, redis_server, queue):
    """Reconnecting to another node with ?since= (query channels, or subscribe since=) yields exactly the missed, then live."""
    a, b = start_nodes(twistd_service, 2, queue=queue)
    r = redis_server.client()

    def push(items: list[Any]) -> None:
        r.lpush(queue, *[json.dumps({"content": c, "channel": ch}) if ch else c for c, ch in items])

    def batch(prefix: str, n: int, shift: int = 0) -> list[tuple[str, str | None]]:
        # broadcasts, news, sport and other, interleaved
        return [(f"{prefix}{i}", [None, "news", "sport", "other"][(i + shift) % 4]) for i in range(n)]

    def wanted(items: list[tuple[str, str | None]], channels: set[str], broadcasts: bool = True) -> list[str]:
        return [c for c, ch in items if (ch in channels if ch else broadcasts)]

    # B delivers everything to the watcher before clients reconnect, so the missed ones can only come by replay
    watcher = await connect(b.port, "channels=news,sport,other")

    async def b_has(items: list[tuple[str, str | None]]) -> None:
        await watcher.messages_until(lambda fs: bool(fs) and fs[-1]["content"] == items[-1][0], DEADLINE)

    # query variant: channels=news,sport&since=
    client = await connect(a.port, "channels=news,sport")
    first = batch("a", 42)  # ends on news: since is the newest entry, the first one missed is wanted
    push(first)
    seen = await read_n(client, len(wanted(first, {"news", "sport"})))
    assert [f["content"] for f in seen] == wanted(first, {"news", "sport"})
    await client.close()
    missed = batch("b", 40)
    push(missed)
    await b_has(missed)
    client = await connect(b.port, f"channels=news,sport&since={seen[-1]['offset']}")
    assert await client.next() == {"type": "resumed", "since": seen[-1]["offset"], "recovered": True}
    live = batch("c", 40)
    push(live)
    expected = wanted(missed + live, {"news", "sport"})
    frames = await read_n(client, len(expected))
    assert [f["content"] for f in frames] == expected
    assert offset(frames[0]) > offset(seen[-1])
    await nothing_more([client], functools.partial(r.lpush, queue))
    await client.close()

    # subscribe variant: {"type":"subscribe","channel":"news","since":...}
    client = await connect(a.port)
    assert (await client.request({"type": "subscribe", "channel": "news", "id": 1}))["type"] == "subscribed"
    first = batch("d", 42)
    push(first)
    seen = await read_n(client, len(wanted(first, {"news"})))
    assert [f["content"] for f in seen] == wanted(first, {"news"})
    last_news = [f for f in seen if f["channel"] == "news"][-1]["offset"]
    await client.close()
    missed = batch("e", 40, shift=1)  # starts with news
    push(missed)
    await b_has(missed)
    client = await connect(b.port)
    reply = await client.request({"type": "subscribe", "channel": "news", "since": last_news, "id": 2})
    assert reply == {"type": "subscribed", "channel": "news", "id": 2, "recovered": True}
    replayed = await read_n(client, len(wanted(missed, {"news"}, broadcasts=False)))
    assert [f["content"] for f in replayed] == wanted(missed, {"news"}, broadcasts=False)
    live = batch("f", 40)
    push(live)
    frames = await read_n(client, len(wanted(live, {"news"})))
    assert [f["content"] for f in frames] == wanted(live, {"news"})
    await nothing_more([client], functools.partial(r.lpush, queue))
    await client.close()
    await watcher.close()
    r.close()


@pytest_twisted.ensureDeferred
async def test_since_beyond_history_is_not_recovered(twistd_service, redis_server, queue):
    """With --history 5, subscribe since= an offset older than the window replies recovered:false; inside it, true."""
    live_node = start_nodes(twistd_service, 1, "--history", "5", queue=queue)[0]
    watcher = await connect(live_node.port, "channels=news")
    r = redis_server.client()
    r.lpush(queue, *[json.dumps({"content": f"n{i}", "channel": "news"}) for i in range(20)])
    offsets = [f["offset"] for f in await read_n(watcher, 20)]
    await watcher.close()
    r.close()
    # one node saw the messages arrive; one loads its history from the log at start
    loaded_node = (await threads.deferToThread(start_nodes, twistd_service, 1, "--history", "5", queue=queue))[0]

    tails = []
    for node in (live_node, loaded_node):
        client = await connect(node.port)
        # the window holds n15..n19: from n14 on, nothing is missing
        reply = await client.request({"type": "subscribe", "channel": "news", "since": offsets[14], "id": "in"})
        assert reply.get("recovered") is True, reply
        assert [f["content"] for f in await read_n(client, 5)] == [f"n{i}" for i in range(15, 20)]
        await client.close()

        client = await connect(node.port)
        reply = await client.request({"type": "subscribe", "channel": "news", "since": offsets[13], "id": "out"})
        assert reply == {"type": "subscribed", "channel": "news", "id": "out", "recovered": False}
        # what there is still comes, in order: the window's tail
        assert [f["content"] for f in await read_n(client, 5)] == [f"n{i}" for i in range(15, 20)]
        tails.append(client)
    # after both nodes: a marker in the log would change what a 5-message window holds
    await nothing_more(tails, pusher(redis_server, queue))
    for client in tails:
        await client.close()


# -- 5. replay while messages keep arriving ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hopping_between_nodes_during_a_stream_is_contiguous(twistd_service, redis_server, queue):
    """A client hopping between nodes with channels=&since= while a producer pushes misses and repeats nothing."""
    nodes = start_nodes(twistd_service, 2, "--history", "5000", queue=queue)
    kinds = [None, "c1", "c2"]  # c2 is not subscribed: must never show up
    items = [json.dumps({"content": f"x{i}", "channel": kinds[i % 3]}) if i % 3 else f"x{i}" for i in range(1500)]
    expected = [f"x{i}" for i in range(1500) if i % 3 != 2]
    client = await connect(nodes[0].port, "channels=c1")
    producing = threads.deferToThread(produce, redis_server, queue, items, 5, 0.006)
    got: list[dict[str, Any]] = []
    hops_while_pushing = 0
    hop = 0
    discarded = 0
    while True:
        got += await read_n(client, min(len(expected) - len(got), 137))
        if len(got) == len(expected):
            break
        await sleep(0.05)  # time on purpose: fall behind; what arrives meanwhile is dropped unread, for since
        discarded += client.pending()
        await client.close()
        hop += 1
        if not producing.called:
            hops_while_pushing += 1
        client = await connect(nodes[hop % 2].port, f"channels=c1&since={got[-1]['offset']}")
        assert (await client.next())["recovered"] is True
    await timed(producing, DEADLINE)
    await nothing_more([client], pusher(redis_server, queue))
    await client.close()

    assert [f["content"] for f in got] == expected
    offsets = [offset(f) for f in got]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert hops_while_pushing >= 2, f"only {hops_while_pushing} reconnects happened while the producer pushed"
    assert discarded > 0, "some messages must have been left unread, for since to bring back"


# -- 6. reconnecting to a node that lags behind -------------------------------------------


@pytest_twisted.ensureDeferred
async def test_since_on_a_node_that_lags_behind(twistd_service, redis_server, queue):
    """Resuming with since= on a node that has not yet read up to that offset repeats nothing and then goes live."""
    a, b = start_nodes(twistd_service, 2, queue=queue)
    client = await connect(a.port)
    r = redis_server.client()
    first = [f"p{i}" for i in range(30)]
    r.lpush(queue, *first)
    assert [f["content"] for f in await read_n(client, 30)] == first
    assert b.proc is not None
    b.proc.send_signal(signal.SIGSTOP)  # B falls behind: it reads nothing of the next batch
    try:
        backlog = [f"q{i}" for i in range(3000)]
        for start in range(0, len(backlog), 500):
            r.lpush(queue, *backlog[start : start + 500])
        seen = await read_n(client, len(backlog))
        assert [f["content"] for f in seen] == backlog
        await client.close()
        # the handshake waits in B's socket; once B runs it races B's catching up (XREAD COUNT 1000)
        resuming = timed(connect(b.port, f"since={seen[-1]['offset']}", timeout=30), 40)
        await sleep(0.3)  # time on purpose: the SIGSTOP window, for the handshake to reach B's socket
    finally:
        b.proc.send_signal(signal.SIGCONT)
    client = await resuming
    assert await client.next() == {"type": "resumed", "since": seen[-1]["offset"], "recovered": True}
    live = [f"s{i}" for i in range(30)]
    r.lpush(queue, *live)
    r.close()
    assert [f["content"] for f in await read_n(client, 30)] == live, "nothing of the backlog again, then live"
    await nothing_more([client], pusher(redis_server, queue))
    await client.close()


# -- 7. a browser-like client ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_offering_permessage_deflate_connects_and_receives(twistd_service, redis_server, queue):
    """A client offering permessage-deflate (as every browser does) completes the handshake and gets messages."""
    from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateResponseAccept

    node = start_nodes(twistd_service, 1, queue=queue)[0]
    options = {
        "perMessageCompressionOffers": [PerMessageDeflateOffer()],
        "perMessageCompressionAccept": lambda response: PerMessageDeflateResponseAccept(response),
    }
    client = await connect(node.port, origin=f"http://127.0.0.1:{node.port}", options=options)
    r = redis_server.client()
    r.lpush(queue, "hello", json.dumps({"content": {"big": "x" * 5000}}))
    r.close()
    frames = await read_n(client, 2, timeout=20)
    assert [f["content"] for f in frames] == ["hello", {"big": "x" * 5000}]
    await client.close()
