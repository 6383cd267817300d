"""
Real processes: redis-server (plain, persistent, or a sentinel), and
``twistd pushservice`` in every way the tests run it (foreground with a
health URL, daemonized with a pid file). Loopback only; every wait bounded.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .waiting import until, until_sync
from .web import http_status

__all__ = [
    "CLEAN_EXIT",
    "MKTAP",
    "ROOT",
    "START_TIMEOUT",
    "TWISTD",
    "RedisSentinel",
    "RedisServer",
    "TwistdProcess",
    "assert_clean_log",
    "free_port",
    "node_args",
    "pid_alive",
    "run_daemon",
    "stop_daemon",
    "twistd_args",
    "wait_port",
]

ROOT = Path(__file__).resolve().parents[2]
TWISTD = Path(sys.executable).with_name("twistd")
MKTAP = Path(sys.executable).with_name("pushservice-mktap")
#: Seconds a node may take to become healthy: the machine is shared, starting twistd can take a while.
START_TIMEOUT = 30.0
# twistd stops cleanly on SIGTERM, then re-raises the signal on itself (twisted/scripts/twistd.py,
# app._exitWithSignal) so a supervisor sees "terminated by SIGTERM"; systemd counts that as success.
CLEAN_EXIT = (0, -signal.SIGTERM)


def free_port() -> int:
    """A TCP port nothing listens on at the moment, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Block until something listens on 127.0.0.1:C{port}."""
    until_sync(lambda: _listening(port), timeout, f"something listening on 127.0.0.1:{port}")


def assert_clean_log(text: str) -> None:
    """No traceback and no unhandled error in a node's log."""
    assert "Traceback" not in text, text[-5000:]
    assert "Unhandled" not in text, text[-5000:]


def pid_alive(pid: int) -> bool:
    """True while C{pid} runs (a zombie nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


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

    def client(self, socket_timeout: float = 10.0) -> Any:
        """A redis-py client that never retries by itself: a failed call was sent at most once."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis(
            host=self.host,
            port=self.port,
            socket_timeout=socket_timeout,
            socket_connect_timeout=5,
            retry=Retry(NoBackoff(), 0),
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisSentinel:
    """A redis-server --sentinel watching one master as "pm", quick to fail over."""

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


def node_args(
    port: int, queue: str, *extra: Any, redis: RedisServer | None = None, listen: str | None = None
) -> list[Any]:
    """``pushservice`` and its options: on 127.0.0.1:C{port} (or C{listen}), C{queue}, C{redis} if given."""
    args: list[Any] = ["pushservice", "--listen", listen or f"tcp:{port}:interface=127.0.0.1"]
    if redis is not None:
        args += ["--redis", redis.url]
    return [*args, "--queue", queue, *extra]


def twistd_args(
    port: int, queue: str, *extra: Any, redis: RedisServer | None = None, listen: str | None = None
) -> list[Any]:
    """``twistd -n pushservice`` (L{node_args}), logging to stdout, no pid file."""
    return [TWISTD, "-n", "--pidfile=", "--logfile=-", *node_args(port, queue, *extra, redis=redis, listen=listen)]


class TwistdProcess:
    """
    A twistd (or a wrapper exec'ing it) in a subprocess, serving on a port
    of its own, logging to C{workdir}/twistd.log.
    """

    def __init__(
        self,
        args: list[Any],
        workdir: Path,
        port: int,
        queue: str = "",
        *,
        env: dict[str, str] | None = None,
        scheme: str = "http",
        host: str = "127.0.0.1",
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.args = [str(a) for a in args]
        self.workdir = workdir
        self.port = port
        self.queue = queue
        self.env = env if env is not None else dict(os.environ, PYTHONPATH=str(ROOT))
        self.url = f"{scheme}://{host}:{port}"
        self.context = context
        self.logfile = workdir / "twistd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> None:
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        if wait:
            self.wait_healthy()

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"process exited with {self.proc.returncode}:\n{self.log()}")
        return http_status(self.url + "/healthz", self.context, timeout=2) == 200

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Block until /healthz answers 200; fails at once if the process exits."""
        try:
            until_sync(self._healthy, timeout, "healthy", interval=0.1)
        except AssertionError:
            raise AssertionError(f"not healthy after {timeout}s:\n{self.log()}") from None

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def exited(self, timeout: float) -> int:
        """Wait (the reactor running) for the process to exit; its exit code."""
        assert self.proc is not None
        proc = self.proc
        await until(lambda: proc.poll() is not None, timeout, f"process exit\n{self.log()[-3000:]}")
        return int(proc.returncode)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait (SIGKILL after C{timeout}); the exit code, None if it was not running."""
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


def run_daemon(args: list[Any], cwd: Path, pidfile: Path, daemon_pids: list[int]) -> int:
    """Run twistd without -n; the daemon's pid (added to C{daemon_pids}) once its pid file names a live process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    launcher = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert launcher.returncode == 0, launcher.stdout + launcher.stderr
    until_sync(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "pid file written")
    pid = int(pidfile.read_text())
    daemon_pids.append(pid)
    assert pid_alive(pid)
    return pid


def stop_daemon(pid: int, pidfile: Path) -> None:
    """SIGTERM a daemon; block until it is gone and its pid file removed."""
    os.kill(pid, signal.SIGTERM)
    until_sync(lambda: not pid_alive(pid), 20, "daemon exit")
    until_sync(lambda: not pidfile.exists(), 5, "pid file removed")
