"""Redis Sentinel: a node follows the master the sentinels name, across a failover."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from conftest import RedisServer, free_port, wait_port
from helpers import connect, timed
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater


class Sentinel:
    """A redis-server --sentinel watching one master, quick to fail over."""

    def __init__(self, workdir: Path, master_port: int) -> None:
        self.port = free_port()
        conf = workdir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {workdir}\n"
            f"sentinel monitor pm 127.0.0.1 {master_port} 1\n"
            "sentinel down-after-milliseconds pm 500\nsentinel failover-timeout pm 2000\n"
        )
        self.proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def replicated(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    master, replica = RedisServer(persistent=True), RedisServer(persistent=True)
    master.start()
    replica.start()
    import redis

    redis.Redis(port=replica.port).replicaof("127.0.0.1", master.port)
    sentinel = Sentinel(tmp_path, master.port)
    yield master, replica, sentinel
    sentinel.stop()
    master.close()
    replica.close()


def wait_until(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.1)


@pytest_twisted.ensureDeferred
async def test_node_follows_a_sentinel_failover(replicated, make_node):
    """Through redis+sentinel:// a node reaches the master, and after a failover the new one, losing nothing."""
    import redis

    master, replica, sentinel = replicated
    queue = f"q-{uuid.uuid4().hex[:8]}"
    from pushservice.config import parse_redis_url

    node = await make_node(queue, redis=parse_redis_url(f"redis+sentinel://127.0.0.1:{sentinel.port}/pm/0"))
    client = await connect(node.port)
    redis.Redis(port=master.port).lpush(queue, "before")
    assert (await client.next_of("message"))["content"] == "before"

    def fail_over() -> None:
        wait_until(lambda: redis.Redis(port=replica.port).xlen(f"{queue}:log") == 1)
        master.stop()
        wait_until(lambda: redis.Redis(port=replica.port).role()[0] == b"master")

    await timed(threads.deferToThread(fail_over), 40)
    redis.Redis(port=replica.port).lpush(queue, "after")
    frame = await client.next_of("message", timeout=30)
    assert frame["content"] == "after"
    await deferLater(reactor, 0.5, lambda: None)
    assert client.pending() == 0
    await client.close()
