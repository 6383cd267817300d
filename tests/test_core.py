"""The ingest loop, delivery, publish and channels, in-process against a real redis-server."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from support.clients import connect
from support.waiting import timed, until


@pytest_twisted.ensureDeferred
async def test_pushed_item_reaches_every_client(node, redis_sync):
    """A plain LPUSHed string reaches every connection as a broadcast with an offset."""
    a, b = await connect(node.port), await connect(node.port)
    redis_sync.lpush(node.config.queue, "hello")
    for client in (a, b):
        frame = await client.next_of("message")
        assert frame["content"] == "hello" and frame["channel"] is None
        assert isinstance(frame["offset"], str)
    await a.close()
    await b.close()


@pytest_twisted.ensureDeferred
async def test_order_and_exactly_once(node, redis_sync):
    """Items arrive in push order, each once, with increasing offsets."""
    client = await connect(node.port)
    redis_sync.lpush(node.config.queue, *[f"m{i}" for i in range(300)])
    frames = await client.messages(300)
    assert [f["content"] for f in frames] == [f"m{i}" for i in range(300)]
    offsets = [tuple(map(int, f["offset"].split("-"))) for f in frames]
    assert offsets == sorted(offsets) and len(set(offsets)) == 300
    await client.close()


@pytest_twisted.ensureDeferred
async def test_a_node_ready_for_replays_is_moving_items_too(redis_server, queue):
    """The moment the history is loaded, the mover runs too: /healthz never says "loading history" after it."""
    from support.inprocess import InProcessNode

    node = InProcessNode(redis_server.url, queue)
    node.service.startService()
    try:
        seen: list[str | None] = []
        await timed(node.hub.when_ready().addCallback(lambda _: seen.append(node.parts.bus.health())))
        assert seen != ["loading history"], seen
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_a_flushed_script_cache_loses_nothing(node, redis_sync):
    """After SCRIPT FLUSH (or a Redis restarted from a snapshot) the mover sends its script again: nothing lost."""
    client = await connect(node.port)
    redis_sync.lpush(node.config.queue, "before")
    assert (await client.next_of("message"))["content"] == "before"
    redis_sync.script_flush()
    redis_sync.lpush(node.config.queue, "after 1", "after 2")
    assert [(await client.next_of("message"))["content"] for _ in range(2)] == ["after 1", "after 2"]
    assert node.stats.dead_letters == 0
    await client.close()


@pytest_twisted.ensureDeferred
async def test_envelope_channels_and_users(node, redis_sync):
    """Envelopes reach their channel's subscribers only; plain items reach all."""
    news = await connect(node.port, "channels=news")
    other = await connect(node.port)
    q = node.config.queue
    redis_sync.lpush(q, json.dumps({"content": {"n": 1}, "channel": "news"}))
    redis_sync.lpush(q, json.dumps({"content": "all"}))
    first = await news.next_of("message")
    assert first["content"] == {"n": 1} and first["channel"] == "news"
    assert (await news.next_of("message"))["content"] == "all"
    assert (await other.next_of("message"))["content"] == "all"
    assert other.pending() == 0
    await news.close()
    await other.close()


@pytest_twisted.ensureDeferred
async def test_malformed_envelopes_go_to_the_dead_letter_list(node, redis_sync):
    """Undeliverable items land on <queue>:dead as pushed, counted, and the stream goes on in order."""
    client = await connect(node.port)
    q = node.config.queue
    bad = [
        json.dumps({"content": 1, "channel": 5}).encode(),
        json.dumps({"content": 1, "user": ""}).encode(),
        b"\xff\xfe not utf-8",
        b'{"content": "\\ud800", "channel": "private:x"}',
    ]
    redis_sync.lpush(q, "before", *bad, "after")
    assert [f["content"] for f in await client.messages(2)] == ["before", "after"]
    assert redis_sync.lrange(f"{q}:dead", 0, -1)[::-1] == bad
    # the mover counts them when its script returns, which may be after the tailer's delivery
    await until(lambda: node.stats.dead_letters == 4, what="dead letters counted")
    assert client.pending() == 0
    await client.close()


@pytest_twisted.ensureDeferred
async def test_client_publish_is_queued_and_acked(node):
    """A client message is LPUSHed as an envelope, acked, and reaches everyone on its channel in order."""
    sender = await connect(node.port, "channels=chat")
    other = await connect(node.port, "channels=chat")
    for i in range(5):
        sender.send({"type": "message", "content": {"i": i}, "channel": "chat", "id": i})
    frames = [await sender.next() for _ in range(10)]  # its 5 acks and its own 5 messages
    assert [f for f in frames if f["type"] == "ack"] == [{"type": "ack", "id": i} for i in range(5)]
    assert [f["content"]["i"] for f in frames if f["type"] == "message"] == list(range(5))
    got = await other.messages(5)
    assert [m["content"]["i"] for m in got] == list(range(5)) and {m["channel"] for m in got} == {"chat"}
    await sender.close()
    await other.close()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_wrong_typed_log_key_loses_nothing(make_node, queue, redis_sync):
    """If <queue>:log is not a stream, items stay on the list (and flow once it is fixed)."""
    node = await make_node(queue, stall_timeout=0.5)
    q = node.config.queue
    client = await connect(node.port)
    redis_sync.set(f"{q}:log", "oops")
    redis_sync.lpush(q, "kept")
    # the mover tries at once and keeps failing: once it counts as stalled, it has tried for --stall-timeout
    await until(lambda: "ingest" in (node.parts.bus.health() or ""), what="the ingest loop stalled")
    assert redis_sync.llen(q) == 1
    redis_sync.delete(f"{q}:log")
    assert (await client.next_of("message", timeout=15))["content"] == "kept"
    await client.close()
