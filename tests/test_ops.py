"""
Operations, with real processes: daemon mode and twistd's own options, the
.tac, .tap files, systemd socket activation, TLS, graceful shutdown, a Redis
outage and /metrics. Every wait is bounded. The tests that start a twistd
process are marked slow; the quick loop keeps the in-process ones.
"""

from __future__ import annotations

import grp
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support.clients import connect
from support.inprocess import InProcessNode
from support.processes import (
    CLEAN_EXIT,
    MKTAP,
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
from support.waiting import timed, until, until_sync
from support.web import http_status, scrape


async def receive_pushed(port: int, redis_sync: Any, queue: str) -> None:
    """Connect a client, LPUSH an item, and check the client gets it."""
    client = await connect(port)
    text = f"hello-{queue}"
    redis_sync.lpush(queue, text)
    frame = await client.next_of("message")
    assert frame["content"] == text and frame["channel"] is None
    await client.close()


# -- daemon mode and twistd's own options -------------------------------------------------


@pytest.fixture
def daemon_pids() -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow  # a real twistd process
def test_daemon_mode_pidfile_logfile_umask(
    redis_server: RedisServer, queue: str, tmp_path: Path, daemon_pids: list[int]
) -> None:
    """twistd --pidfile --logfile --umask 0027 (no -n) daemonizes, serves /healthz, and SIGTERM stops it cleanly."""
    port = free_port()
    pidfile, logfile = tmp_path / "ps.pid", tmp_path / "ps.log"
    pid = run_daemon(
        [
            TWISTD,
            "--pidfile",
            pidfile,
            "--logfile",
            logfile,
            "--umask",
            "0027",
            *node_args(port, queue, redis=redis_server),
        ],
        tmp_path,
        pidfile,
        daemon_pids,
    )
    assert os.getsid(pid) != os.getsid(0), "the daemon has a session of its own"
    assert pidfile.stat().st_mode & 0o777 == 0o640, oct(pidfile.stat().st_mode)
    until_sync(lambda: http_status(f"http://127.0.0.1:{port}/healthz") == 200, START_TIMEOUT, "daemon healthy")
    until_sync(lambda: "connected to Redis" in logfile.read_text(), 10, "'connected to Redis' in the log file")
    assert "listening on" in logfile.read_text()
    stop_daemon(pid, pidfile)
    log = logfile.read_text()
    assert "stopped" in log and "Server Shut Down" in log, log
    assert_clean_log(log)


@pytest.mark.slow  # a real twistd process
@pytest.mark.parametrize(("reactor", "reactor_class"), [("epoll", "EPollReactor"), ("poll", "PollReactor")])
def test_reactor_choice(
    redis_server: RedisServer, queue: str, tmp_path: Path, procs: list[TwistdProcess], reactor: str, reactor_class: str
) -> None:
    """twistd -r epoll / -r poll runs the service on that reactor (the plugin imports no reactor early)."""
    port = free_port()
    proc = TwistdProcess(
        [TWISTD, "-n", "--pidfile=", "--logfile=-", "-r", reactor, *node_args(port, queue, redis=redis_server)],
        tmp_path,
        port,
    )
    procs.append(proc)
    proc.start()
    assert f"reactor class: twisted.internet.{reactor}reactor.{reactor_class}" in proc.log(), proc.log()
    assert proc.stop() in CLEAN_EXIT
    assert_clean_log(proc.log())


@pytest.mark.slow  # a real twistd process
def test_syslog(redis_server: RedisServer, queue: str, tmp_path: Path, procs: list[TwistdProcess]) -> None:
    """twistd --syslog --prefix starts the service (logging to syslog, not stdout) and stops it cleanly."""
    port = free_port()
    proc = TwistdProcess(
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "--syslog",
            "--prefix",
            "pushservice-test",
            *node_args(port, queue, redis=redis_server),
        ],
        tmp_path,
        port,
    )
    procs.append(proc)
    proc.start()
    assert proc.stop() in CLEAN_EXIT
    assert "listening on" not in proc.log(), "logs went to stdout instead of syslog"
    assert_clean_log(proc.log())


