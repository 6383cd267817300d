"""
Helpers for tests/test_private.py and tests/test_poison.py: a WebSocket
client that checks every frame it receives with a strict parser (what a
browser's JSON.parse takes, without the leniencies of Python's json), and
reads up to a marker broadcast instead of sleeping for "nothing more".
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from typing import Any

import jwt
from autobahn.twisted.websocket import WebSocketClientFactory
from helpers import Client, timed
from hypothesis import HealthCheck, Phase, given, settings
from twisted.internet import reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint

SECRET = b"private-stays-private-test-secret-0123456789"
NOT_STRICT = "<not strict JSON>"
CLOSED = "<closed>"


def token(sub: str, **claims: Any) -> str:
    """An HS256 token for C{sub}, valid for ten minutes, with extra claims (e.g. channels)."""
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600, **claims}, SECRET, algorithm="HS256")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"{token[:20]} is not a finite number")
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


class StrictClient(Client):
    """A test client that never raises on a frame: one that is not strict JSON is queued as such, for the test to fail on."""

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
        super().onClose(wasClean, code, reason)
        self.frames.put({"type": CLOSED, "code": code, "reason": reason})  # a wait for more frames ends at once

    def not_strict(self) -> list[bytes]:
        """Every frame received so far that is not strict JSON (the first 200 bytes of each)."""
        bad = []
        for payload in self.raw:
            try:
                strict_loads(payload)
            except ValueError:
                bad.append(payload[:200])
        return bad

    async def until_marker(self, marker: str, timeout: float = 10.0, limit: int = 10_000) -> list[dict[str, Any]]:
        """Every frame before the broadcast C{marker} (which is consumed); fails after C{limit} frames, C{timeout} or a close."""
        frames: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        for _ in range(limit):
            frame = await self.next(max(0.1, deadline - time.monotonic()))
            if frame.get("type") == CLOSED:
                raise AssertionError(f"closed ({frame}) before the marker {marker!r}; frames before: {frames[-5:]}")
            if frame.get("type") == "message" and frame.get("content") == marker and frame.get("channel") is None:
                return frames
            frames.append(frame)
        raise AssertionError(f"no marker {marker!r} within {limit} frames: {frames[-5:]}")


async def connect(port: int, query: str = "", timeout: float = 10.0) -> StrictClient:
    """Open a WebSocket with a L{StrictClient}."""
    url = f"ws://127.0.0.1:{port}/" + (f"?{query}" if query else "")
    factory = WebSocketClientFactory(url)
    factory.protocol = StrictClient
    protocol = await timed(TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory), timeout)
    await timed(protocol.opened, timeout)
    return protocol  # type: ignore[no-any-return]


def http_get(url: str, timeout: float = 5.0) -> tuple[int | None, str]:
    """GET C{url}, blocking (in a thread for a node in this process): status and body, or (None, why) after C{timeout}."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()
    except OSError as e:
        return None, str(e)


async def get(url: str, timeout: float = 5.0) -> tuple[int | None, str]:
    """L{http_get} in a thread, so the reactor (and a node in this process) runs meanwhile."""
    return await threads.deferToThread(http_get, url, timeout)  # type: ignore[no-any-return]


async def metrics(url: str) -> dict[str, float]:
    """The node's /metrics samples without labels, by name."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = await get(url + "/metrics")
    assert status == 200, text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def examples(strategy: Any, count: int) -> list[Any]:
    """
    C{count} examples of C{strategy}, drawn by Hypothesis (derandomized, so
    every run pushes the same). The examples are then pushed through a node
    in batches: a node per example would be too slow, and pytest-twisted runs
    tests in the reactor's greenlet, so a @given test cannot wait on one.
    """
    drawn: list[Any] = []

    @settings(
        derandomize=True,
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def draw(example: Any) -> None:
        drawn.append(example)

    draw()
    return drawn
