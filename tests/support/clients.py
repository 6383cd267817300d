"""
The test WebSocket client, and the tokens it presents.

L{Client} checks every frame it receives with a strict parser (what a
browser's JSON.parse takes, without the leniencies of Python's json) and
never raises inside onMessage: a frame that is not strict JSON is queued as
such and fails the test where it reads it. A close is queued too, so a test
waiting for more frames fails at once with the close code, not at a timeout.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import jwt
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer

from .waiting import TIMEOUT, timed

__all__ = ["CLOSED", "NOT_STRICT", "SECRET", "Client", "Refused", "connect", "strict_loads", "token"]

#: The token secret of every test node that verifies tokens (the C{secret_file} fixture holds it).
SECRET = b"pushservice-test-secret-0123456789abcdef"
#: The type of a queued frame that was not strict JSON (with "why" and "head").
NOT_STRICT = "<not strict JSON>"
#: The type of the frame queued when the connection closed (with "code" and "reason").
CLOSED = "<closed>"


def token(sub: str | None = "alice", *, ttl: float = 600, secret: bytes = SECRET, **claims: Any) -> str:
    """An HS256 token for C{sub}, valid for C{ttl} seconds; C{claims} add or replace claims, None drops one."""
    payload = {"sub": sub, "exp": int(time.time() + ttl), **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret, algorithm="HS256")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is not a finite number")
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError(f"duplicate member names in {[k for k, _ in pairs]}")
    return obj


def strict_loads(payload: bytes) -> Any:
    """
    Parse a frame as strict JSON: UTF-8, no NaN/Infinity, no number that is
    not a finite double, no duplicate member names.

    @raise ValueError: with why.
    """
    return json.loads(
        payload.decode("utf-8"),
        parse_constant=_reject_constant,
        parse_float=_finite,
        object_pairs_hook=_unique,
    )


class Refused(Exception):
    """The server closed before the WebSocket opened."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason or ""


Frame = dict[str, Any]


class Client(WebSocketClientProtocol):
    """Queues every frame, checked; C{await next()} takes them in order, with a timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: defer.DeferredQueue[Frame] = defer.DeferredQueue()
        self.opened: defer.Deferred[None] = defer.Deferred()
        self.closed: defer.Deferred[tuple[int | None, str | None]] = defer.Deferred()
        #: Every payload received, as received.
        self.raw: list[bytes] = []

    # -- Autobahn's callbacks: none of them raises ------------------------------------

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.raw.append(payload)
        try:
            if isBinary:
                raise ValueError("a binary frame")
            frame = strict_loads(payload)
            if not isinstance(frame, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            frame = {"type": NOT_STRICT, "why": str(e)[:200], "head": payload[:200]}
        self.frames.put(frame)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(Refused(code, reason))
        if not self.closed.called:
            self.closed.callback((code, reason))
        self.frames.put({"type": CLOSED, "code": code, "reason": reason})

    # -- for tests ----------------------------------------------------------------------

    def send(self, frame: Any) -> None:
        """Send C{frame}: bytes as they are, anything else as JSON."""
        self.sendMessage(frame if isinstance(frame, bytes) else json.dumps(frame).encode())

    async def next(self, timeout: float = TIMEOUT) -> Frame:
        """
        The next frame (or the close, as a L{CLOSED} frame).

        @raise AssertionError: if it is not strict JSON.
        """
        frame: Frame = await timed(self.frames.get(), timeout)
        if frame["type"] == NOT_STRICT:
            raise AssertionError(f"a frame that is not strict JSON ({frame['why']}): {frame['head']!r}")
        return frame

    async def next_of(self, kind: str, timeout: float = TIMEOUT) -> Frame:
        """The next frame, which must be of type C{kind}."""
        frame = await self.next(timeout)
        assert frame["type"] == kind, frame
        return frame

    async def messages(self, n: int, timeout: float = TIMEOUT) -> list[Frame]:
        """The next C{n} frames, all messages, within C{timeout} seconds in all."""
        return await self.messages_until(lambda frames: len(frames) >= n, timeout)

    async def messages_until(self, done: Callable[[list[Frame]], bool], timeout: float = TIMEOUT) -> list[Frame]:
        """Message frames until C{done(frames)}; fails on any other frame, or after C{timeout} seconds in all."""
        deadline = time.monotonic() + timeout
        frames: list[Frame] = []
        while not done(frames):
            remaining = deadline - time.monotonic()
            try:
                frame = await self.next(max(remaining, 0.01))
            except defer.TimeoutError:
                raise AssertionError(
                    f"gave up after {len(frames)} messages in {timeout}s; last: {frames[-1:]}"
                ) from None
            assert frame["type"] == "message", (len(frames), frame)
            frames.append(frame)
        return frames

    async def request(self, frame: Any, timeout: float = TIMEOUT) -> Frame:
        """Send C{frame}; the next frame."""
        self.send(frame)
        return await self.next(timeout)

    async def until_marker(self, marker: str, timeout: float = 20.0, limit: int = 10_000) -> list[Frame]:
        """
        Every frame before the broadcast C{marker} (which is consumed).

        @raise AssertionError: after C{limit} frames, C{timeout} seconds in all, or a close.
        """
        frames: list[Frame] = []
        deadline = time.monotonic() + timeout
        for _ in range(limit):
            frame = await self.next(max(0.1, deadline - time.monotonic()))
            if frame["type"] == CLOSED:
                raise AssertionError(f"closed ({frame}) before the marker {marker!r}; frames before: {frames[-5:]}")
            if frame["type"] == "message" and frame.get("content") == marker and frame.get("channel") is None:
                return frames
            frames.append(frame)
        raise AssertionError(f"no marker {marker!r} within {limit} frames: {frames[-5:]}")

    def pending(self) -> int:
        """Frames received and not read yet."""
        return len(self.frames.pending)

    def drain(self) -> list[Frame]:
        """Every frame received and not read yet, taken."""
        frames, self.frames.pending = list(self.frames.pending), []
        return frames

    def not_strict(self) -> list[bytes]:
        """Every payload received so far that is not strict JSON (the first 200 bytes of each)."""
        bad = []
        for payload in self.raw:
            try:
                strict_loads(payload)
            except ValueError:
                bad.append(payload[:200])
        return bad

    async def close(self) -> None:
        """Close with 1000 (if still open) and wait for the close, bounded."""
        if self.state == self.STATE_OPEN:
            self.sendClose(1000)
        await timed(self.closed, 5)


async def connect(
    port: int,
    query: str = "",
    headers: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
    *,
    origin: str | None = None,
    options: dict[str, Any] | None = None,
    trust: bytes | None = None,
) -> Client:
    """
    Open a WebSocket to 127.0.0.1:C{port} and wait until it is open.

    @param options: Autobahn protocol options for the client (e.g. compression offers).
    @param trust: a PEM certificate: connect with TLS (wss://localhost) trusting only it.
    @raise Refused: if the server refuses the handshake.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

    scheme, host = ("wss", "localhost") if trust is not None else ("ws", "127.0.0.1")
    url = f"{scheme}://{host}:{port}/" + (f"?{query}" if query else "")
    factory = WebSocketClientFactory(url, headers=headers or {}, origin=origin)
    factory.protocol = Client
    if options:
        factory.setProtocolOptions(**options)
    endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    if trust is not None:
        from twisted.internet import ssl

        tls = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(trust))
        endpoint = wrapClientTLS(tls, endpoint)
    protocol: Client = await timed(endpoint.connect(factory), timeout)
    await timed(protocol.opened, timeout)
    return protocol