def _unprivileged_python_works(user: str, group: str) -> str | None:
    """Why C{user} cannot run this interpreter's stdlib imports, or None if it can."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", "import configparser, hashlib, json, ssl, zlib"],
            user=user,
            group=group,
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
    except OSError as e:
        return str(e)
    return None if result.returncode == 0 else (result.stderr.strip().splitlines() or ["failed"])[-1]


@pytest.mark.slow  # a real twistd process
def test_uid_gid(redis_server: RedisServer, queue: str, daemon_pids: list[int]) -> None:
    """As root, twistd --uid nobody --gid <its group> runs the service as that user and still removes its pid file."""
    if os.geteuid() != 0:
        pytest.skip("--uid/--gid needs root")
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    group = grp.getgrgid(user.pw_gid).gr_name
    why = _unprivileged_python_works(user.pw_name, group)
    if why is not None:
        pytest.skip(f"user {user.pw_name} cannot run {sys.executable} (e.g. it lives under a 0700 /root): {why}")
    workdir = Path(tempfile.mkdtemp(prefix="pushservice-uid-"))
    try:
        workdir.chmod(0o777)  # the log and pid files must be writable (and the pid file removable) as nobody
        port = free_port()
        pidfile, logfile = workdir / "ps.pid", workdir / "ps.log"
        pid = run_daemon(
            [
                TWISTD,
                "--pidfile",
                pidfile,
                "--logfile",
                logfile,
                "--uid",
                user.pw_name,
                "--gid",
                group,
                *node_args(port, queue, redis=redis_server),
            ],
            workdir,
            pidfile,
            daemon_pids,
        )
        until_sync(lambda: http_status(f"http://127.0.0.1:{port}/healthz") == 200, START_TIMEOUT, "healthy")
        status = Path(f"/proc/{pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        gids = next(line for line in status.splitlines() if line.startswith("Gid:")).split()[1:]
        assert set(uids) == {str(user.pw_uid)} and set(gids) == {str(user.pw_gid)}, status
        stop_daemon(pid, pidfile)
        assert_clean_log(logfile.read_text())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- .tac and .tap ------------------------------------------------------------------------------


def write_conf(path: Path, port: int, redis: RedisServer, queue: str) -> Path:
    path.write_text(
        f"[pushservice]\nlisten = tcp:{port}:interface=127.0.0.1\nredis = {redis.url}\nqueue = {queue}\n"
        "shutdown-timeout = 5\n"
    )
    return path


@pytest.mark.slow  # a real twistd process
@pytest_twisted.ensureDeferred
async def test_tac_with_config_from_environment(redis_server, redis_sync, queue, tmp_path, procs):
    """twistd -ny etc/pushservice.tac with PUSHSERVICE_CONFIG serves that config's port and delivers pushes."""
    port = free_port()
    conf = write_conf(tmp_path / "ps.conf", port, redis_server, queue)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PUSHSERVICE_CONFIG=str(conf))
    proc = TwistdProcess([TWISTD, "-ny", ROOT / "etc" / "pushservice.tac"], tmp_path, port, env=env)
    procs.append(proc)
    proc.start()
    await receive_pushed(port, redis_sync, queue)
    proc.send_signal(signal.SIGTERM)
    assert await proc.exited(20) in CLEAN_EXIT
    assert not (tmp_path / "twistd.pid").exists()
    assert not list(tmp_path.glob("*.tap")), "-y implies --no_save"
    assert_clean_log(proc.log())


