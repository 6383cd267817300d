"""
No silent gap (issue 15): the log is never trimmed past a live node, a gap or
a reset that happens anyway is told to the clients, every resume answers
truthfully, a dead Redis connection is noticed, /healthz answers in time, and
non-reading clients cannot pin memory. Real redis-servers, real nodes.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest
import pytest_twisted
from support.clients import connect
from support.proxy import SilentProxy
from support.raw import non_reader
from support.waiting import sleep, timed, until
from support.web import health, scrape
from twisted.internet import threads

# -- helpers ------------------------------------------------------------------------------


async def read_messages(
    client: Any, n: int, timeout: float = 30.0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The next C{n} message frames, and the other frames seen meanwhile (gap, resumed...)."""
    messages: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(messages) < n:
        frame = await client.next(max(0.1, deadline - time.monotonic()))
        (messages if frame["type"] == "message" else others).append(frame)
    return messages, others


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


# -- retention ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_burst_bigger_than_the_log_reaches_the_client_whole(make_node, queue, redis_sync):
    """With --log-maxlen 100, a burst of 3000 still reaches the client whole: the log waits for the node."""
    node = await make_node(queue, log_maxlen=100)
    client = await connect(node.port)
    items = [f"b{i}" for i in range(3000)]
    for start in range(0, len(items), 500):
        redis_sync.lpush(queue, *items[start : start + 500])
    messages, others = await read_messages(client, len(items))
    assert [m["content"] for m in messages] == items
    assert others == [] and node.stats.gaps["trimmed"] == 0

    async def trimmed() -> bool:  # once the node has reported its place, the next moves trim
        redis_sync.lpush(queue, "tick")
        await client.next_of("message")
        return redis_sync.xlen(f"{queue}:log") < 1000

    await until(trimmed, 15, "the log trimmed")
    await client.close()


@pytest.mark.slow  # real twistd processes
@pytest_twisted.ensureDeferred
async def test_a_paused_node_within_its_ttl_misses_nothing(twistd_service, redis_sync, queue):
    """A node stopped (SIGSTOP) for less than --node-ttl while another moves and trims gets every message after."""
    a = twistd_service("--log-maxlen", "10", "--node-ttl", "60", queue=queue)
    b = twistd_service("--log-maxlen", "10", "--node-ttl", "60", queue=queue)
    client = await connect(b.port)
    assert b.proc is not None
    b.proc.send_signal(signal.SIGSTOP)
    try:
        items = [f"p{i}" for i in range(1500)]
        for start in range(0, len(items), 300):
            redis_sync.lpush(queue, *items[start : start + 300])
        await until(lambda: redis_sync.llen(queue) == 0, 30, "node A moved everything")
    finally:
        b.proc.send_signal(signal.SIGCONT)
    messages, others = await read_messages(client, len(items))
    assert [m["content"] for m in messages] == items and others == []
    await client.close()
    assert a.proc is not None and a.proc.poll() is None


@pytest.mark.slow  # real twistd processes
@pytest_twisted.ensureDeferred
async def test_a_node_paused_past_its_ttl_tells_its_clients(twistd_service, redis_sync, queue):
    """Stopped longer than --node-ttl, a node finds the trimmed entries missing and sends every client a gap frame."""
    twistd_service("--log-maxlen", "10", "--node-ttl", "1", queue=queue)
    b = twistd_service("--log-maxlen", "10", "--node-ttl", "1", queue=queue)
    client = await connect(b.port)
    redis_sync.lpush(queue, "first")
    assert (await client.next_of("message"))["content"] == "first"
    assert b.proc is not None
    b.proc.send_signal(signal.SIGSTOP)
    try:
        await until(lambda: len(redis_sync.keys(f"{queue}:node:*")) == 1, 15, "B's place expired")
        items = [f"t{i}" for i in range(1500)]
        for start in range(0, len(items), 300):
            redis_sync.lpush(queue, *items[start : start + 300])
        await until(lambda: redis_sync.llen(queue) == 0, 30, "node A moved everything")

        async def trimmed() -> bool:  # A trims as it moves, once it reported its own place
            items.append(f"tick{len(items)}")
            redis_sync.lpush(queue, items[-1])
            await until(lambda: redis_sync.llen(queue) == 0, 10, "tick moved")
            return redis_sync.xlen(f"{queue}:log") < 1000

        if redis_sync.xlen(f"{queue}:log") >= 1000:
            await until(trimmed, 20, "the log trimmed past B")
    finally:
        b.proc.send_signal(signal.SIGCONT)
    redis_sync.lpush(queue, "after")
    frames = []
    while not frames or frames[-1].get("content") != "after":  # bounded: each frame, and at most them all
        assert len(frames) <= len(items) + 2, frames[-3:]
        frames.append(await client.next(30))
    gaps = [f for f in frames if f["type"] == "gap"]
    assert len(gaps) == 1 and gaps[0]["reason"] == "trimmed" and gaps[0]["missed"] > 0, gaps
    at = frames.index(gaps[0])
    before = [f["content"] for f in frames[:at]]  # B's XREAD reply already in its socket when it stopped
    assert before == items[: len(before)]
    assert [f["content"] for f in frames[at + 1 :]] == items[len(before) + gaps[0]["missed"] :] + ["after"]
    assert "trimmed before this node read them" in b.log()
    await client.close()


