"""
--workers N with real twistd processes: N worker processes serving one port,
each a node of its own on the same Redis; a killed worker replaced while its
clients resume elsewhere; SIGTERM; daemon mode; a parent killed -9; TLS and
unix endpoints; /metrics per worker. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support.clients import SECRET, Client, connect, token
from support.processes import (
    CLEAN_EXIT,
    ROOT,
    START_TIMEOUT,
    TWISTD,
    RedisServer,
    TwistdProcess,
    assert_clean_log,
    free_port,
    node_args,
    pid_alive,
    run_daemon,
    stop_daemon,
    wait_port,
)
from support.waiting import nothing_more, timed, until, until_sync
from support.web import http_get, http_status, scrape
from test_ops import make_cert

pytestmark = pytest.mark.slow  # real twistd processes


def children(pid: int) -> set[int]:
    """The live child processes of C{pid} (its workers)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return set()
    return {int(p) for p in text.split() if pid_alive(int(p))}


def worker_pid(log: str, number: int) -> int:
    """The pid of worker C{number}'s latest start, from the parent's log."""
    return int(re.findall(rf"started worker {number} \(pid (\d+)\)", log)[-1])


def pusher(redis_sync: Any, queue: str) -> Any:
    return lambda text: redis_sync.lpush(queue, text)


def ready(pool: TwistdProcess, redis_sync: Any, n: int = 2) -> None:
    """Block until the parent runs C{n} workers and each holds its place in the log (a node of its own)."""
    assert pool.proc is not None
    until_sync(lambda: len(children(pool.proc.pid)) == n, START_TIMEOUT, f"{n} workers\n{pool.log()}")
    nodes = f"{pool.queue}:nodes"
    until_sync(lambda: redis_sync.scard(nodes) >= n, START_TIMEOUT, f"{n} nodes in Redis\n{pool.log()}")
    until_sync(lambda: pool.log().count("history: ") >= n, START_TIMEOUT, f"{n} histories loaded\n{pool.log()}")


def per_worker(url: str, name: str, want: int = 2, tries: int = 200) -> dict[str, float]:
    """C{name}'s value by worker label, scraping until every one of C{want} workers answered once."""
    seen: dict[str, float] = {}
    for _ in range(tries):
        scraped = scrape(url)
        assert not scraped.plain, f"every line names its worker: {sorted(scraped.plain)[:5]}"
        for (metric, labels), value in scraped.labelled.items():
            if metric == name:
                seen[dict(labels)["worker"]] = value
        if len(seen) >= want:
            return seen
    raise AssertionError(f"only workers {sorted(seen)} answered /metrics in {tries} scrapes")


def one_scrape(url: str, name: str) -> dict[str, float]:
    """C{name}'s value by worker label, in one scrape."""
    scraped = scrape(url)
    return {dict(labels)["worker"]: value for (metric, labels), value in scraped.labelled.items() if metric == name}


async def expect_all(clients: list[Client], texts: list[str]) -> list[list[dict]]:
    """Each client's next messages are exactly C{texts}, in order."""
    got = []
    for client in clients:
        frames = await client.messages(len(texts), 30)
        assert [f["content"] for f in frames] == texts
        got.append(frames)
    return got


@pytest_twisted.ensureDeferred
async def test_two_workers_serve_one_port_every_client_every_message_once(twistd_service, redis_sync):
    """--workers 2: one port, two nodes; 16 clients each get 300 pushes once, in order; /metrics lines name their worker."""
    pool = twistd_service("--workers", "2")
    ready(pool, redis_sync)
    assert len(pool.log().split("listening on ")) == 2, "the parent binds the port once"
    clients = [await connect(pool.port) for _ in range(16)]
    texts = [f"m{i}" for i in range(300)]
    redis_sync.lpush(pool.queue, *texts)
    await expect_all(clients, texts)
    await nothing_more(clients, pusher(redis_sync, pool.queue))

    connections = per_worker(pool.url, "pushservice_connections")
    assert sorted(connections) == ["1", "2"]
    until_sync(lambda: sum(per_worker(pool.url, "pushservice_connections").values()) == 16, 10, "16 connections")
    # whichever worker a scrape reaches answers for both: one scrape sees all 16, each family named once

    def both_in_one_scrape() -> bool:
        counts = one_scrape(pool.url, "pushservice_connections")
        return counts.keys() == {"1", "2"} and sum(counts.values()) == 16

    until_sync(lambda: all(both_in_one_scrape() for _ in range(6)), 10, "both workers, 16 connections, every scrape")
    text = http_get(pool.url + "/metrics").body
    assert text.count("# TYPE pushservice_connections gauge") == 1
    assert 'pushservice_connections{worker="1"}' in text and 'pushservice_connections{worker="2"}' in text
    for client in clients:
        await client.close()
    assert pool.stop() in CLEAN_EXIT
    assert_clean_log(pool.log())


