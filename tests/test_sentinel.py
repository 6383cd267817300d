"""Redis Sentinel: a node follows the master the sentinels name, across a failover."""

from __future__ import annotations

import shutil

import pytest
import pytest_twisted
from support.clients import connect
from support.processes import RedisSentinel, RedisServer
from support.waiting import nothing_more, timed, until_sync
from twisted.internet import threads

pytestmark = pytest.mark.slow  # a sentinel, a replica and a failover


@pytest.fixture
def replicated(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    master, replica = RedisServer(persistent=True), RedisServer(persistent=True)
    master.start()
    replica.start()
    import redis

    redis.Redis(port=replica.port).replicaof("127.0.0.1", master.port)
    sentinel = RedisSentinel(tmp_path, master.port)
    yield master, replica, sentinel
    sentinel.stop()
    master.close()
    replica.close()


@pytest_twisted.ensureDeferred
async def test_node_follows_a_sentinel_failover(replicated, make_node, queue):
    """Through redis+sentinel:// a node reaches the master, and after a failover the new one, losing nothing."""
    import redis

    from pushservice.config import parse_redis_url

    master, replica, sentinel = replicated

    node = await make_node(queue, redis=parse_redis_url(f"redis+sentinel://127.0.0.1:{sentinel.port}/pm/0"))
    client = await connect(node.port)
    redis.Redis(port=master.port).lpush(queue, "before")
    assert (await client.next_of("message"))["content"] == "before"

    def fail_over() -> None:
        until_sync(lambda: redis.Redis(port=replica.port).xlen(f"{queue}:log") == 1, 30, "the replica has the log")
        master.stop()
        until_sync(lambda: redis.Redis(port=replica.port).role()[0] == b"master", 30, "the replica promoted")

    await timed(threads.deferToThread(fail_over), 40)
    new_master = redis.Redis(port=replica.port)
    new_master.lpush(queue, "after")
    frame = await client.next_of("message", timeout=30)
    assert frame["content"] == "after"
    await nothing_more([client], lambda marker: new_master.lpush(queue, marker))
    await client.close()
