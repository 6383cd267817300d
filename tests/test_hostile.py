"""
Hostile and broken clients against an in-process node, a real redis-server
and real loopback sockets: malformed frames, fragmentation, garbage on the
port, stalled handshakes, floods, connection limits and slow readers. Every
load loop is bounded in count and in time.
"""

from __future__ import annotations

import json
import random
import socket
import time
from typing import Any

import pytest
import pytest_twisted
from support.clients import Refused, connect
from support.raw import closed_by_peer, non_reader, raw, raw_ws, upgrade_request, ws_frame
from support.waiting import sleep, timed, until
from twisted.internet import threads


async def clean(node: Any, timeout: float = 10.0) -> None:
    """No peers and no channel or user index entries are left once every client is gone."""
    hub = node.hub
    await until(lambda: not hub.peers, timeout, what=f"hub.peers empty (left: {len(hub.peers)})")
    assert hub.census() == dict.fromkeys(("peers", "channels", "subscriptions", "users", "paused", "waiting"), 0)
    assert node.stats.connections == 0


async def assert_serving(node: Any, redis_sync: Any, client: Any, marker: str) -> None:
    """A pushed broadcast still reaches C{client}."""
    redis_sync.lpush(node.config.queue, marker)
    frame = await client.next_of("message")
    assert frame["content"] == marker


# -- bad input over a real WebSocket ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_bad_input_gets_its_error_and_the_connection_lives(make_node, queue, redis_sync):
    """Each malformed frame gets its error (with the request id where it had one); a subscribe works after."""
    node = await make_node(queue, max_message_size=1024, max_frame_size=4096)
    client = await connect(node.port)
    cases: list[tuple[bytes | str, str, Any]] = [
        ("not json", "bad_request", None),
        ('{"type":"subscribe","channel":"a",}', "bad_request", None),
        ("[1,2,3]", "bad_request", None),
        ('{"type":"message","content":NaN,"id":1}', "bad_request", None),
        ('{"type":"nope","id":"u1"}', "bad_request", "u1"),
        ('{"id":"m1","channel":"a"}', "bad_request", "m1"),
        ('{"type":"subscribe","channel":5,"id":2}', "bad_request", 2),
        ('{"type":"subscribe","channel":"","id":3}', "bad_request", 3),
        ('{"type":"subscribe","channel":"' + "x" * 256 + '","id":4}', "bad_request", 4),
        ('{"type":"subscribe","channel":"a","since":"yesterday","id":5}', "bad_request", 5),
        ('{"type":"unsubscribe","channel":["a"],"id":6}', "bad_request", 6),
        ('{"type":"message","channel":{},"content":1,"id":7}', "bad_request", 7),
        ('{"type":"message","channel":"a","id":8}', "bad_request", 8),
        ('{"type":"subscribe","channel":"a","id":true}', "bad_request", None),
        ('{"type":"subscribe","channel":"a","id":1.5}', "bad_request", None),
        ('{"type":"subscribe","channel":"a","id":{"x":1}}', "bad_request", None),
        ('{"id":"big","type":"message","content":"' + "y" * 2000 + '"}', "too_large", "big"),
        ('{"type":"message","content":"' + "y" * 2000 + '","id":"late"}', "too_large", None),
        ('{"id":9,"type":"message","content":1e999}', "bad_request", 9),
        ('{"id":10,"type":"message","content":' + "[" * 70 + "]" * 70 + "}", "bad_request", 10),
    ]
    for payload, code, rid in cases:
        data = payload.encode() if isinstance(payload, str) else payload
        client.sendMessage(data)
        frame = await client.next_of("error")
        assert frame["code"] == code, (payload[:60], frame)
        assert frame.get("id") == rid, (payload[:60], frame)
        assert isinstance(frame["message"], str) and frame["message"]
    client.sendMessage(b'{"type":"subscribe","channel":"a","id":9}', isBinary=True)
    frame = await client.next_of("error")
    assert frame["code"] == "bad_request"
    # nothing was published, nothing else was sent, and the connection still works
    assert redis_sync.llen(queue) == 0
    assert client.pending() == 0
    reply = await client.request({"type": "subscribe", "channel": "a", "id": "ok"})
    assert reply == {"type": "subscribed", "channel": "a", "id": "ok"}
    redis_sync.lpush(queue, json.dumps({"content": "after", "channel": "a"}))
    assert (await client.next_of("message"))["content"] == "after"
    assert node.stats.errors["bad_request"] == 19 and node.stats.errors["too_large"] == 2
    await client.close()
    await clean(node)


