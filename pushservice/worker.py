"""
One worker of ``--workers N``: ``python -m pushservice.worker``, started by
the parent (L{pushservice.workers}), never by hand.

It reads its L{Handoff} from stdin to the end, dies with its parent (Linux:
PR_SET_PDEATHSIG gives it SIGTERM; elsewhere it notices within a second
that its parent changed), installs the parent's reactor, and runs a whole
node (L{WorkerNode}: a PushService serving the inherited sockets) until
SIGTERM, when it stops as a node does: stop accepting, close clients with
1001, stop the Redis loops. Its log events go to the parent as JSON lines
on fd 3; the parent logs them as its own, prefixed with the worker number.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from .gctune import tune
from .handoff import LOG_FD, Handoff
from .service import PushService

__all__ = ["WorkerNode", "main"]

#: prctl(2) option: the signal the kernel sends when the parent dies.
_PR_SET_PDEATHSIG = 1
#: Seconds between checks that the parent still lives (where PR_SET_PDEATHSIG is missing).
_PARENT_CHECK_SECONDS = 1.0
#: Seconds between two tries to write log lines the parent did not take.
_LOG_FLUSH_SECONDS = 0.5


class WorkerNode(PushService):
    """A node serving the sockets its parent bound, with the secret its parent read."""

    def __init__(self, handoff: Handoff) -> None:
        super().__init__(handoff.config)
        self.handoff = handoff
        self.failed = False
        self.shared_metrics: Any = None

    def _make_stats(self) -> Any:
        stats = super()._make_stats()
        stats.labels = {"worker": str(self.handoff.number)}
        return stats

    def _metrics(self, bus: Any, stats: Any) -> Any:
        from twisted.internet import reactor

        from .sharedmetrics import SharedMetrics

        handoff = self.handoff
        self.shared_metrics = SharedMetrics(
            reactor, bus.request, stats, self.config.queue, handoff.parent_pid, handoff.number, handoff.workers
        )
        return self.shared_metrics.render

    def startService(self) -> None:
        super().startService()
        if self.shared_metrics is not None:
            self.shared_metrics.start()

    def stopService(self) -> Any:
        if self.shared_metrics is not None:
            self.shared_metrics.stop()
        return super().stopService()

    def _token_verifier(self) -> Any:
        from .auth import TokenVerifier

        secret = self.handoff.token_secret
        return TokenVerifier(secret) if secret is not None else None

    def _listen(self, reactor: Any, site: Any) -> None:
        from .listeners import adopt

        assert self._running is not None
        self._running.ports = adopt(reactor, self.handoff.sockets, site)
        self._log.info(
            "worker {n} (pid {pid}) serving {count} endpoints as node {node}",
            n=self.handoff.number,
            pid=os.getpid(),
            count=len(self._running.ports),
            node=self._running.bus.node_id,
        )

    def _startup_failed(self, failure: Any, reactor: Any) -> None:
        self.failed = True
        super()._startup_failed(failure, reactor)


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM when the parent dies, even by SIGKILL; exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before prctl took effect
        raise SystemExit(1)


def _watch_parent(reactor: Any, parent_pid: int, stop: Callable[[], None]) -> None:
    from twisted.internet.task import LoopingCall

    def check() -> None:
        if os.getppid() != parent_pid:
            stop()

    LoopingCall(check).start(_PARENT_CHECK_SECONDS, now=False)


def _log_to_parent() -> Any:
    from twisted.logger import globalLogBeginner

    from .workerprocess import ParentLog

    observer = ParentLog(LOG_FD)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    return observer


def _install_reactor(name: str) -> Any:
    from twisted.python.reflect import namedModule

    namedModule(name).install()
    from twisted.internet import reactor

    return reactor


def _stop_on_signals(reactor: Any) -> Callable[[], None]:
    """SIGTERM and SIGINT stop the node once, however often they come (from the parent, its process group, ^C)."""
    stopping: list[int] = []

    def stop() -> None:
        if not stopping:
            stopping.append(1)
            reactor.stop()

    def received(signum: int, frame: Any) -> None:
        reactor.callFromThread(stop)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, received)
    return stop


def run(handoff: Handoff) -> int:
    """Run one node until SIGTERM (or its parent dies); the exit code."""
    reactor = _install_reactor(handoff.reactor)
    tune(reactor)
    log = _log_to_parent()
    from twisted.internet.task import LoopingCall

    reactor.callWhenRunning(LoopingCall(log.flush).start, _LOG_FLUSH_SECONDS)
    node = WorkerNode(handoff)
    node.privilegedStartService()
    reactor.callWhenRunning(node.startService)
    reactor.addSystemEventTrigger("before", "shutdown", node.stopService)
    _watch_parent(reactor, handoff.parent_pid, _stop_on_signals(reactor))
    reactor.run(installSignalHandlers=False)  # a worker spawns no processes: no SIGCHLD handler needed
    return 1 if node.failed else 0


def main() -> None:
    """The worker's entry: read the handoff from stdin, then run the node."""
    try:
        handoff = Handoff.from_json(sys.stdin.buffer.read())
    except ValueError as e:
        sys.exit(f"pushservice.worker is started by `twistd pushservice --workers N`, not by hand ({e})")
    _die_with_parent(handoff.parent_pid)
    raise SystemExit(run(handoff))


if __name__ == "__main__":
    from pushservice.worker import main as _main  # this module under its own name, not __main__

    _main()