# -- truthful resumes ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_resume_answers_truthfully(make_node, queue, redis_sync):
    """Connect with since: inside the history recovered, older not (what is held is replayed), unknown not (live)."""
    node = await make_node(queue, history=5)
    watcher = await connect(node.port)
    redis_sync.lpush(queue, *[f"n{i}" for i in range(17)])
    offsets = [m["offset"] for m in await watcher.messages(17)]
    await sleep(0.01)  # time on purpose: a later millisecond, so a hole in the offsets after n16
    redis_sync.lpush(queue, *[f"n{i}" for i in range(17, 20)])
    offsets += [m["offset"] for m in await watcher.messages(3)]

    inside = await connect(node.port, f"since={offsets[14]}")
    assert await inside.next() == {"type": "resumed", "since": offsets[14], "recovered": True}
    assert [m["content"] for m in await inside.messages(5)] == [f"n{i}" for i in range(15, 20)]

    older = await connect(node.port, f"since={offsets[13]}")
    assert await older.next() == {"type": "resumed", "since": offsets[13], "recovered": False}
    assert [m["content"] for m in await older.messages(5)] == [f"n{i}" for i in range(15, 20)]

    ms, seq = offsets[16].split("-")
    never = f"{ms}-{int(seq) + 1}"  # between n16 and n17, inside the history: never issued
    assert offsets[16] < never < offsets[17] or int(ms) < int(offsets[17].split("-")[0])
    future = "99999999999999-0"
    strangers = []
    for since in (never, future):
        client = await connect(node.port, f"since={since}")
        assert await client.next() == {"type": "resumed", "since": since, "recovered": False}
        strangers.append(client)
    redis_sync.lpush(queue, "live")
    for client in [inside, older, *strangers, watcher]:
        assert (await client.next_of("message"))["content"] == "live"  # nothing else came before it
    for client in [inside, older, *strangers, watcher]:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_future_since_in_subscribe_is_not_recovered(node, redis_sync):
    """A subscribe whose since this deployment never issued says recovered false and goes on live."""
    client = await connect(node.port)
    reply = await client.request({"id": 1, "type": "subscribe", "channel": "c", "since": "99999999999999-0"})
    assert reply == {"type": "subscribed", "channel": "c", "id": 1, "recovered": False}
    redis_sync.lpush(node.config.queue, json.dumps({"content": "on c", "channel": "c"}))
    assert (await client.next_of("message"))["content"] == "on c"
    await client.close()


# -- Redis faults -----------------------------------------------------------------------------


@pytest.mark.slow  # real twistd processes
@pytest_twisted.ensureDeferred
async def test_a_half_open_redis_connection_is_noticed(twistd_service, redis_server, queue, redis_sync):
    """A Redis connection that goes silent (no FIN, no RST) is dropped at its reply deadline and made again."""
    proxy = SilentProxy(redis_server.port)
    try:
        node = twistd_service("--redis", f"redis://127.0.0.1:{proxy.port}/0", "--redis-timeout", "1", queue=queue)
        client = await connect(node.port)
        redis_sync.lpush(queue, "before")
        assert (await client.next_of("message"))["content"] == "before"
        assert proxy.silence() == 4  # requests, mover, tailer, presence events
        redis_sync.lpush(queue, "during")
        # noticed within the block time (5 s) plus --redis-timeout, then reconnected through the proxy
        assert (await client.next_of("message", timeout=20))["content"] == "during"
        log = node.log()
        assert log.count("lost Redis") == 1 and log.count("connected to Redis") == 2, log
        assert "Scheduling retry" not in log
        # the idle request connection is found dead by its next command (a /healthz PING, at the latest)

        async def healthy() -> bool:
            status, took = await threads.deferToThread(health, node.url)
            assert took < 1.0, took
            return status == 200

        await until(healthy, 20, "healthy again")
        await client.close()
    finally:
        proxy.stop()