@pytest_twisted.ensureDeferred
async def test_killed_worker_is_replaced_and_its_clients_resume_with_since(twistd_service, redis_sync):
    """A worker killed -9 is replaced; its clients reconnect with since= and, like the others, miss and repeat nothing."""
    pool = twistd_service("--workers", "2")
    ready(pool, redis_sync)
    clients = [await connect(pool.port) for _ in range(12)]
    first = [f"a{i}" for i in range(100)]
    redis_sync.lpush(pool.queue, *first)
    seen = [list(frames) for frames in await expect_all(clients, first)]

    counts = per_worker(pool.url, "pushservice_connections")
    victim = max(counts, key=lambda n: counts[n])  # the worker with the most clients: at least one
    pid = worker_pid(pool.log(), int(victim))
    os.kill(pid, signal.SIGKILL)
    during = [f"b{i}" for i in range(100)]
    redis_sync.lpush(pool.queue, *during)  # while the worker is dead or restarting

    on_victim = counts[victim]
    await until(lambda: sum(c.closed.called for c in clients) == on_victim, 15, f"{on_victim} clients dropped")
    for i, client in enumerate(clients):
        if client.closed.called:  # it was on the killed worker: resume where it was, on whichever worker
            assert [f["type"] for f in client.drain()] == ["<closed>"]
            since = seen[i][-1]["offset"]
            client = clients[i] = await connect(pool.port, f"since={since}", timeout=20)
            assert await client.next() == {"type": "resumed", "since": since, "recovered": True}
        got = await client.messages(len(during), 30)
        assert [f["content"] for f in got] == during

    def replaced() -> bool:  # a child at once, and in the log a moment later: wait for both
        return len(children(pool.proc.pid)) == 2 and worker_pid(pool.log(), int(victim)) != pid

    until_sync(replaced, 30, f"a new worker\n{pool.log()}")
    assert f"worker {victim} (pid {pid}) was killed by signal 9" in pool.log()
    last = [f"c{i}" for i in range(50)]
    redis_sync.lpush(pool.queue, *last)
    await expect_all(clients, last)
    await nothing_more(clients, pusher(redis_sync, pool.queue))
    assert pool.stop() in CLEAN_EXIT
    assert_clean_log(pool.log())


@pytest_twisted.ensureDeferred
async def test_sigterm_closes_every_client_with_1001_and_the_parent_exits_cleanly(twistd_service, redis_sync):
    """SIGTERM to the parent: every worker closes its clients with 1001 and exits, then the parent, with no traceback."""
    pool = twistd_service("--workers", "2", "--shutdown-timeout", "5")
    ready(pool, redis_sync)
    workers = children(pool.proc.pid)
    clients = [await connect(pool.port) for _ in range(10)]
    assert sum(per_worker(pool.url, "pushservice_connections").values()) == 10
    pool.send_signal(signal.SIGTERM)
    codes = [await timed(client.closed, 15) for client in clients]
    assert [code for code, _ in codes] == [1001] * 10, codes
    assert await pool.exited(30) in CLEAN_EXIT
    assert not any(pid_alive(pid) for pid in workers)
    log = pool.log()
    assert_clean_log(log)
    assert "worker 1: stopped" in log and "worker 2: stopped" in log, log
    assert "exited with code 0" in log and "SIGKILL" not in log and "starting a new one" not in log, log
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", pool.port), timeout=5).close()


