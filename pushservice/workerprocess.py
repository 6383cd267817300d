"""
The pipe a worker's log goes through, both ends.

In the parent, one worker process as the parent sees it (L{WorkerProcess}):
its log events (JSON lines on the worker's fd 3) published into the parent's
own log, so --logfile, --syslog and twistd -n show them like the parent's,
each prefixed ``worker N:``; any other output (stdout, stderr: a crash
before logging began) logged a line at a time; and its end reported once.

In the worker, the observer writing those lines (L{ParentLog}): the pipe is
non-blocking, so a parent that does not read (paused, say) never stops a
worker's reactor; what cannot be written waits, up to L{MAX_HELD} bytes,
then lines are dropped and counted, and a line says how many.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import protocol
from twisted.logger import ILogObserver, Logger, LogLevel, eventAsJSON, eventFromJSON, globalLogPublisher
from zope.interface import implementer

from .handoff import LOG_FD

__all__ = ["MAX_HELD", "ParentLog", "WorkerProcess"]

#: The longest line kept from a worker; longer ones are cut (a worker cannot make the parent's memory grow).
MAX_LINE = 1024 * 1024
#: Bytes of log lines a worker holds while its parent does not read; past them, new lines are dropped.
MAX_HELD = 256 * 1024


@implementer(ILogObserver)
class ParentLog:
    """A worker's log observer: its events as JSON lines to the parent, never blocking."""

    def __init__(self, fd: int = LOG_FD) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._held = b""
        self._lock = threading.Lock()  # observers may be called from any thread
        #: Lines dropped since the last note of it went out.
        self.dropped = 0

    def __call__(self, event: Any) -> None:
        line = (eventAsJSON(event) + "\n").encode("utf-8")
        with self._lock:
            if len(self._held) + len(line) > MAX_HELD:
                self.dropped += 1
                return
            self._held += line
            self._write()

    def flush(self) -> None:
        """Write what is held, if the parent reads again (called every so often)."""
        with self._lock:
            self._write()

    def _write(self) -> None:
        if self.dropped and len(self._held) < MAX_HELD // 2:
            note = {
                "log_format": "dropped {n} log lines while the parent did not read them",
                "log_level": LogLevel.warn,
                "log_namespace": "pushservice.worker",
                "log_time": time.time(),
                "n": self.dropped,
            }
            self._held += (eventAsJSON(note) + "\n").encode("utf-8")
            self.dropped = 0
        while self._held:
            try:
                written = os.write(self._fd, self._held)
            except BlockingIOError:
                return
            except OSError:
                self._held = b""  # the parent is gone: nobody will read it
                return
            self._held = self._held[written:]


class WorkerProcess(protocol.ProcessProtocol):
    """Relays worker C{number}'s output to the parent's log; calls C{ended(self, reason)} when it exits."""

    _log = Logger()
    transport: Any

    def __init__(
        self, number: int, ended: Callable[[WorkerProcess, Any], None], publish: Callable[[Any], None] | None = None
    ) -> None:
        self.number = number
        self._ended = ended
        self._publish = publish or globalLogPublisher
        self._partial: dict[int, bytes] = {}
        self.pid: int | None = None

    def makeConnection(self, transport: Any) -> None:
        self.pid = getattr(transport, "pid", None)  # the transport forgets it at exit; the log lines need it
        super().makeConnection(transport)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        *lines, rest = (self._partial.pop(childFD, b"") + data).split(b"\n")
        if len(rest) > MAX_LINE:
            lines.append(rest[:MAX_LINE])
            rest = b""
        if rest:
            self._partial[childFD] = rest
        for line in lines:
            self._line(childFD, line)

    def _line(self, fd: int, line: bytes) -> None:
        if not line.strip():
            return
        if fd == LOG_FD:
            try:
                event = eventFromJSON(line.decode("utf-8", "replace"))
            except ValueError:
                event = None
            if isinstance(event, dict):
                fmt = event.get("log_format")
                event["log_format"] = f"worker {self.number}: " + (fmt if isinstance(fmt, str) else "")
                self._publish(event)
                return
        text = line.decode("utf-8", "replace").rstrip()
        if fd == 2:
            self._log.error("worker {n} (stderr): {line}", n=self.number, line=text)
        else:
            self._log.info("worker {n}: {line}", n=self.number, line=text)

    def processEnded(self, reason: Any) -> None:
        for fd, rest in sorted(self._partial.items()):
            self._line(fd, rest)
        self._partial.clear()
        self._ended(self, reason)