@pytest.mark.slow  # real twistd processes
@pytest_twisted.ensureDeferred
async def test_redis_restored_from_an_older_snapshot_is_told(twistd_service, queue, own_redis):
    """Redis restarted from an older snapshot: the node says "reset" to its clients instead of silently repeating."""
    own = own_redis()
    node = twistd_service("--redis-timeout", "1", redis=own, queue=queue)
    r = own.client()
    client = await connect(node.port)
    r.lpush(queue, *[f"s{i}" for i in range(10)])
    assert [m["content"] for m in await client.messages(10)] == [f"s{i}" for i in range(10)]
    r.save()  # the snapshot: 10 entries
    r.lpush(queue, *[f"u{i}" for i in range(10)])
    assert [m["content"] for m in await client.messages(10)] == [f"u{i}" for i in range(10)]
    r.close()
    await threads.deferToThread(own.stop, signal.SIGKILL)
    await threads.deferToThread(own.start)  # loads dump.rdb: the log is back at 10 entries
    r = own.client()
    r.lpush(queue, *[f"v{i}" for i in range(5)])
    gap = await client.next(20)
    assert gap["type"] == "gap" and gap["reason"] == "reset", gap
    assert [m["content"] for m in await client.messages(5, 20)] == [f"v{i}" for i in range(5)]
    assert "the log went back in time" in node.log()
    r.close()
    await client.close()


@pytest.mark.slow  # real twistd processes
@pytest_twisted.ensureDeferred
async def test_healthz_answers_within_a_second_while_redis_is_down(twistd_service, queue, own_redis):
    """With Redis stopped, /healthz says 503 at once, every time; with Redis back, 200."""
    own = own_redis()
    node = twistd_service("--redis-timeout", "5", redis=own, queue=queue)
    await threads.deferToThread(own.stop)
    await until(lambda: "lost Redis" in node.log(), 20, "lost Redis logged")
    for _ in range(5):
        status, took = await threads.deferToThread(health, node.url)
        assert status == 503 and took < 1.0, (status, took)
    await threads.deferToThread(own.start)
    await until(lambda: health(node.url)[0] == 200, 20, "healthy again")


# -- memory at the edges ------------------------------------------------------------------------


@pytest.mark.slow  # real twistd processes
@pytest_twisted.ensureDeferred
async def test_non_reading_since0_clients_do_not_pin_memory(twistd_service, redis_sync, queue):
    """500 clients that ask for since=0 against a full history and never read grow the node by well under 1 MB each."""
    node = twistd_service(
        "--slow-client-seconds",
        "5",
        "--address-handshake-rate",
        "10000",
        "--address-handshake-burst",
        "10000",
        queue=queue,
    )
    watcher = await connect(node.port)
    filler = "x" * 1000
    for start in range(0, 4000, 500):
        redis_sync.lpush(queue, *[f"{i}{filler}" for i in range(start, start + 500)])
    await watcher.messages(4000, 60)  # the history now holds 4000 messages, ~4 MB
    assert node.proc is not None
    before = rss_kb(node.proc.pid)
    sockets = await threads.deferToThread(
        lambda: [non_reader(node.port, "/?since=0", read_head=False) for _ in range(500)]
    )
    try:
        await until(lambda: scrape(node.url).plain["pushservice_connections"] == 501, 30, "500 connections open")
        grown = rss_kb(node.proc.pid) - before
        assert grown < 500 * 512, f"the node grew {grown} KB for 500 non-reading clients"
        redis_sync.lpush(queue, "still serving")
        assert (await watcher.next_of("message", 20))["content"] == "still serving"
        await until(
            lambda: scrape(node.url).plain["pushservice_slow_disconnects_total"] == 500,
            30,
            "the non-readers dropped after --slow-client-seconds",
        )
    finally:
        for s in sockets:
            s.close()
    await timed(watcher.close(), 10)
