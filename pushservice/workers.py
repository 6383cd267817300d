"""
``--workers N``: the twistd process becomes a supervisor of N node processes
serving the same --listen endpoints (what ``twistd pushservice`` runs when
N > 1; with N = 1 it is the node itself, L{pushservice.service}).

Each worker is a whole node on the same Redis, with a node id of its own, so
every guarantee of several nodes holds between workers. The parent:
  - binds every endpoint and reads the token secret and TLS keys before
    twistd drops privileges (L{pushservice.listeners});
  - starts the local Redis once when no --redis is given, and shares it;
  - starts the workers (L{pushservice.worker}), hands each its sockets and
    configuration over a pipe, and logs what they log (L{WorkerProcess});
  - replaces a worker that exits, after a delay that doubles while workers
    die young (L{restart_delay}), so a worker that cannot start costs a
    process every half minute, not a busy loop;
  - on SIGTERM, closes its copies of the sockets, sends every worker
    SIGTERM, waits for them (each closes its clients with 1001) within
    --shutdown-timeout and a grace, kills what is left, then exits.
Workers die with the parent, even one killed with SIGKILL (see worker.py).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import site
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from .config import Config
from .handoff import FIRST_SOCKET_FD, LOG_FD, Handoff
from .workerprocess import WorkerProcess

__all__ = ["WorkerPool", "restart_delay"]

#: Seconds before the first restart of a worker that died.
RESTART_DELAY = 0.5
#: The longest wait between restarts of a worker that keeps dying young.
MAX_RESTART_DELAY = 30.0
#: A worker that ran this long before it died was not dying young: its next restart is quick again.
STABLE_SECONDS = 10.0
#: Seconds beyond --shutdown-timeout the parent waits for its workers before SIGKILL.
STOP_GRACE = 5.0


def restart_delay(lived: float, young_deaths: int) -> tuple[float, int]:
    """
    How long to wait before restarting a worker that ran C{lived} seconds, and
    the count of young deaths in a row after this one.
    """
    if lived >= STABLE_SECONDS:
        young_deaths = 0
    return min(MAX_RESTART_DELAY, RESTART_DELAY * 2**young_deaths), young_deaths + 1


class _Slot:
    """Worker number C{number}: its process now (or None), and its history of deaths."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.process: WorkerProcess | None = None
        self.started = 0.0
        self.young_deaths = 0
        self.restart: Any = None
        self.gone: defer.Deferred[None] | None = None