@pytest_twisted.ensureDeferred
async def test_past_the_frame_hard_limit_closes_1009(make_node, queue, redis_sync):
    """A message over max_frame_size (whole or fragmented) closes that connection with 1009; others live on."""
    node = await make_node(queue, max_message_size=1024, max_frame_size=4096)
    other = await connect(node.port)
    big = json.dumps({"type": "message", "content": "z" * 5000, "id": 1}).encode()
    for fragment in (None, 1000):
        client = await connect(node.port)
        client.sendMessage(big, fragmentSize=fragment)
        code, reason = await timed(client.closed, 10)
        assert code == 1009, (fragment, code, reason)
    # a raw client gets the close frame itself
    r = await raw_ws(node.port)
    r.send(ws_frame(big))
    await until(lambda: r.lost, what="server closes the raw connection")
    assert r.close_code() == 1009
    await assert_serving(node, redis_sync, other, "still here")
    assert redis_sync.llen(queue) == 0
    await other.close()
    await clean(node)


# -- fragmentation and UTF-8 -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fragmented_messages_are_reassembled(node, redis_sync):
    """A message split over continuation frames (Autobahn or raw, with a ping between) is one request."""
    client = await connect(node.port)
    client.sendMessage(json.dumps({"type": "subscribe", "channel": "frag", "id": "f1"}).encode(), fragmentSize=3)
    assert await client.next() == {"type": "subscribed", "channel": "frag", "id": "f1"}

    r = await raw_ws(node.port)
    payload = json.dumps({"type": "subscribe", "channel": "frägment", "id": "f2"}, ensure_ascii=False).encode()
    cut = payload.index("ä".encode()) + 1  # split inside the two-byte character
    r.send(ws_frame(payload[:5], opcode=1, fin=False))
    r.send(ws_frame(b"hi", opcode=9))  # a ping between fragments is allowed
    r.send(ws_frame(payload[5:cut], opcode=0, fin=False))
    r.send(ws_frame(payload[cut:], opcode=0, fin=True))
    await until(lambda: r.json_frames(), what="reply to the fragmented subscribe")
    assert (10, b"hi") in r.frames  # the pong
    assert r.json_frames() == [{"type": "subscribed", "channel": "frägment", "id": "f2"}]
    redis_sync.lpush(node.config.queue, json.dumps({"content": 1, "channel": "frägment"}))
    await until(lambda: len(r.json_frames()) == 2, what="message on the fragmented channel")
    assert r.json_frames()[1]["content"] == 1
    r.abort()
    await client.close()
    await clean(node)


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_closes_1007_and_others_live(node, redis_sync):
    """Invalid UTF-8 in a text frame (whole or in a fragment) closes that connection with 1007 only."""
    other = await connect(node.port, "channels=u")
    for frames in (
        [ws_frame(b'{"type":"message","content":"\xff\xfe"}')],
        [ws_frame(b'{"type":"subscribe","channel":"\xc3', fin=False), ws_frame(b'(x"}', opcode=0)],
        [ws_frame(b'{"type":"subscribe","channel":"\xed\xa0\x80"}')],  # an encoded surrogate
    ):
        r = await raw_ws(node.port)
        for f in frames:
            r.send(f)
        await until(lambda r=r: r.lost, what="server closes the connection")
        assert r.close_code() == 1007, r.frames
        assert r.json_frames() == []
    await assert_serving(node, redis_sync, other, "utf8 ok")
    assert redis_sync.llen(node.config.queue) == 0
    await other.close()
    await clean(node)


