"""
One worker process as the parent sees it: its log events (JSON lines on the
worker's fd 3) published into the parent's own log, so --logfile, --syslog
and twistd -n show them like the parent's, each prefixed ``worker N:``; any
other output (stdout, stderr: a crash before logging began) logged a line at
a time; and its end reported once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import protocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher

from .handoff import LOG_FD

__all__ = ["WorkerProcess"]

#: The longest line kept from a worker; longer ones are cut (a worker cannot make the parent's memory grow).
MAX_LINE = 1024 * 1024


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