def _worker_env() -> dict[str, str]:
    """The parent's environment, with PYTHONPATH leading to this pushservice where a worker would not find it."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    given = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    installed = [os.path.abspath(p) for p in [*site.getsitepackages(), site.getusersitepackages()]]
    if here not in given and here not in installed:  # e.g. twistd run in a source tree: cwd is not inherited
        env["PYTHONPATH"] = os.pathsep.join([here, *given])
    return env


class WorkerPool(Service):
    """The parent of --workers N. Holds only its Config until started, so a .tap can pickle it."""

    _log = Logger()

    def __init__(self, config: Config) -> None:
        self.config = config
        self.name = "pushservice"
        self._bound: list[Any] | None = None
        self._secret: bytes | None = None
        self._slots: dict[int, _Slot] = {}
        self._worker_config: Config | None = None
        self._local_redis: Any = None
        self._stopping = False

    def __getstate__(self) -> dict[str, Any]:
        keep = ("config", "name", "parent")
        state: dict[str, Any] = {k: v for k, v in self.__dict__.items() if k in keep}
        state.update(_bound=None, _secret=None, _slots={}, _worker_config=None, _local_redis=None, _stopping=False)
        return state

    def privilegedStartService(self) -> None:
        """Bind the endpoints and read the secrets while twistd may still be root."""
        super().privilegedStartService()
        self._prepare()

    def _prepare(self) -> None:
        from twisted.internet import reactor

        from .listeners import bind

        path = self.config.token_secret_file
        if path:
            with open(path, "rb") as f:
                self._secret = f.read().strip()
        self._bound = bind(reactor, self.config)

    def startService(self) -> None:
        from twisted.internet import reactor

        if self._bound is None:  # started without twistd's privileged step (embedding)
            self._prepare()
        super().startService()
        self._stopping = False
        self._slots = {n: _Slot(n) for n in range(1, self.config.workers + 1)}
        d = defer.ensureDeferred(self._start(reactor))
        d.addErrback(self._startup_failed, reactor)

    async def _start(self, reactor: Any) -> None:
        address = self.config.redis
        if address is None:
            from .localredis import LocalRedis

            self._local_redis = LocalRedis(reactor)
            address = await self._local_redis.start()
        self._worker_config = dataclasses.replace(self.config, redis=address, workers=1)
        for slot in self._slots.values():
            if not self._stopping:
                self._spawn(reactor, slot)

    def _startup_failed(self, failure: Any, reactor: Any) -> None:
        self._log.critical("cannot start: {why}", why=failure.getErrorMessage())
        reactor.stop()

    def _spawn(self, reactor: Any, slot: _Slot) -> None:
        assert self._bound is not None and self._worker_config is not None
        slot.restart = None
        handoff = Handoff(
            number=slot.number,
            parent_pid=os.getpid(),
            reactor=type(reactor).__module__,
            config=self._worker_config,
            sockets=tuple(bound.for_worker(i) for i, bound in enumerate(self._bound)),
            token_secret=self._secret,
            workers=self.config.workers,
        )
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", LOG_FD: "r"}
        for i, bound in enumerate(self._bound):
            child_fds[FIRST_SOCKET_FD + i] = bound.fileno()
        process = WorkerProcess(slot.number, lambda p, reason: self._ended(reactor, slot, p, reason))
        argv = [sys.executable, "-m", "pushservice.worker", str(slot.number)]
        try:
            reactor.spawnProcess(process, sys.executable, argv, env=_worker_env(), childFDs=child_fds)
        except OSError as e:  # out of processes or file descriptors: try again later, as if it had died
            delay, slot.young_deaths = restart_delay(0, slot.young_deaths)
            self._log.error("cannot start worker {n}: {e}; trying again in {d}s", n=slot.number, e=e, d=delay)
            slot.restart = reactor.callLater(delay, self._spawn, reactor, slot)
            return
        process.transport.write(handoff.to_json())
        process.transport.closeStdin()
        slot.process, slot.started, slot.gone = process, reactor.seconds(), defer.Deferred()
        self._log.info("started worker {n} (pid {pid})", n=slot.number, pid=process.pid)

    def _ended(self, reactor: Any, slot: _Slot, process: WorkerProcess, reason: Any) -> None:
        slot.process = None
        gone, slot.gone = slot.gone, None
        how = _exit_text(reason.value)
        if self._stopping:
            self._log.info("worker {n} (pid {pid}) {how}", n=slot.number, pid=process.pid, how=how)
        else:
            lived = reactor.seconds() - slot.started
            delay, slot.young_deaths = restart_delay(lived, slot.young_deaths)
            self._log.warn(
                "worker {n} (pid {pid}) {how} after {lived:.1f}s; starting a new one in {delay}s",
                n=slot.number,
                pid=process.pid,
                how=how,
                lived=lived,
                delay=delay,
            )
            slot.restart = reactor.callLater(delay, self._spawn, reactor, slot)
        if gone is not None:
            gone.callback(None)

    @property
    def pids(self) -> dict[int, int]:
        """The running workers' pids, by worker number: for operators and tests."""
        return {n: s.process.pid for n, s in self._slots.items() if s.process is not None and s.process.pid}

    def stopService(self) -> defer.Deferred[None]:
        from twisted.internet import reactor

        super().stopService()
        self._stopping = True
        return defer.ensureDeferred(self._stop(reactor))

    async def _stop(self, reactor: Any) -> None:
        """Stop listening, SIGTERM every worker, wait (bounded), SIGKILL the rest, stop the local Redis."""
        for bound in self._bound or ():
            bound.port.stopListening()  # the workers' copies keep serving until they stop
        self._bound = None
        running = []
        for slot in self._slots.values():
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            if slot.process is not None and slot.gone is not None:
                running.append((slot, slot.gone))
                _signal(slot.process, signal.SIGTERM)
        self._log.info("stopping: {n} workers told to stop", n=len(running))
        for wait, sig in ((self.config.shutdown_timeout + STOP_GRACE, signal.SIGKILL), (STOP_GRACE, None)):
            pending = [gone for _, gone in running if not gone.called]
            if not pending:
                break
            await _within(reactor, defer.DeferredList(pending), wait)
            for slot, gone in running:
                if not gone.called and slot.process is not None:
                    if sig is None:
                        self._log.error("worker {n} (pid {pid}) did not exit", n=slot.number, pid=slot.process.pid)
                    else:
                        self._log.warn(
                            "worker {n} (pid {pid}) still runs: SIGKILL", n=slot.number, pid=slot.process.pid
                        )
                        _signal(slot.process, sig)
        if self._local_redis is not None:
            await self._local_redis.stop()
        self._log.info("stopped")


def _signal(process: WorkerProcess, sig: int) -> None:
    try:
        process.transport.signalProcess(sig)
    except Exception:  # ProcessExitedAlready: it ended meanwhile, and _ended says so
        pass


async def _within(reactor: Any, d: defer.Deferred[Any], seconds: float) -> None:
    """Wait for C{d}, at most C{seconds} (never cancelling it)."""
    timer: defer.Deferred[None] = defer.Deferred()
    call = reactor.callLater(seconds, timer.callback, None)

    def done(_: object) -> None:
        if not timer.called:
            call.cancel()
            timer.callback(None)

    d.addBoth(done)
    await timer


def _exit_text(value: Any) -> str:
    sig = getattr(value, "signal", None)
    if sig:
        return f"was killed by signal {sig}"
    return f"exited with code {getattr(value, 'exitCode', None) or 0}"
