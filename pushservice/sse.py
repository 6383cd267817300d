"""
Server-Sent Events encoding: the frames a session writes, as the events an
C{EventSource} reads (pure: bytes in, bytes out; no Twisted).

A session, its outbox and the hub write WebSocket text frames (built once
per message, shared by every connection). An SSE connection re-encodes them
as it writes: each frame's JSON becomes one event's ``data``, unchanged, so
both transports carry the same JSON:

    id: 1732700000000-5                   message frames: the id is the offset
    data: {"type":"message","content":...,"channel":"news","offset":"1732700000000-5"}

    event: resumed                        every other frame: an event named by its type
    data: {"type":"resumed","since":"...","recovered":true}

A ``message`` (and the stream's ``joined`` notice) carries ``id:``, so the
browser's own reconnect sends it back as ``Last-Event-ID`` and resumes after
it; nothing else does (a ``gap`` frame's offset is the next message's, which
would skip it). The outbox may split its writes anywhere (a slow client's
queue is cut at a byte budget): L{FrameEvents} keeps the unfinished frame
until the rest comes, so every write it returns ends on an event boundary.
"""

from __future__ import annotations

import re

__all__ = ["KEEPALIVE", "MESSAGE_EVENT", "FrameEvents", "event", "stream_start"]

#: A comment line: keeps proxies and the browser from timing out an idle stream.
KEEPALIVE = b":\n\n"

_TYPED = b'{"type":"'
# message frames (wire.message_payload) and the joined notice end with the offset
_MESSAGE = b'{"type":"message",'
_WITH_ID = (_MESSAGE, b'{"type":"joined",')
#: How a message's event carries it (counted for the deliveries metric; content cannot fake it: its quotes are escaped).
MESSAGE_EVENT = b"data: " + _MESSAGE
_OFFSET_KEY = b',"offset":"'
_OFFSET = re.compile(rb"[0-9]{1,20}-[0-9]{1,20}")
_NEWLINES = re.compile(rb"\r\n|\r|\n")
_BREAK = re.compile(rb"[\r\n]")


def stream_start(retry_ms: int) -> bytes:
    """The first bytes of a stream's body: how long the browser waits before it reconnects."""
    return b"retry: %d\n\n" % retry_ms


def event(payload: bytes) -> bytes:
    """One frame's JSON as one event (see the module docstring)."""
    broken = _BREAK.search(payload) is not None
    if not broken and payload.startswith(_MESSAGE):
        # the usual case, once per message and stream: the offset ends the frame, and holds no line break
        at = payload.rfind(_OFFSET_KEY)
        if at > 0:
            return b"".join((b"id: ", payload[at + len(_OFFSET_KEY) : -2], b"\ndata: ", payload, b"\n\n"))
    lines = [b""]
    if payload.startswith(_WITH_ID):
        at = payload.rfind(_OFFSET_KEY)
        offset = payload[at + len(_OFFSET_KEY) : -2]
        if at > 0 and _OFFSET.fullmatch(offset):
            lines[0] = b"id: " + offset + b"\n"
    if payload.startswith(_TYPED) and not payload.startswith(_MESSAGE):
        end = payload.find(b'"', len(_TYPED))
        if end > 0:
            lines.append(b"event: " + payload[len(_TYPED) : end] + b"\n")
    if broken:
        # JSON whitespace may hold line breaks (never inside a string): one data line each, joined by the browser
        lines.extend(b"data: " + part + b"\n" for part in _NEWLINES.split(payload))
    else:
        lines.append(b"data: " + payload + b"\n")
    lines.append(b"\n")
    return b"".join(lines)


class FrameEvents:
    """Re-encodes a stream of unmasked WebSocket frames (any cuts) as events; control frames are dropped."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame held until its rest is written."""
        return len(self._rest)

    def feed(self, data: bytes | memoryview) -> bytes:
        """The events of every frame C{data} completes (b"" when it completes none)."""
        buf = self._rest + data if self._rest else bytes(data)
        out: list[bytes] = []
        size = len(buf)
        at = 0
        while size - at >= 2:
            length, start = buf[at + 1] & 0x7F, at + 2
            if length == 126:
                start += 2
                length = int.from_bytes(buf[at + 2 : start], "big")
            elif length == 127:
                start += 8
                length = int.from_bytes(buf[at + 2 : start], "big")
            end = start + length
            if start > size or end > size:
                break
            if buf[at] & 0x0F == 1:  # a text frame; the server writes nothing else through a session
                out.append(event(buf[start:end]))
            at = end
        self._rest = buf[at:]
        return out[0] if len(out) == 1 else b"".join(out)
