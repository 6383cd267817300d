"""
Clients that negotiate permessage-deflate (RFC 7692), for tests of it:

  - L{websockets_session}: the Python ``websockets`` library's own client
    (blocking; the test runs it in a thread while the reactor serves).
  - raw frames: L{offer_request} asks for compression by hand, L{take_frames}
    keeps each frame's RSV1 bit, L{inflate} reads a compressed payload with a
    fresh inflater (what a client that keeps no context between messages
    does), L{bomb_frame} builds a small masked frame that inflates to a lot.

Nothing here imports the reactor at module level.
"""

from __future__ import annotations

import json
import socket
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

from .raw import KEY, blocking_upgrade, take_frames_rsv1

__all__ = [
    "TAIL",
    "bomb_frame",
    "inflate",
    "offer_request",
    "read_frames",
    "response_extensions",
    "slow_reader",
    "take_frames",
    "websockets_session",
]

#: What a sender leaves off the end of a compressed message (RFC 7692 7.2.1).
TAIL = b"\x00\x00\xff\xff"


def offer_request(port: int, extensions: str, path: str = "/") -> bytes:
    """An upgrade request head offering C{extensions} (a Sec-WebSocket-Extensions value)."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {KEY.decode()}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Extensions: {extensions}\r\n\r\n"
    ).encode()


def slow_reader(port: int, extensions: str) -> socket.socket:
    """
    A blocking socket with a tiny receive buffer that completes a handshake
    offering C{extensions} and then reads nothing until told (L{read_frames}).
    Blocks: call it in a thread.
    """
    s, head = blocking_upgrade(port, offer_request(port, extensions))
    assert "permessage-deflate" in (response_extensions(head) or ""), head
    return s


def read_frames(s: socket.socket, count: int, timeout: float = 30.0) -> list[tuple[int, bool, bytes]]:
    """Read C{s} until C{count} frames came (or it closed, or C{timeout} seconds passed), then close it. Blocks."""
    buf = bytearray()
    frames: list[tuple[int, bool, bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(frames) < count and time.monotonic() < deadline:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
            frames += take_frames(buf)
    finally:
        s.close()
    return frames


def response_extensions(head: bytes) -> str | None:
    """The Sec-WebSocket-Extensions value of a response head, if any."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-extensions":
            return value.strip().decode()
    return None


def take_frames(buf: bytearray) -> list[tuple[int, bool, bytes]]:
    """Complete unmasked server frames (opcode, RSV1, payload) at the start of C{buf}, removed from it."""
    return take_frames_rsv1(buf, masked=False)


def inflate(payload: bytes) -> bytes:
    """A compressed message's payload, read with a fresh raw inflater (no context from earlier messages)."""
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(payload + TAIL)


def bomb_frame(inflated: int, mask: bytes = b"\x11\x22\x33\x44") -> bytes:
    """One masked, compressed text frame of spaces that inflates to C{inflated} bytes (~1000:1)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = b" " * (1 << 20)
    parts = [compressor.compress(chunk) for _ in range(inflated // len(chunk))]
    parts.append(compressor.compress(b" " * (inflated % len(chunk))))
    body = b"".join(parts) + compressor.flush(zlib.Z_SYNC_FLUSH)
    body = body[:-4]
    n = len(body)
    first = 0x80 | 0x40 | 0x1  # FIN, RSV1 (compressed), text
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0x80 | 126)) + struct.pack("!H", n)
    else:
        head = bytes((first, 0x80 | 127)) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(body))


def websockets_session(
    url: str, script: Callable[[Any], Any], compression: str | None = "deflate", timeout: float = 10.0
) -> tuple[str | None, Any]:
    """
    Connect to C{url} with the C{websockets} library's client (offering
    permessage-deflate unless C{compression} is None), run C{script(recv)}
    where C{recv()} is the next frame as JSON (bounded by C{timeout}), close.
    Blocks: call it in a thread. Returns the negotiated extensions and what
    C{script} returned.
    """
    from websockets.sync.client import connect

    with connect(url, compression=compression, open_timeout=timeout, close_timeout=2, max_size=None) as ws:
        extensions = ws.response.headers.get("Sec-WebSocket-Extensions")

        def recv() -> Any:
            return json.loads(ws.recv(timeout=timeout))

        recv.send = ws.send  # type: ignore[attr-defined]
        return extensions, script(recv)
