"""
Operations, with real processes: daemon mode and twistd's own options, the
.tac, .tap files, systemd socket activation, TLS, graceful shutdown, a Redis
outage and /metrics. Every wait is bounded.
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
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import ROOT, TWISTD, RedisServer, TwistdProcess, free_port, wait_port
from helpers import Client, connect, timed, until

MKTAP = Path(sys.executable).with_name("pushservice-mktap")
START_TIMEOUT = 30.0  # the machine is shared: starting twistd can take a while


# -- helpers -------------------------------------------------------------------------


def http_status(url: str, context: ssl.SSLContext | None = None, timeout: float = 5.0) -> int | None:
    """The HTTP status of GET C{url}, or None if nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (OSError, http.client.HTTPException):
        return None


def http_get(url: str, context: ssl.SSLContext | None = None, timeout: float = 10.0) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
        return int(response.status), response.headers.get("content-type", ""), response.read().decode()


def poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Call C{predicate} until it returns something true (blocking; for tests without clients)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout}s")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True while C{pid} runs (a zombie nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# twistd stops cleanly on SIGTERM, then re-raises the signal on itself (twisted/scripts/twistd.py,
# app._exitWithSignal) so a supervisor sees "terminated by SIGTERM"; systemd counts that as success.
CLEAN_EXIT = (0, -signal.SIGTERM)


def assert_clean_log(text: str) -> None:
    assert "Traceback" not in text, text
    assert "Unhandled" not in text, text


class Proc(TwistdProcess):
    """A twistd (or wrapper) process with its own environment and health URL."""

    def __init__(
        self,
        args: list[Any],
        workdir: Path,
        port: int,
        queue: str = "",
        env: dict[str, str] | None = None,
        scheme: str = "http",
        context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__([str(a) for a in args], workdir, port, queue)
        self.env = env if env is not None else dict(os.environ, PYTHONPATH=str(ROOT))
        self.url = f"{scheme}://{host}:{port}"
        self.context = context

    def start(self, wait: bool = True) -> None:
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited with {self.proc.returncode}:\n{self.log()}")
            return http_status(self.url + "/healthz", self.context) == 200

        try:
            poll(healthy, timeout, "healthy")
        except TimeoutError:
            raise TimeoutError(f"not healthy after {timeout}s:\n{self.log()}") from None

    async def exited(self, timeout: float) -> int:
        """Wait (reactor running) for the process to exit; its exit code."""
        assert self.proc is not None
        proc = self.proc
        await until(lambda: proc.poll() is not None, timeout, "process exit")
        return int(proc.returncode)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test starts; whatever still runs is stopped at teardown."""
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


def node_args(port: int, redis: Any, queue: str, *extra: Any, listen: str | None = None) -> list[Any]:
    return [
        "pushservice",
        "--listen",
        listen or f"tcp:{port}:interface=127.0.0.1",
        "--redis",
        redis.url,
        "--queue",
        queue,
        *extra,
    ]


def new_queue() -> str:
    return f"q-{uuid.uuid4().hex[:10]}"


async def receive_pushed(port: int, redis_sync: Any, queue: str, **connect_kw: Any) -> None:
    """Connect a client, LPUSH an item, and check the client gets it."""
    client = await connect(port, **connect_kw)
    text = f"hello-{uuid.uuid4().hex[:6]}"
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


def run_daemon(args: list[Any], cwd: Path, pidfile: Path, daemon_pids: list[int]) -> int:
    """Run twistd without -n; return the daemon's pid once its pid file names a live process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    launcher = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert launcher.returncode == 0, launcher.stdout + launcher.stderr
    poll(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "pid file written")
    pid = int(pidfile.read_text())
    daemon_pids.append(pid)
    assert pid_alive(pid)
    return pid


def stop_daemon(pid: int, pidfile: Path) -> None:
    os.kill(pid, signal.SIGTERM)
    poll(lambda: not pid_alive(pid), 20, "daemon exit")
    poll(lambda: not pidfile.exists(), 5, "pid file removed")


def test_daemon_mode_pidfile_logfile_umask(redis_server: RedisServer, tmp_path: Path, daemon_pids: list[int]) -> None:
    """twistd --pidfile --logfile --umask 0027 (no -n) daemonizes, serves /healthz, and SIGTERM stops it cleanly."""
    port, queue = free_port(), new_queue()
    pidfile, logfile = tmp_path / "ps.pid", tmp_path / "ps.log"
    pid = run_daemon(
        [TWISTD, "--pidfile", pidfile, "--logfile", logfile, "--umask", "0027", *node_args(port, redis_server, queue)],
        tmp_path,
        pidfile,
        daemon_pids,
    )
    assert os.getsid(pid) != os.getsid(0), "the daemon has a session of its own"
    assert pidfile.stat().st_mode & 0o777 == 0o640, oct(pidfile.stat().st_mode)
    poll(lambda: http_status(f"http://127.0.0.1:{port}/healthz") == 200, START_TIMEOUT, "daemon healthy")
    poll(lambda: "connected to Redis" in logfile.read_text(), 10, "'connected to Redis' in the log file")
    assert "listening on" in logfile.read_text()
    stop_daemon(pid, pidfile)
    log = logfile.read_text()
    assert "stopped" in log and "Server Shut Down" in log, log
    assert_clean_log(log)


@pytest.mark.parametrize(("reactor", "reactor_class"), [("epoll", "EPollReactor"), ("poll", "PollReactor")])
def test_reactor_choice(
    redis_server: RedisServer, tmp_path: Path, procs: list[Proc], reactor: str, reactor_class: str
) -> None:
    """twistd -r epoll / -r poll runs the service on that reactor (the plugin imports no reactor early)."""
    port = free_port()
    proc = Proc(
        [TWISTD, "-n", "--pidfile=", "--logfile=-", "-r", reactor, *node_args(port, redis_server, new_queue())],
        tmp_path,
        port,
    )
    procs.append(proc)
    proc.start()
    assert f"reactor class: twisted.internet.{reactor}reactor.{reactor_class}" in proc.log(), proc.log()
    assert proc.stop() in CLEAN_EXIT
    assert_clean_log(proc.log())


def test_syslog(redis_server: RedisServer, tmp_path: Path, procs: list[Proc]) -> None:
    """twistd --syslog --prefix starts the service (logging to syslog, not stdout) and stops it cleanly."""
    port = free_port()
    proc = Proc(
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "--syslog",
            "--prefix",
            "pushservice-test",
            *node_args(port, redis_server, new_queue()),
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


def test_uid_gid(redis_server: RedisServer, daemon_pids: list[int]) -> None:
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
                *node_args(port, redis_server, new_queue()),
            ],
            workdir,
            pidfile,
            daemon_pids,
        )
        poll(lambda: http_status(f"http://127.0.0.1:{port}/healthz") == 200, START_TIMEOUT, "healthy")
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