@pytest.mark.slow  # a real twistd process
def test_tac_default_config_beside_it(redis_server, queue, tmp_path, procs):
    """Without PUSHSERVICE_CONFIG the .tac reads pushservice.conf from its own directory."""
    port = free_port()
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(ROOT / "etc" / "pushservice.tac", app / "pushservice.tac")
    write_conf(app / "pushservice.conf", port, redis_server, queue)
    env = {k: v for k, v in os.environ.items() if k != "PUSHSERVICE_CONFIG"}
    env["PYTHONPATH"] = str(ROOT)
    proc = TwistdProcess([TWISTD, "-n", "--pidfile=", "-y", app / "pushservice.tac"], tmp_path, port, env=env)
    procs.append(proc)
    proc.start()
    assert proc.stop() in CLEAN_EXIT


@pytest.mark.slow  # a real twistd process
@pytest_twisted.ensureDeferred
async def test_mktap_then_twistd_f(redis_server, redis_sync, queue, tmp_path, procs):
    """pushservice-mktap --out F <options> writes a .tap; twistd -nf F serves that configuration."""
    from twisted.application import service
    from twisted.persisted import sob

    from pushservice.tap import Options

    port = free_port()
    tap = tmp_path / "node.tap"
    options = node_args(port, queue, "--history", "7", "--shutdown-timeout", "5", redis=redis_server)[1:]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    made = subprocess.run(
        [str(MKTAP), "--out", str(tap), *map(str, options)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    assert tap.exists()

    expected = Options()
    expected.parseOptions([str(o) for o in options])
    loaded = service.IService(sob.load(str(tap), "pickle")).getServiceNamed("pushservice")
    assert loaded.config == expected.config

    proc = TwistdProcess([TWISTD, "--pidfile=", "--logfile=-", "-nf", tap], tmp_path, port)
    procs.append(proc)
    proc.start()
    await receive_pushed(port, redis_sync, queue)
    proc.send_signal(signal.SIGTERM)
    assert await proc.exited(20) in CLEAN_EXIT
    assert_clean_log(proc.log())
    # without -o, twistd saves the application on shutdown: the service must still pickle
    saved = tmp_path / "pushservice-shutdown.tap"
    assert saved.exists(), proc.log()
    assert service.IService(sob.load(str(saved), "pickle")).getServiceNamed("pushservice").config == expected.config


def test_mktap_default_name_and_errors(tmp_path: Path) -> None:
    """pushservice-mktap writes pushservice.tap by default; a bad option exits 2 with the reason on stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    made = subprocess.run(
        [str(MKTAP), "--listen", "tcp:8123"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "pushservice.tap").exists()
    bad = subprocess.run(
        [str(MKTAP), "--out", str(tmp_path / "bad.tap"), "--max-message-size", "-1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--max-message-size" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad.tap").exists()


# -- listening: systemd socket activation and TLS --------------------------------------------------


@pytest.mark.slow  # a real twistd process
@pytest_twisted.ensureDeferred
async def test_systemd_socket_activation(redis_server, redis_sync, queue, tmp_path, procs):
    """Under systemd-socket-activate --fdname, --listen systemd:domain=INET:name=... adopts the socket and serves."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (apt-get install systemd)")
    port = free_port()
    # systemd-socket-activate passes on only TERM, PATH, HOME, LISTEN_* and what -E names
    args = [
        activate,
        "-l",
        f"127.0.0.1:{port}",
        "--fdname=pushservice",
        "-E",
        f"PYTHONPATH={ROOT}",
        TWISTD,
        "-n",
        "--pidfile=",
        "--logfile=-",
        *node_args(port, queue, redis=redis_server, listen="systemd:domain=INET:name=pushservice"),
    ]
    proc = TwistdProcess(args, tmp_path, port)
    procs.append(proc)
    proc.start(wait=False)
    wait_port(port, timeout=10)  # the activator's socket; a connection makes it exec twistd
    proc.wait_healthy()
    assert "listening on" in proc.log(), proc.log()
    await receive_pushed(port, redis_sync, queue)
    proc.send_signal(signal.SIGTERM)  # the activator exec'd twistd: same pid
    assert await proc.exited(20) in CLEAN_EXIT
    assert_clean_log(proc.log())


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1, and its key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.mark.slow  # a real twistd process
@pytest_twisted.ensureDeferred
async def test_tls_listener(redis_server, redis_sync, queue, tmp_path, procs):
    """--listen ssl:...:privateKey=:certKey= serves wss:// (a client trusting the cert gets pushes) and https /healthz."""
    key, cert = make_cert(tmp_path)
    port = free_port()
    context = ssl.create_default_context(cafile=str(cert))
    listen = f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    proc = TwistdProcess(
        [TWISTD, "-n", "--pidfile=", "--logfile=-", *node_args(port, queue, redis=redis_server, listen=listen)],
        tmp_path,
        port,
        scheme="https",
        context=context,
        host="localhost",
    )
    procs.append(proc)
    proc.start()
    assert http_status(f"https://localhost:{port}/healthz", context) == 200
    assert http_status(f"http://127.0.0.1:{port}/healthz", timeout=3) is None, "plain HTTP must not be served"

    client = await connect(port, trust=cert.read_bytes())
    redis_sync.lpush(queue, json.dumps({"content": {"secure": True}}))
    frame = await client.next_of("message")
    assert frame["content"] == {"secure": True}
    await client.close()
    assert proc.stop() in CLEAN_EXIT
    assert_clean_log(proc.log())


# -- graceful shutdown ----------------------------------------------------------------------------------


@pytest.mark.slow  # a real twistd process
@pytest_twisted.ensureDeferred
async def test_sigterm_graceful_shutdown(twistd_service, redis_sync):
    """SIGTERM: new connections refused, every client closed with 1001, exit 0 within --shutdown-timeout, no item lost."""
    node = twistd_service("--shutdown-timeout", "5")
    queue = node.queue
    clients = [await connect(node.port) for _ in range(3)]
    redis_sync.lpush(queue, *[f"before-{i}" for i in range(50)])
    # every client has had the first one, so the node was mid-stream when told to stop
    for client in clients:
        assert (await client.next_of("message"))["content"] == "before-0"

    node.send_signal(signal.SIGTERM)
    for i in range(50):  # pushed while the node stops
        redis_sync.lpush(queue, f"during-{i}")
    first = await timed(clients[0].closed, 10)
    # it stopped listening before it began closing clients
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", node.port), timeout=5).close()
    codes = [first] + [await timed(client.closed, 10) for client in clients[1:]]
    assert [code for code, _ in codes] == [1001, 1001, 1001], codes
    assert await node.exited(20) in CLEAN_EXIT, node.log()

    log = node.log()
    assert_clean_log(log)
    assert "closing 3 connections" in log, log
    assert "shutdown took over" not in log, log  # within --shutdown-timeout, by the node's own clock
    redis_sync.lpush(queue, "after")
    waiting, logged = redis_sync.llen(queue), redis_sync.xlen(f"{queue}:log")
    assert redis_sync.llen(f"{queue}:dead") == 0
    assert waiting + logged == 101, (waiting, logged)
    items = [json.loads(fields[b"c"]) for _, fields in redis_sync.xrange(f"{queue}:log")]
    items += [item.decode() for item in reversed(redis_sync.lrange(queue, 0, -1))]
    assert items == [f"before-{i}" for i in range(50)] + [f"during-{i}" for i in range(50)] + ["after"]


# -- Redis outage ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # a real twistd process
@pytest_twisted.ensureDeferred
async def test_redis_outage_and_recovery(twistd_service, own_redis):
    """Redis stopped: clients stay, publishes get `unavailable` in time, /healthz 503; restarted: all resumes."""
    own = own_redis(persistent=True)
    node = twistd_service("--redis-timeout", "1", redis=own)
    queue = node.queue
    client = await connect(node.port)
    assert (await client.request({"type": "message", "content": "before", "id": 0})) == {"type": "ack", "id": 0}
    assert (await client.next_of("message"))["content"] == "before"

    own.stop()
    # in time: --redis-timeout 1, and a bound generous enough for a loaded machine
    reply = await client.request({"type": "message", "content": "x", "id": 1}, timeout=1 + 5)
    assert reply["type"] == "error" and reply["id"] == 1 and reply["code"] == "unavailable", reply
    assert http_status(node.url + "/healthz") == 503
    await until(lambda: "lost Redis" in node.log(), 15, "'lost Redis' logged")
    # /metrics still answers, and says Redis is down
    assert scrape(node.url).plain["pushservice_redis_up"] == 0
    assert not client.closed.called and client.state == client.STATE_OPEN

    own.start()  # same port, same dir: the data is back
    r = own.client()
    try:
        r.lpush(queue, "pushed-while-node-was-away")
        await until(lambda: http_status(node.url + "/healthz") == 200, 15, "healthy after Redis restart")
        client.send({"type": "message", "content": "y", "id": 2})
        frames: list[dict[str, Any]] = []
        while {"type": "ack", "id": 2} not in frames or not any(f.get("content") == "y" for f in frames):
            assert len(frames) < 10, frames
            frames.append(await client.next(timeout=15))
        messages = [f["content"] for f in frames if f["type"] == "message"]
        assert messages == ["pushed-while-node-was-away", "y"], frames
        assert r.llen(queue) == 0
        assert r.xlen(f"{queue}:log") == 3, "the log kept what was in Redis before the outage"
    finally:
        r.close()
    assert not client.closed.called, "the client was disconnected by the outage"
    log = node.log()
    lost = log.index("lost Redis")
    assert "connected to Redis" in log[lost:], log
    assert_clean_log(log)
    await client.close()


# -- /metrics ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # a real twistd process
@pytest_twisted.ensureDeferred
async def test_metrics_reflect_traffic(twistd_service, redis_sync):
    """/metrics is Prometheus text counting connections, messages in/out, bytes, errors, Redis up and queue depth."""
    node = twistd_service()
    a, b = await connect(node.port), await connect(node.port)
    redis_sync.lpush(node.queue, *[f"m{i}" for i in range(5)])
    for client in (a, b):
        assert [f["content"] for f in await client.messages(5)] == [f"m{i}" for i in range(5)]
    reply = await a.request(b"not json")
    assert reply["type"] == "error" and reply["code"] == "bad_request"

    content_type, plain, labelled = scrape(node.url)
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type
    assert plain["pushservice_connections"] == 2
    assert plain["pushservice_connections_accepted_total"] == 2
    assert plain["pushservice_messages_in_total"] == 5
    assert plain["pushservice_messages_out_total"] == 10
    assert plain["pushservice_bytes_out_total"] > 10 * len('{"type":"message"}')
    assert plain["pushservice_redis_up"] == 1
    assert plain["pushservice_queue_depth"] == 0
    assert plain["pushservice_log_lag_seconds"] >= 0
    assert labelled[("pushservice_errors_total", (("code", "bad_request"),))] == 1

    await b.close()
    await until(lambda: scrape(node.url).plain["pushservice_connections"] == 1, 10, "connections gauge drops to 1")
    await a.close()


@pytest.mark.slow  # a real twistd process
@pytest_twisted.ensureDeferred
async def test_starts_while_redis_is_down(twistd_service, own_redis):
    """A node started before its Redis serves /healthz 503 (no crash), then 200 and deliveries once Redis is up."""
    own = own_redis(start=False)  # not started yet
    node = twistd_service("--redis-timeout", "1", redis=own, wait=False)
    await until(lambda: http_status(node.url + "/healthz") == 503, START_TIMEOUT, "/healthz 503 without Redis")
    client = await connect(node.port)
    own.start()
    await until(lambda: http_status(node.url + "/healthz") == 200, 15, "healthy once Redis is up")
    r = own.client()
    try:
        r.lpush(node.queue, "late")
    finally:
        r.close()
    try:
        frame = await client.next_of("message", timeout=15)
    except Exception as e:
        raise AssertionError(f"no delivery after Redis came up ({e!r}):\n{node.log()}") from None
    assert frame["content"] == "late"
    await client.close()
    assert node.stop() in CLEAN_EXIT
    assert_clean_log(node.log())


@pytest.mark.slow  # a real twistd process
@pytest_twisted.ensureDeferred
async def test_sigterm_during_redis_outage(twistd_service, own_redis):
    """SIGTERM while Redis is down (clients still connected) closes them with 1001 and exits within --shutdown-timeout."""
    own = own_redis()
    node = twistd_service("--redis-timeout", "1", "--shutdown-timeout", "3", redis=own)
    await until(lambda: "connected to Redis" in node.log(), 15, "the Redis loops running")
    client = await connect(node.port)
    own.stop()
    await until(lambda: "lost Redis" in node.log(), 15, "'lost Redis' logged")
    assert not client.closed.called, "clients stay connected while Redis is down"
    node.send_signal(signal.SIGTERM)
    code, _ = await timed(client.closed, 10)
    assert code == 1001
    # within --shutdown-timeout 3: the bound leaves a loaded machine room to start and finish the exit
    assert await node.exited(3 + 7) in CLEAN_EXIT, node.log()
    assert_clean_log(node.log())


@pytest_twisted.ensureDeferred
async def test_shutdown_bounded_when_a_step_hangs(make_node, queue, monkeypatch):
    """stopService fires by --shutdown-timeout even if a step never finishes and ignores cancel() (in-process)."""
    from twisted.internet import defer

    node = await make_node(queue, shutdown_timeout=1.0)
    bus = node.parts.bus
    stuck: defer.Deferred[None] = defer.Deferred()
    stuck.pause()  # cancel() fires it, but nothing waiting on it ever resumes: like a wedged Redis disconnect
    monkeypatch.setattr(bus, "stop", lambda: defer.DeferredList([stuck]))
    fired: list[object] = []
    node.service.stopService().addBoth(fired.append)  # not addTimeout: that cannot bound this either
    # the step never finishes: firing at all is the point; the bound leaves a loaded machine room
    await until(lambda: fired, 1.0 + 4, "stopService fired")
    monkeypatch.undo()
    await timed(bus.stop(), 10)  # the real Redis side, so nothing outlives the test


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self._path)


