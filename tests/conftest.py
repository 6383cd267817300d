"""
Fixtures: a real redis-server per session, in-process nodes, real twistd
processes, token secrets and a headless browser. What they are built from
lives in tests/support. Nothing here imports the reactor at module level:
pytest-twisted installs it after conftests load.

Tests that start twistd, Chromium or a sentinel, or take more than about
2 s, are marked ``slow``: ``pytest -m "not slow"`` is the quick loop (under
30 s), the whole suite the gate.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support.clients import SECRET
from support.processes import RedisServer, TwistdProcess, free_port, twistd_args


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole run; tests keep apart by queue name."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: apt-get install redis-server")
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def own_redis(redis_server: RedisServer) -> Iterator[Any]:
    """Factory: C{own_redis(persistent=False, start=True)}, a redis-server of the test's own (to stop, restart, lose)."""
    servers: list[RedisServer] = []

    def make(persistent: bool = False, start: bool = True) -> RedisServer:
        server = RedisServer(persistent=persistent)
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def redis_sync(redis_server: RedisServer) -> Iterator[Any]:
    """A blocking redis-py client of the session's Redis."""
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def queue() -> str:
    """A queue name of this test's own, so tests sharing a Redis never meet."""
    return f"q-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def secret_file(tmp_path: Path) -> str:
    """A token secret file holding L{support.clients.SECRET}, which L{support.clients.token} signs with."""
    path = tmp_path / "token-secret"
    path.write_bytes(SECRET + b"\n")
    return str(path)


# -- real twistd processes ------------------------------------------------------


@pytest.fixture
def procs() -> Iterator[list[TwistdProcess]]:
    """Processes a test starts (append them); whatever still runs is stopped at teardown."""
    started: list[TwistdProcess] = []
    yield started
    for proc in started:
        proc.stop()


@pytest.fixture
def twistd_service(redis_server: RedisServer, tmp_path: Path, procs: list[TwistdProcess]) -> Any:
    """Factory: ``twistd_service(*extra_args, queue=None, redis=None, wait=True)`` starts a node, by default healthy."""

    def start(
        *extra: str, queue: str | None = None, redis: RedisServer | None = None, wait: bool = True
    ) -> TwistdProcess:
        port = free_port()
        queue = queue or f"q-{uuid.uuid4().hex[:10]}"
        workdir = tmp_path / f"node{len(procs)}"
        workdir.mkdir()
        proc = TwistdProcess(twistd_args(port, queue, *extra, redis=redis or redis_server), workdir, port, queue)
        procs.append(proc)
        proc.start(wait=wait)
        return proc

    return start


# -- in-process nodes -----------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def make_node(redis_server: RedisServer) -> Any:
    """Factory: ``await make_node(queue, **config)`` starts a PushService in this process; stopped at teardown."""
    from support.inprocess import InProcessNode

    nodes: list[InProcessNode] = []

    async def start(queue: str, **overrides: Any) -> InProcessNode:
        node = InProcessNode(redis_server.url, queue, **overrides)
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


# -- a headless browser -----------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A headless Chromium (Selenium), quit at teardown; skips without Selenium, Chromium or its driver."""
    from support import browser as chromium

    pytest.importorskip("selenium.webdriver", reason="selenium (a test dependency) is not installed")
    if not chromium.available():
        pytest.skip(chromium.MISSING)
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not fetch a browser or a driver
    driver = chromium.start_chromium(tmp_path / "chromium-profile")
    try:
        yield driver
    finally:
        driver.quit()
