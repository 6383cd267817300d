"""
Fixtures: a real redis-server per session, in-process nodes, real twistd
processes, and WebSocket clients. Nothing here imports the reactor at module
level: pytest-twisted installs it after conftests load.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

ROOT = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).with_name("twistd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class RedisServer:
    """A private redis-server on a free port, in a temp dir; restartable with its data."""

    def __init__(self, persistent: bool = False) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="pushservice-test-redis-")
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def __getitem__(self, key: str) -> Any:  # {"host", "port", "url"} like a dict
        return getattr(self, key)

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--dir",
                self.dir,
                "--save",
                "",
                *persistence,
                "--logfile",
                "redis.log",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: apt-get install redis-server")
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_sync(redis_server: RedisServer) -> Iterator[Any]:
    import redis

    client = redis.Redis(host=redis_server.host, port=redis_server.port, socket_timeout=10)
    yield client
    client.close()


@pytest.fixture
def queue() -> str:
    """A queue name of this test's own, so tests sharing a Redis never meet."""
    return f"q-{uuid.uuid4().hex[:10]}"


# -- real twistd processes ------------------------------------------------------


class TwistdProcess:
    """``twistd -n pushservice`` in a subprocess, listening on a port of its own."""

    def __init__(self, args: list[str], workdir: Path, port: int, queue: str) -> None:
        self.args = args
        self.workdir = workdir
        self.port = port
        self.queue = queue
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/"
        self.logfile = workdir / "twistd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"twistd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"twistd not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def twistd_args(port: int, queue: str, *extra: str) -> list[str]:
    """``twistd -n pushservice`` on 127.0.0.1:port and C{queue}, logging to stdout."""
    listen = f"tcp:{port}:interface=127.0.0.1"
    return [str(TWISTD), "-n", "--pidfile=", "--logfile=-", "pushservice", "--listen", listen, "--queue", queue, *extra]


@pytest.fixture
def twistd_service(redis_server: RedisServer, tmp_path: Path) -> Iterator[Any]:
    """Factory: ``twistd_service(*extra_args, queue=None)`` starts a node and waits until healthy."""
    started: list[TwistdProcess] = []

    def start(
        *extra: str, queue: str | None = None, redis: RedisServer | None = None, wait: bool = True
    ) -> TwistdProcess:
        port = free_port()
        queue = queue or f"q-{uuid.uuid4().hex[:10]}"
        workdir = tmp_path / f"node{len(started)}"
        workdir.mkdir()
        args = twistd_args(port, queue, "--redis", (redis or redis_server).url, *extra)
        proc = TwistdProcess(args, workdir, port, queue)
        started.append(proc)
        proc.start(wait=wait)
        return proc

    yield start
    for proc in started:
        proc.stop()


# -- in-process nodes and clients ----------------------------------------------


@pytest_twisted.async_yield_fixture
async def make_node(redis_server: RedisServer) -> Any:
    """Factory: ``await make_node(queue, **config)`` starts a PushService in this process."""
    from helpers import Node

    nodes: list[Node] = []

    async def start(queue: str, **overrides: Any) -> Node:
        node = Node(redis_server.url, queue, **overrides)
        nodes.append(node)
        await node.start()
        return node

    yield start
    for node in nodes:
        await node.stop()


@pytest_twisted.async_yield_fixture
async def node(make_node: Any, queue: str) -> Any:
    """One in-process node on its own queue."""
    yield await make_node(queue)