@pytest_twisted.ensureDeferred
async def test_workers_die_with_a_parent_killed_9(twistd_service, redis_sync):
    """The parent killed -9: its workers notice, close their clients with 1001 and exit on their own."""
    pool = twistd_service("--workers", "2", "--shutdown-timeout", "5")
    ready(pool, redis_sync)
    workers = children(pool.proc.pid)
    clients = [await connect(pool.port) for _ in range(4)]
    pool.kill()
    for client in clients:
        code, _ = await timed(client.closed, 15)
        assert code == 1001
    await until(lambda: not any(pid_alive(pid) for pid in workers), 20, "workers gone")


@pytest_twisted.ensureDeferred
async def test_a_paused_parent_does_not_stop_its_workers(twistd_service, redis_sync):
    """Parent SIGSTOPped while workers log thousands of lines: they keep delivering; the dropped lines are counted."""
    pool = twistd_service("--workers", "2")
    ready(pool, redis_sync)
    clients = [await connect(pool.port) for _ in range(4)]
    assert pool.proc is not None
    os.kill(pool.proc.pid, signal.SIGSTOP)
    try:
        # each undeliverable item is a warning in the log: ~1.5 MB of lines the parent does not read
        redis_sync.lpush(pool.queue, *[f'{{"content": {i}, "channel": 5}}' for i in range(5000)])
        texts = [f"after{i}" for i in range(50)]
        redis_sync.lpush(pool.queue, *texts)
        await expect_all(clients, texts)
    finally:
        os.kill(pool.proc.pid, signal.SIGCONT)
    until_sync(lambda: "log lines while the parent did not read them" in pool.log(), 10, "the note of dropped lines")
    assert redis_sync.llen(f"{pool.queue}:dead") == 5000
    for client in clients:
        await client.close()
    assert pool.stop() in CLEAN_EXIT


def test_daemon_mode_with_workers(redis_server: RedisServer, queue: str, tmp_path: Path, redis_sync: Any) -> None:
    """twistd --pidfile --logfile (no -n) --workers 2: daemonizes, both workers log to the file; SIGTERM cleans up."""
    port = free_port()
    pidfile, logfile = tmp_path / "ps.pid", tmp_path / "ps.log"
    pids: list[int] = []
    args = [TWISTD, "--pidfile", pidfile, "--logfile", logfile, *node_args(port, queue, "--workers", "2")]
    args += ["--redis", redis_server.url]
    pid = run_daemon(args, tmp_path, pidfile, pids)
    try:
        until_sync(lambda: http_status(f"http://127.0.0.1:{port}/healthz") == 200, START_TIMEOUT, "healthy")
        until_sync(lambda: len(children(pid)) == 2, START_TIMEOUT, "2 workers")
        for n in (1, 2):
            line = f"worker {n}: connected to Redis"
            until_sync(lambda: line in logfile.read_text(), 20, line)  # noqa: B023 (used at once)
        workers = children(pid)
        stop_daemon(pid, pidfile)
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    until_sync(lambda: not any(pid_alive(p) for p in workers), 10, "workers gone")
    log = logfile.read_text()
    assert_clean_log(log)
    assert "worker 1: stopped" in log and "worker 2: stopped" in log and "Server Shut Down" in log, log


