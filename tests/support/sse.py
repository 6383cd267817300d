"""
A Server-Sent Events client in the reactor, parsing the stream as the
HTML standard's EventSource does (fields id, event, data, retry; comments;
LF, CR or CRLF line ends); it never reconnects by itself: a test resumes
by opening a new one with C{last_event_id}.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from twisted.internet.protocol import Protocol

from .waiting import TIMEOUT, until

__all__ = ["Event", "EventClient", "events_request", "open_events"]

_LINE = re.compile(rb"\r\n|\r|\n")


@dataclass
class Event:
    """One dispatched event: its type ("message" unless named), data, and the id in force (None: never set)."""

    type: str
    data: str
    id: str | None

    def json(self) -> Any:
        return json.loads(self.data)


class EventClient(Protocol):
    """Records the response head, then every event, comment and retry of the stream."""

    def __init__(self) -> None:
        self.head: bytes | None = None
        self.events: list[Event] = []
        self.comments = 0
        self.retry: int | None = None
        self.lost = False
        self._buf = b""
        self._data: list[str] = []
        self._type = ""
        self._id: str | None = None

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        if self.head is None:
            head, sep, rest = self._buf.partition(b"\r\n\r\n")
            if not sep:
                return
            self.head, self._buf = head, rest
        if self.status != 200:
            return
        lines = _LINE.split(self._buf)
        self._buf = lines.pop()  # an unfinished line (a CR at the very end may be half a CRLF: fine here)
        for line in lines:
            self._line(line.decode("utf-8"))

    def _line(self, line: str) -> None:
        if not line:
            if self._data:
                self.events.append(Event(self._type or "message", "\n".join(self._data), self._id))
            self._data, self._type = [], ""
            return
        if line.startswith(":"):
            self.comments += 1
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True

    @property
    def status(self) -> int | None:
        return int(self.head.split(b" ", 2)[1]) if self.head else None

    def header(self, name: str) -> str | None:
        assert self.head is not None
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.decode("latin-1").partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    @property
    def last_event_id(self) -> str | None:
        return self._id

    def of_type(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.type == kind]

    def messages(self) -> list[dict[str, Any]]:
        return [e.json() for e in self.events if e.type == "message"]

    async def wait(self, n: int, kind: str = "message", timeout: float = TIMEOUT) -> list[Event]:
        """The first C{n} events of type C{kind}, once they came."""
        await until(lambda: len(self.of_type(kind)) >= n or self.lost, timeout, f"{n} {kind} events")
        got = self.of_type(kind)
        assert len(got) >= n, f"the stream ended after {got}"
        return got[:n]

    def abort(self) -> None:
        if not self.lost:
            self.transport.abortConnection()  # type: ignore[attr-defined]


def events_request(port: int, query: str = "", *headers: str) -> bytes:
    path = "/events" + (f"?{query}" if query else "")
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept: text/event-stream", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def open_events(port: int, query: str = "", *headers: str, last_event_id: str | None = None) -> EventClient:
    """A stream of C{/events?query} once its response head came (any status)."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from .waiting import timed

    client = await timed(connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), EventClient()), 10)
    extra = [*headers, *([f"Last-Event-ID: {last_event_id}"] if last_event_id is not None else [])]
    client.transport.write(events_request(port, query, *extra))
    await until(lambda: client.head is not None or client.lost, what="the response head")
    return client