@pytest_twisted.ensureDeferred
async def test_tac_with_config_from_environment(redis_server, redis_sync, tmp_path, procs):
    """twistd -ny etc/pushservice.tac with PUSHSERVICE_CONFIG serves that config's port and delivers pushes."""
    port, queue = free_port(), new_queue()
    conf = write_conf(tmp_path / "ps.conf", port, redis_server, queue)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PUSHSERVICE_CONFIG=str(conf))
    proc = Proc([TWISTD, "-ny", ROOT / "etc" / "pushservice.tac"], tmp_path, port, env=env)
    procs.append(proc)
    proc.start()
    await receive_pushed(port, redis_sync, queue)
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.exited(20) in CLEAN_EXIT
    assert not (tmp_path / "twistd.pid").exists()
    assert not list(tmp_path.glob("*.tap")), "-y implies --no_save"
    assert_clean_log(proc.log())


def test_tac_default_config_beside_it(redis_server, tmp_path, procs):
    """Without PUSHSERVICE_CONFIG the .tac reads pushservice.conf from its own directory."""
    port = free_port()
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(ROOT / "etc" / "pushservice.tac", app / "pushservice.tac")
    write_conf(app / "pushservice.conf", port, redis_server, new_queue())
    env = {k: v for k, v in os.environ.items() if k != "PUSHSERVICE_CONFIG"}
    env["PYTHONPATH"] = str(ROOT)
    proc = Proc([TWISTD, "-n", "--pidfile=", "-y", app / "pushservice.tac"], tmp_path, port, env=env)
    procs.append(proc)
    proc.start()
    assert proc.stop() in CLEAN_EXIT


@pytest_twisted.ensureDeferred
async def test_mktap_then_twistd_f(redis_server, redis_sync, tmp_path, procs):
    """pushservice-mktap --out F <options> writes a .tap; twistd -nf F serves that configuration."""
    from twisted.application import service
    from twisted.persisted import sob

    from pushservice.tap import Options

    port, queue = free_port(), new_queue()
    tap = tmp_path / "node.tap"
    options = node_args(port, redis_server, queue, "--history", "7", "--shutdown-timeout", "5")[1:]
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

    proc = Proc([TWISTD, "--pidfile=", "--logfile=-", "-nf", tap], tmp_path, port)
    procs.append(proc)
    proc.start()
    await receive_pushed(port, redis_sync, queue)
    proc.proc.send_signal(signal.SIGTERM)
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


