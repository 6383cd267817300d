"""
The Redis used when none is configured: the one answering on 127.0.0.1:6379,
or a private redis-server started there for as long as the service runs.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.logger import Logger

from .config import RedisAddress

__all__ = ["LocalRedis", "redis_answers"]

HOST, PORT = "127.0.0.1", 6379


class _Ping(protocol.Protocol):
    """Asks whatever listens whether it is a Redis."""

    transport: Any

    def __init__(self) -> None:
        self.answered: defer.Deferred[bool] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"PING\r\n")

    def dataReceived(self, data: bytes) -> None:
        if not self.answered.called:
            # "-NOAUTH" is a Redis too, one that wants a password
            self.answered.callback(data.startswith((b"+PONG", b"-NOAUTH")))
        self.transport.loseConnection()


async def redis_answers(reactor: Any, host: str = HOST, port: int = PORT, timeout: float = 1.0) -> bool:
    """Whether a Redis server answers PING at host:port."""
    factory = protocol.Factory.forProtocol(_Ping)
    factory.noisy = False
    try:
        ping: Any = await TCP4ClientEndpoint(reactor, host, port, timeout=timeout).connect(factory)
    except Exception:
        return False
    ping.answered.addTimeout(timeout, reactor)
    try:
        return await ping.answered
    except Exception:
        ping.transport.abortConnection()
        return False


class _RedisProcess(protocol.ProcessProtocol):
    """The private redis-server's process: fires C{ended} when it exits."""

    def __init__(self) -> None:
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


class LocalRedis:
    """Finds or starts the development Redis; stop() undoes what start() did."""

    _log = Logger()

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._process: _RedisProcess | None = None
        self._dir: str | None = None

    async def start(self) -> RedisAddress:
        address = RedisAddress(HOST, PORT)
        if await redis_answers(self._reactor):
            self._log.info("no --redis given: using the Redis on {host}:{port}", host=HOST, port=PORT)
            return address
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "no --redis given, nothing answers on 127.0.0.1:6379 and redis-server is not installed: "
                "install it (apt-get install redis-server) or pass --redis redis://host:port/0"
            )
        self._dir = tempfile.mkdtemp(prefix="pushservice-redis-")
        args = [
            binary,
            "--port",
            str(PORT),
            "--bind",
            HOST,
            "--dir",
            self._dir,
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            "redis.log",
            "--daemonize",
            "no",
        ]
        self._process = _RedisProcess()
        self._reactor.spawnProcess(self._process, binary, args, env=None, childFDs={0: "w", 1: "r", 2: "r"})
        for _ in range(100):
            if await redis_answers(self._reactor, timeout=0.5):
                self._log.info(
                    "no --redis given: started a private redis-server on {host}:{port} (data in {dir})",
                    host=HOST,
                    port=PORT,
                    dir=self._dir,
                )
                return address
            if self._process.ended.called:
                break
            await deferLater(self._reactor, 0.1, lambda: None)
        raise RuntimeError(f"redis-server did not start on {HOST}:{PORT}; see {self._dir}/redis.log")

    async def stop(self) -> None:
        process = self._process
        if process is not None and not process.ended.called:
            process.transport.signalProcess(signal.SIGTERM)  # type: ignore[union-attr]
            process.ended.addTimeout(5, self._reactor)
            try:
                await process.ended
            except defer.TimeoutError:
                process.transport.signalProcess(signal.SIGKILL)  # type: ignore[union-attr]
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