@pytest.mark.slow  # a real twistd process
def test_listen_tcp_and_unix(redis_server: RedisServer, queue: str, procs: list[TwistdProcess]) -> None:
    """--listen given twice (tcp and unix:...:mode=) serves /healthz on both endpoints."""
    workdir = Path(tempfile.mkdtemp(prefix="ps-unix-"))  # short path: AF_UNIX names are limited to 107 bytes
    try:
        port, sock = free_port(), workdir / "ws.sock"
        proc = TwistdProcess(
            [
                TWISTD,
                "-n",
                "--pidfile=",
                "--logfile=-",
                *node_args(port, queue, redis=redis_server),
                "--listen",
                f"unix:{sock}:mode=660:lockfile=0",
            ],
            workdir,
            port,
        )
        procs.append(proc)
        proc.start()
        assert sock.stat().st_mode & 0o777 == 0o660
        conn = _UnixHTTPConnection(str(sock))
        try:
            conn.request("GET", "/healthz")
            assert conn.getresponse().status == 200
        finally:
            conn.close()
        assert proc.stop() in CLEAN_EXIT
        assert_clean_log(proc.log())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_ports_are_bound_before_privileges_drop(redis_server, queue):
    """privilegedStartService (run by twistd before --uid takes effect) binds the ports; startService then serves."""
    node = InProcessNode(redis_server.url, queue)
    node.service.privilegedStartService()
    assert node.parts.ports and not node.service.running
    await node.start()
    client = await connect(node.port)
    await client.close()
    await node.stop()