@pytest_twisted.ensureDeferred
async def test_systemd_socket_activation(redis_server, redis_sync, tmp_path, procs):
    """Under systemd-socket-activate --fdname, --listen systemd:domain=INET:name=... adopts the socket and serves."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (apt-get install systemd)")
    port, queue = free_port(), new_queue()
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
        *node_args(port, redis_server, queue, listen="systemd:domain=INET:name=pushservice"),
    ]
    proc = Proc(args, tmp_path, port)
    procs.append(proc)
    proc.start(wait=False)
    wait_port(port, timeout=10)  # the activator's socket; a connection makes it exec twistd
    proc.wait_healthy()
    assert "listening on" in proc.log(), proc.log()
    await receive_pushed(port, redis_sync, queue)
    proc.proc.send_signal(signal.SIGTERM)  # the activator exec'd twistd: same pid
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


@pytest_twisted.ensureDeferred
async def test_tls_listener(redis_server, redis_sync, tmp_path, procs):
    """--listen ssl:...:privateKey=:certKey= serves wss:// (a client trusting the cert gets pushes) and https /healthz."""
    from autobahn.twisted.websocket import WebSocketClientFactory
    from twisted.internet import endpoints, reactor
    from twisted.internet import ssl as tssl

    key, cert = make_cert(tmp_path)
    port, queue = free_port(), new_queue()
    context = ssl.create_default_context(cafile=str(cert))
    listen = f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    proc = Proc(
        [TWISTD, "-n", "--pidfile=", "--logfile=-", *node_args(port, redis_server, queue, listen=listen)],
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

    factory = WebSocketClientFactory(f"wss://localhost:{port}/")
    factory.protocol = Client
    options = tssl.optionsForClientTLS("localhost", trustRoot=tssl.Certificate.loadPEM(cert.read_bytes()))
    endpoint = endpoints.wrapClientTLS(options, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    client = await timed(endpoint.connect(factory))
    await timed(client.opened)
    redis_sync.lpush(queue, json.dumps({"content": {"secure": True}}))
    frame = await client.next_of("message")
    assert frame["content"] == {"secure": True}
    await client.close()
    assert proc.stop() in CLEAN_EXIT
    assert_clean_log(proc.log())


# -- graceful shutdown ----------------------------------------------------------------------------------


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

    started = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    for i in range(50):  # pushed while the node stops
        redis_sync.lpush(queue, f"during-{i}")
    first = await timed(clients[0].closed, 10)
    # it stopped listening before it began closing clients
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", node.port), timeout=5).close()
    codes = [first] + [await timed(client.closed, 10) for client in clients[1:]]
    assert [code for code, _ in codes] == [1001, 1001, 1001], codes
    await until(lambda: node.proc.poll() is not None, 20, "exit")
    elapsed = time.monotonic() - started
    assert node.proc.returncode in CLEAN_EXIT, node.log()
    assert elapsed < 5, f"shutdown took {elapsed:.1f}s"

    log = node.log()
    assert_clean_log(log)
    assert "closing 3 connections" in log, log
    assert "shutdown took over" not in log, log
    redis_sync.lpush(queue, "after")
    waiting, logged = redis_sync.llen(queue), redis_sync.xlen(f"{queue}:log")
    assert redis_sync.llen(f"{queue}:dead") == 0
    assert waiting + logged == 101, (waiting, logged)
    items = [json.loads(fields[b"c"]) for _, fields in redis_sync.xrange(f"{queue}:log")]
    items += [item.decode() for item in reversed(redis_sync.lrange(queue, 0, -1))]
    assert items == [f"before-{i}" for i in range(50)] + [f"during-{i}" for i in range(50)] + ["after"]


# -- Redis outage ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redis_outage_and_recovery(twistd_service):
    """Redis stopped: clients stay, publishes get `unavailable` in time, /healthz 503; restarted: all resumes."""
    import redis as redis_py

    own = RedisServer(persistent=True)
    own.start()
    try:
        node = twistd_service("--redis-timeout", "1", redis=own)
        queue = node.queue
        client = await connect(node.port)
        assert (await client.request({"type": "message", "content": "before", "id": 0})) == {"type": "ack", "id": 0}
        assert (await client.next_of("message"))["content"] == "before"

        own.stop()
        started = time.monotonic()
        reply = await client.request({"type": "message", "content": "x", "id": 1}, timeout=8)
        elapsed = time.monotonic() - started
        assert reply["type"] == "error" and reply["id"] == 1 and reply["code"] == "unavailable", reply
        assert elapsed < 1 + 3, f"unavailable after {elapsed:.1f}s with --redis-timeout 1"
        assert http_status(node.url + "/healthz") == 503
        await until(lambda: "lost Redis" in node.log(), 15, "'lost Redis' logged")
        _, plain, _ = scrape(node.url)  # /metrics still answers, and says Redis is down
        assert plain["pushservice_redis_up"] == 0
        assert not client.closed.called and client.state == client.STATE_OPEN

        own.start()  # same port, same dir: the data is back
        r = redis_py.Redis(host=own.host, port=own.port, socket_timeout=10)
        try:
            r.lpush(queue, "pushed-while-node-was-away")
            await until(lambda: http_status(node.url + "/healthz") == 200, 15, "healthy after Redis restart")
            client.send({"type": "message", "content": "y", "id": 2})
            frames: list[dict[str, Any]] = []
            while {"type": "ack", "id": 2} not in frames or not any(f.get("content") == "y" for f in frames):
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
    finally:
        own.close()


# -- /metrics ------------------------------------------------------------------------------------------------


def scrape(url: str) -> tuple[str, dict[str, float], dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    status, content_type, text = http_get(url + "/metrics")
    assert status == 200
    plain: dict[str, float] = {}
    labelled: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels:
                labelled[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
            else:
                plain[sample.name] = sample.value
    return content_type, plain, labelled


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
    await until(lambda: scrape(node.url)[1]["pushservice_connections"] == 1, 10, "connections gauge drops to 1")
    await a.close()


@pytest_twisted.ensureDeferred
async def test_starts_while_redis_is_down(twistd_service):
    """A node started before its Redis serves /healthz 503 (no crash), then 200 and deliveries once Redis is up."""
    import redis as redis_py

    own = RedisServer()  # not started yet
    try:
        node = twistd_service("--redis-timeout", "1", redis=own, wait=False)
        await until(lambda: http_status(node.url + "/healthz") == 503, START_TIMEOUT, "/healthz 503 without Redis")
        client = await connect(node.port)
        own.start()
        await until(lambda: http_status(node.url + "/healthz") == 200, 15, "healthy once Redis is up")
        r = redis_py.Redis(host=own.host, port=own.port, socket_timeout=10)
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
    finally:
        own.close()


@pytest_twisted.ensureDeferred
async def test_sigterm_during_redis_outage(twistd_service):
    """SIGTERM while Redis is down still closes clients with 1001 and exits within --shutdown-timeout."""
    own = RedisServer()
    own.start()
    try:
        node = twistd_service("--redis-timeout", "1", "--shutdown-timeout", "3", redis=own)
        await until(lambda: "connected to Redis" in node.log(), 15, "the Redis loops running")
        client = await connect(node.port)
        own.stop()
        await until(lambda: "lost Redis" in node.log(), 15, "'lost Redis' logged")
        started = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        code, _ = await timed(client.closed, 10)
        assert code == 1001
        await until(lambda: node.proc.poll() is not None, 15, f"exit after SIGTERM:\n{node.log()}")
        elapsed = time.monotonic() - started
        assert node.proc.returncode in CLEAN_EXIT, node.log()
        assert elapsed < 3 + 2, f"shutdown took {elapsed:.1f}s with --shutdown-timeout 3"
        assert_clean_log(node.log())
    finally:
        own.close()


@pytest_twisted.ensureDeferred
async def test_shutdown_bounded_when_a_step_hangs(make_node, queue, monkeypatch):
    """stopService fires by --shutdown-timeout even if a step never finishes and ignores cancel() (in-process)."""
    from twisted.internet import defer

    node = await make_node(queue, shutdown_timeout=1.0)
    bus = node.running.bus
    stuck: defer.Deferred[None] = defer.Deferred()
    stuck.pause()  # cancel() fires it, but nothing waiting on it ever resumes: like a wedged Redis disconnect
    monkeypatch.setattr(bus, "stop", lambda: defer.DeferredList([stuck]))
    started = time.monotonic()
    fired: list[object] = []
    node.service.stopService().addBoth(fired.append)  # not addTimeout: that cannot bound this either
    await until(lambda: fired, 10, "stopService fired")
    assert time.monotonic() - started < 1.0 + 1.5
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


def test_listen_tcp_and_unix(redis_server: RedisServer, procs: list[Proc]) -> None:
    """--listen given twice (tcp and unix:...:mode=) serves /healthz on both endpoints."""
    workdir = Path(tempfile.mkdtemp(prefix="ps-unix-"))  # short path: AF_UNIX names are limited to 107 bytes
    try:
        port, sock = free_port(), workdir / "ws.sock"
        proc = Proc(
            [
                TWISTD,
                "-n",
                "--pidfile=",
                "--logfile=-",
                *node_args(port, redis_server, new_queue()),
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
    from helpers import Node, connect

    node = Node(redis_server.url, queue)
    node.service.privilegedStartService()
    assert node.running.ports and not node.service.running
    await node.start()
    client = await connect(node.port)
    await client.close()
    await node.stop()