@pytest_twisted.ensureDeferred
async def test_tls_unix_and_token_secret_handed_to_workers(
    redis_server, redis_sync, queue, tmp_path, procs, secret_file
):
    """ssl: and unix: endpoints and the token secret reach every worker (never on its command line); a worker's
    own SIGTERM leaves the shared unix socket in place; the parent removes it at exit."""
    key, cert = make_cert(tmp_path)
    port = free_port()
    sock = tmp_path / "ps.sock"
    listen = f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    extra = ["--listen", f"unix:{sock}", "--workers", "2", "--token-secret-file", secret_file]
    args = [
        TWISTD,
        "-n",
        "--pidfile=",
        "--logfile=-",
        *node_args(port, queue, *extra, redis=redis_server, listen=listen),
    ]
    context = ssl.create_default_context(cafile=str(cert))
    pool = TwistdProcess(args, tmp_path, port, queue, scheme="https", host="localhost", context=context)
    procs.append(pool)
    pool.start()
    ready(pool, redis_sync)
    for pid in children(pool.proc.pid):
        for what in ("cmdline", "environ"):
            assert SECRET not in Path(f"/proc/{pid}/{what}").read_bytes()

    clients = [await connect(port, f"token={token('alice')}", trust=cert.read_bytes()) for _ in range(6)]
    redis_sync.lpush(queue, json.dumps({"content": "for alice", "user": "alice"}))
    for client in clients:
        assert (await client.next_of("message"))["content"] == "for alice"

    os.kill(worker_pid(pool.log(), 1), signal.SIGTERM)
    until_sync(lambda: pool.log().count("started worker 1 ") == 2, 20, f"worker 1 replaced\n{pool.log()}")
    assert sock.exists(), "a worker stopping alone must not remove the shared unix socket"
    until_sync(lambda: _unix_health(sock) == 200, 20, "the unix socket serves")
    for client in clients:
        if not client.closed.called:
            await client.close()
    assert pool.stop() in CLEAN_EXIT
    assert not sock.exists()
    assert_clean_log(pool.log())


def _unix_health(path: Path) -> int | None:
    """GET /healthz over the unix socket at C{path}: the status, or None."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        try:
            s.connect(str(path))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = s.recv(64)
        except OSError:
            return None
    return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None


@pytest_twisted.ensureDeferred
async def test_a_hung_worker_is_killed_at_shutdown_within_the_bound(twistd_service, redis_sync):
    """A worker that ignores SIGTERM (stopped) is SIGKILLed after --shutdown-timeout + 5 s; the parent still exits cleanly."""
    pool = twistd_service("--workers", "2", "--shutdown-timeout", "1")
    ready(pool, redis_sync)
    hung = worker_pid(pool.log(), 1)
    os.kill(hung, signal.SIGSTOP)
    try:
        pool.send_signal(signal.SIGTERM)
        assert await pool.exited(20) in CLEAN_EXIT
    finally:
        if pid_alive(hung):
            os.kill(hung, signal.SIGKILL)
    log = pool.log()
    assert f"worker 1 (pid {hung}) still runs: SIGKILL" in log, log
    assert f"worker 1 (pid {hung}) was killed by signal 9" in log and "worker 2: stopped" in log, log
    assert_clean_log(log)
    assert not pid_alive(hung)


@pytest_twisted.ensureDeferred
async def test_systemd_socket_activation_with_workers(redis_server, redis_sync, queue, tmp_path, procs):
    """Under systemd-socket-activate, --workers 2 --listen systemd:... shares the inherited socket between two workers."""
    import shutil

    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (apt-get install systemd)")
    port = free_port()
    listen = "systemd:domain=INET:name=pushservice"
    args = [activate, "-l", f"127.0.0.1:{port}", "--fdname=pushservice", "-E", f"PYTHONPATH={ROOT}"]
    args += [TWISTD, "-n", "--pidfile=", "--logfile=-"]
    args += node_args(port, queue, "--workers", "2", redis=redis_server, listen=listen)
    pool = TwistdProcess(args, tmp_path, port, queue)
    procs.append(pool)
    pool.start(wait=False)
    wait_port(port, timeout=10)  # the activator's socket; a connection makes it exec twistd
    pool.wait_healthy()
    ready(pool, redis_sync)
    clients = [await connect(port) for _ in range(6)]
    redis_sync.lpush(queue, "activated")
    for client in clients:
        assert (await client.next_of("message"))["content"] == "activated"
    assert sorted(per_worker(pool.url, "pushservice_connections")) == ["1", "2"]
    pool.send_signal(signal.SIGTERM)
    assert [(await timed(c.closed, 15))[0] for c in clients] == [1001] * 6
    assert await pool.exited(30) in CLEAN_EXIT
    assert_clean_log(pool.log())