# -- garbage and stalled handshakes ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_garbage_bytes_on_the_port(node, redis_sync):
    """Random bytes on the port are answered or closed quickly; a normal client keeps receiving."""
    client = await connect(node.port)
    rng = random.Random(1234)
    junk = [await raw(node.port) for _ in range(5)]
    for i, r in enumerate(junk):
        if i == 0:
            r.send(rng.randbytes(64 * 1024))  # no request line fits the line limit
        elif i == 1:
            r.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(500))  # a TLS hello
        elif i == 2:
            r.send(b"GET / HTTP/1.1\r\n" + rng.randbytes(2000).replace(b"\n", b"") + b"\r\n\r\n")
        elif i == 3:
            r.send(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")  # no key
        else:
            r.send(upgrade_request(node.port).replace(b"13", b"99"))  # unsupported version
    await assert_serving(node, redis_sync, client, "through the junk")
    for r in junk:
        r.send(b"\r\n\r\n")
    await until(lambda: all(r.lost for r in junk), 10, what="every junk connection closed by the server")
    for r in junk[3:]:
        assert r.status is not None and 400 <= r.status < 500, r.head
    await assert_serving(node, redis_sync, client, "after the junk")
    await client.close()
    await clean(node)


@pytest_twisted.ensureDeferred
async def test_stalled_handshake_is_closed_and_does_not_block(make_node, queue, redis_sync):
    """A half-sent request head does not block other clients and is closed after --handshake-timeout."""
    node = await make_node(queue, handshake_timeout=1, http_timeout=60)  # only the handshake timeout can close them
    client = await connect(node.port)
    stalled = [await raw(node.port) for _ in range(3)]
    stalled[0].send(upgrade_request(node.port)[:40])
    stalled[1].send(b"GE")
    # [2] sends nothing at all
    await assert_serving(node, redis_sync, client, "while stalled")
    late = await connect(node.port)  # new handshakes are served meanwhile
    await until(lambda: all(r.lost for r in stalled), 15, what="stalled sockets closed by the server")
    await assert_serving(node, redis_sync, late, "after the stall")
    for c in (client, late):
        await c.close()
    await clean(node)


@pytest_twisted.ensureDeferred
async def test_open_then_silent_is_closed_by_autoping(make_node, queue):
    """A client that completes the handshake and then never answers pings is dropped within interval+timeout."""
    node = await make_node(queue, ping_interval=0.5, ping_timeout=0.5)
    r = await raw_ws(node.port)
    await until(lambda: any(op == 9 for op, _ in r.frames), 5, what="server ping")
    await until(lambda: r.lost, 8, what="server drops a client that never pongs")
    await clean(node)


# -- floods ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_subscribe_flood(make_node, queue, redis_sync):
    """1000 fast subscribes: rate_limited past the burst, never over max_subscriptions; others unaffected."""
    node = await make_node(queue, max_subscriptions=10, client_burst=50, client_rate=5.0)
    bystander = await connect(node.port, "channels=c0")
    flooder = await connect(node.port)
    started = time.monotonic()
    for i in range(1000):
        flooder.send({"id": i, "type": "subscribe", "channel": f"c{i}"})
    replies = [await flooder.next(15) for _ in range(1000)]
    took = time.monotonic() - started
    kinds: dict[str, int] = {}
    for f in replies:
        key = f["type"] if f["type"] != "error" else f["code"]
        kinds[key] = kinds.get(key, 0) + 1
    assert kinds["subscribed"] == 10, kinds
    assert node.hub.census()["subscriptions"] == 11  # the flooder's 10 and the bystander's 1
    assert [f["id"] for f in replies if f["type"] == "subscribed"] == list(range(10))
    assert all("id" in f for f in replies)  # leading ids are echoed, also for rate_limited
    allowed = 50 + int(took * 5.0) + 1
    assert kinds["subscribed"] + kinds.get("bad_request", 0) <= allowed, (kinds, took)
    assert kinds["rate_limited"] >= 1000 - allowed, kinds
    assert set(kinds) <= {"subscribed", "bad_request", "rate_limited"}, kinds
    assert node.hub.subscribers("c0") == 2
    # the bystander has its own budget and still gets its channel
    redis_sync.lpush(queue, json.dumps({"content": "c0 news", "channel": "c0"}))
    assert (await bystander.next_of("message"))["content"] == "c0 news"
    assert (await flooder.next_of("message"))["content"] == "c0 news"
    assert (await bystander.request({"type": "subscribe", "channel": "b", "id": 1}))["type"] == "subscribed"
    await flooder.close()
    await until(lambda: node.hub.subscribers("c0") == 1, what="flooder's subscriptions released")
    assert node.hub.census()["channels"] == 2
    await bystander.close()
    await clean(node)


@pytest_twisted.ensureDeferred
async def test_publish_rate_limit(make_node, queue):
    """Past client_burst publishes get rate_limited; the rest are acked, delivered once, and the budget refills."""
    node = await make_node(queue, client_rate=5.0, client_burst=5)
    listener = await connect(node.port)
    client = await connect(node.port)
    for i in range(20):
        client.send({"type": "message", "content": f"p{i}", "id": i})
    frames = [await client.next() for _ in range(25)]  # 20 replies + the 5 accepted broadcasts
    acks = [f["id"] for f in frames if f["type"] == "ack"]
    limited = [f for f in frames if f["type"] == "error"]
    delivered = [f["content"] for f in frames if f["type"] == "message"]
    assert sorted(acks) == [0, 1, 2, 3, 4], frames
    assert len(limited) == 15 and {f["code"] for f in limited} == {"rate_limited"}
    assert delivered == [f"p{i}" for i in range(5)]
    assert [f["content"] for f in await listener.messages(5)] == delivered
    assert client.pending() == 0 and listener.pending() == 0
    await sleep(0.5)  # time on purpose: at 5/s the budget refills about two tokens
    assert (await client.request({"type": "message", "content": "again", "id": "a"})) == {"type": "ack", "id": "a"}
    assert (await listener.next_of("message"))["content"] == "again"
    assert node.stats.errors["rate_limited"] == 15
    for c in (client, listener):
        await c.close()
    await clean(node)


# -- connection limit ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_max_connections_answers_503(make_node, queue):
    """With max_connections=3 the 4th handshake gets HTTP 503; a slot freed is usable again."""
    node = await make_node(queue, max_connections=3)
    clients = [await connect(node.port) for _ in range(3)]
    try:
        extra = await connect(node.port)
    except Refused as e:
        assert "503" in e.reason, e.reason
    else:
        await extra.close()
        raise AssertionError("a 4th connection was accepted")
    r = await raw(node.port)
    r.send(upgrade_request(node.port))
    await until(lambda: r.head is not None, what="HTTP answer")
    assert r.status == 503, r.head
    await until(lambda: r.lost, what="refused connection closed")
    await clients.pop().close()
    # refused handshakes did not leak a slot: exactly one is free again
    again = await connect(node.port)
    try:
        extra = await connect(node.port)
    except Refused as e:
        assert "503" in e.reason
    else:
        await extra.close()
        raise AssertionError("a 4th connection was accepted after a reconnect")
    for c in [*clients, again]:
        await c.close()
    await clean(node)
    assert node.parts.factory.countConnections == 0


# -- slow consumers --------------------------------------------------------------


@pytest.mark.slow  # about 2 s: a socket filled on purpose, and a drop after --slow-client-seconds
@pytest_twisted.ensureDeferred
async def test_slow_client_is_dropped_and_memory_bounded(make_node, queue, redis_sync):
    """A client that never reads is dropped after slow_client_seconds; what is queued for it stays under the bound."""
    limit, size, batch, total = 128 * 1024, 8 * 1024, 8, 300
    node = await make_node(queue, slow_client_bytes=limit, slow_client_seconds=1, batch=batch)
    reader = await connect(node.port)
    sock = await threads.deferToThread(non_reader, node.port)
    local = sock.getsockname()[1]
    await until(
        lambda: any(p.transport.getPeer().port == local for p in node.parts.factory.connections()),
        what="slow client registered",
    )
    slow = next(p for p in node.parts.factory.connections() if p.transport.getPeer().port == local)
    # loopback autotunes a send buffer up to tcp_wmem's max (4 MiB): pin the kernel's share to 64 KiB
    # so that a bounded push fills it and the node's own buffering is what gets tested
    slow.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    filler = "x" * (size - 20)
    got: list[dict[str, Any]] = []
    peak = 0
    for start in range(0, total, batch):
        redis_sync.lpush(queue, *[f"{i:05d}{filler}" for i in range(start, min(total, start + batch))])
        got += await reader.messages(min(total, start + batch) - start, 15)
        if slow.transport is not None and slow.session is not None:
            peak = max(peak, slow.queued())
    assert [f["content"][:5] for f in got] == [f"{i:05d}" for i in range(total)]
    assert peak <= limit + size + 64, peak
    await until(lambda: node.stats.slow_disconnects == 1, 10, what="slow client dropped")
    await until(lambda: node.stats.connections == 1, 10, what="slow client gone, the reader still connected")
    assert await threads.deferToThread(closed_by_peer, sock), "the server never closed the slow socket"
    await assert_serving(node, redis_sync, reader, "after the slow one")
    await reader.close()
    await clean(node)


# -- edge-case content and leaks ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_edge_case_content_round_trips(node, redis_sync):
    """Odd content within the JSON rules arrives as sent; beyond them (depth, number length) it is refused."""
    listener = await connect(node.port)
    client = await connect(node.port)
    contents: list[Any] = [
        {"deep": json.loads("[" * 62 + "]" * 62)},
        10**99,
        -(2**63),
        1e308,
        "\u0000\u2028\u2029\ufeff",
        {"": {"content": {"channel": None}}},
        "\U0001f600" * 100,
    ]
    refused = [b"[" * depth + b"]" * depth for depth in (64, 100, 500, 990, 5000)] + [b"1" * 101, b"9" * 301]
    for i, text in enumerate([json.dumps(c).encode() for c in contents] + refused):
        client.sendMessage(b'{"id":%d,"type":"message","content":%s}' % (i, text))
    replies: dict[int, dict[str, Any]] = {}
    got: dict[Any, list[Any]] = {listener: [], client: []}
    while len(replies) < len(contents) + len(refused):
        frame = await client.next()
        if frame["type"] == "message":
            got[client].append(frame["content"])
        else:
            replies[frame["id"]] = frame
    assert [replies[i]["type"] for i in range(len(contents))] == ["ack"] * len(contents), replies
    for i in range(len(contents), len(contents) + len(refused)):
        assert replies[i]["code"] == "bad_request", replies[i]
    redis_sync.lpush(node.config.queue, "sentinel")
    for c in (listener, client):
        frames = await c.until_marker("sentinel")
        assert all(f["type"] == "message" for f in frames), frames
        got[c] += [f["content"] for f in frames]
        assert got[c] == contents
    assert redis_sync.llen(node.config.dead_key) == 0
    # a lone surrogate (no UTF-8 form) is refused, not relayed
    for i, raw_frame in enumerate(
        (
            b'{"id":1,"type":"message","content":"a\\ud800b"}',
            b'{"id":2,"type":"message","content":"x","channel":"\\udc00"}',
        )
    ):
        client.sendMessage(raw_frame)
        assert (await client.next_of("error"))["id"] == i + 1
    redis_sync.lpush(node.config.queue, "sentinel 2")
    assert (await listener.next_of("message"))["content"] == "sentinel 2"
    for c in (listener, client):
        await c.close()
    await clean(node)


@pytest_twisted.ensureDeferred
async def test_no_leaks_after_churn(make_node, queue, redis_sync):
    """Clients that subscribe then vanish (clean close, TCP abort, mid-handshake) leave no hub state behind."""
    node = await make_node(queue, client_burst=200)
    clients = [await connect(node.port, f"channels=q{i % 3},all") for i in range(30)]
    for i, c in enumerate(clients):
        for k in range(5):
            c.send({"type": "subscribe", "channel": f"s{i}-{k}"})
        c.send({"type": "unsubscribe", "channel": "all"})
    for c in clients:
        for _ in range(6):
            await c.next()
    assert len(node.hub.peers) == 30 and node.hub.subscribers("q0") == 10
    half_open = [await raw(node.port) for _ in range(5)]
    for r in half_open:
        r.send(upgrade_request(node.port)[:30])
    for i, c in enumerate(clients):
        if i % 2:
            c.transport.abortConnection()
        else:
            c.sendClose(1000)
    for r in half_open:
        r.abort()
    await until(lambda: not node.hub.peers, 10, what="every peer removed")
    await clean(node)
    assert node.parts.factory.countConnections == 0
    # and the node still serves a newcomer
    late = await connect(node.port, "channels=q0")
    redis_sync.lpush(queue, json.dumps({"content": "fresh", "channel": "q0"}))
    assert (await late.next_of("message"))["content"] == "fresh"
    await late.close()
    await clean(node)
