"""The README's first command: a node with no --redis finds or starts a Redis and serves the demo."""

from __future__ import annotations

import socket
import subprocess

import pytest
from support.processes import CLEAN_EXIT, TWISTD, TwistdProcess, assert_clean_log, free_port, twistd_args
from support.waiting import until_sync
from support.web import http_get

pytestmark = pytest.mark.slow  # real twistd processes


def redis_on_6379() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def test_without_redis_option_a_local_redis_is_used_and_the_demo_served(tmp_path, queue):
    """No --redis: the node uses (or starts) Redis on 127.0.0.1:6379, logs the demo URL, serves / and delivers."""
    import redis

    had_redis = redis_on_6379()
    port = free_port()
    node = TwistdProcess(twistd_args(port, queue), tmp_path, port, queue)
    node.start()
    try:
        assert f"demo page: http://127.0.0.1:{port}/" in node.log()
        page = http_get(node.url + "/")
        assert page.status == 200 and "pushservice.js" in page.body and "LPUSH" in page.body
        script = http_get(node.url + "/pushservice.js")
        assert script.status == 200 and "class PushService" in script.body
        client = redis.Redis(port=6379, socket_timeout=5)
        client.lpush(queue, "hello")
        until_sync(lambda: client.llen(queue) == 0 and client.xlen(f"{queue}:log") == 1, 5, f"moved\n{node.log()}")
        client.delete(queue, f"{queue}:log")
        client.close()
    finally:
        assert node.stop() in CLEAN_EXIT
    assert_clean_log(node.log())
    if not had_redis:
        assert "started a private redis-server" in node.log()
        assert not redis_on_6379(), "the private redis-server must stop with the node"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--listen", "tcp:notaport"], "--listen"),
        (["--redis", "http://x"], "--redis"),
        (["--max-message-size", "-1"], "--max-message-size"),
    ],
)
def test_bad_options_fail_with_a_clear_message(args, message):
    """A bad option makes twistd exit non-zero naming the option, before it starts anything."""
    out = subprocess.run([str(TWISTD), "-n", "pushservice", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert message in out.stdout + out.stderr
