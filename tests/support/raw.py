"""
Raw loopback sockets, for what a WebSocket library would refuse to send:
hand-built request heads and frames (L{Raw}, in the reactor), and blocking
sockets that complete a handshake and then never read (L{non_reader}).
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

from twisted.internet.protocol import Protocol

from .waiting import timed, until

__all__ = [
    "KEY",
    "Raw",
    "ask",
    "closed_by_peer",
    "non_reader",
    "raw",
    "raw_ws",
    "take_frames",
    "take_frames_rsv1",
    "upgrade_request",
    "ws_frame",
]

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def upgrade_request(port: int, path: str = "/") -> bytes:
    """A WebSocket upgrade request head for C{path}."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {KEY.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def ws_frame(payload: bytes, opcode: int = 1, fin: bool = True, mask: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    """One masked client frame."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes([first, 0x80 | n])
    elif n < 65536:
        head = bytes([first, 0x80 | 126]) + struct.pack("!H", n)
    else:
        head = bytes([first, 0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def take_frames_rsv1(buf: bytearray, masked: bool = True) -> list[tuple[int, bool, bytes]]:
    """Complete frames (opcode, RSV1, payload) at the start of C{buf}, removed from it (masked only if C{masked})."""
    out = []
    while len(buf) >= 2:
        n, i = buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                break
            n, i = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, i = struct.unpack("!Q", buf[2:10])[0], 10
        if buf[1] & 0x80:
            assert masked, "a masked frame from the server"
            i += 4
        if len(buf) < i + n:
            break
        out.append((buf[0] & 0x0F, bool(buf[0] & 0x40), bytes(buf[i : i + n])))
        del buf[: i + n]
    return out


def take_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Complete frames (opcode, payload) at the start of C{buf}, removed from it (masked or not)."""
    return [(opcode, payload) for opcode, _, payload in take_frames_rsv1(buf)]


class Raw(Protocol):
    """A raw TCP client: records what arrives; parses WebSocket frames once upgraded."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.head: bytes | None = None
        self.frames: list[tuple[int, bytes]] = []
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if self.head is None and b"\r\n\r\n" in self.buf:
            head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
            self.head, self.buf = head, bytearray(rest)
        if self.head is not None and self.status == 101:
            self.frames += take_frames(self.buf)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True

    @property
    def status(self) -> int | None:
        return int(self.head.split(b" ", 2)[1]) if self.head else None

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def json_frames(self) -> list[dict[str, Any]]:
        return [json.loads(p) for op, p in self.frames if op == 1]

    def close_code(self) -> int | None:
        for op, p in self.frames:
            if op == 8:
                return struct.unpack("!H", p[:2])[0] if len(p) >= 2 else 1005
        return None

    def abort(self) -> None:
        if not self.lost:
            self.transport.abortConnection()


async def raw(port: int) -> Raw:
    """A raw connection to 127.0.0.1:C{port}."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    return await timed(connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Raw()), 10)


async def raw_ws(port: int) -> Raw:
    """A raw client that completed the WebSocket handshake."""
    r = await raw(port)
    r.send(upgrade_request(port))
    await until(lambda: r.head is not None or r.lost, what="handshake response")
    assert r.status == 101, r.head
    return r


def blocking_upgrade(port: int, request: bytes, read_head: bool = True) -> tuple[socket.socket, bytes]:
    """
    A blocking socket with a tiny receive buffer that sent C{request} (an
    upgrade) and, with C{read_head}, read the 101 head (returned) and not a
    byte more. Blocks: call it in a thread.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall(request)
    head = b""
    while read_head and b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    assert not read_head or head.startswith(b"HTTP/1.1 101"), head
    return s, head


def non_reader(port: int, path: str = "/", read_head: bool = True) -> socket.socket:
    """An upgrade for C{path} that then never reads (see L{blocking_upgrade}). Blocks: call it in a thread."""
    return blocking_upgrade(port, upgrade_request(port, path), read_head)[0]


def closed_by_peer(s: socket.socket, seconds: float = 10.0) -> bool:
    """Drain and close C{s}; True if the server closed it (EOF or reset) within C{seconds}. Blocks."""
    s.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not s.recv(1 << 20):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    finally:
        s.close()
    return False


async def ask(port: int, data: bytes, timeout: float = 10.0) -> Raw:
    """Send C{data} on a new connection; return once the server answered and closed it."""
    r = await raw(port)
    r.send(data)
    await until(lambda: r.lost, timeout, what="the server answers and closes")
    assert r.head is not None, bytes(r.buf[:200])
    return r
