"""
Bounded waiting, the only kind the tests do.

  - L{timed}: a Deferred or coroutine that fails after a timeout.
  - L{until} (the reactor runs meanwhile) and L{until_sync} (blocking, for
    tests without clients in this process): poll a predicate until it is
    true, failing after a timeout. These are the only polling loops.
  - L{read_to_marker} and L{nothing_more}: "nothing else arrived" without
    sleeping. A marker broadcast is pushed after everything else; it goes
    through the ordered log, so whatever was to reach a client reaches it
    before the marker, and reading up to the marker sees it all.
  - L{sleep}: only where a test creates time on purpose (a SIGSTOP window,
    a rate-limit refill, a new millisecond); say why at the call.

Nothing here imports the reactor at module level (conftest imports support).
"""

from __future__ import annotations

import inspect
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer

if TYPE_CHECKING:
    from .clients import Client

__all__ = ["TIMEOUT", "new_marker", "nothing_more", "read_to_marker", "sleep", "timed", "until", "until_sync"]

#: Seconds for one wait when a test names no other bound.
TIMEOUT = 10.0


def timed(d: Any, seconds: float = TIMEOUT) -> defer.Deferred[Any]:
    """C{d} (a Deferred or a coroutine), failing with L{defer.TimeoutError} after C{seconds}."""
    from twisted.internet import reactor

    deferred = d if isinstance(d, defer.Deferred) else defer.ensureDeferred(d)
    return deferred.addTimeout(seconds, reactor)


async def sleep(seconds: float) -> None:
    """Let C{seconds} pass with the reactor running. Only to create time on purpose: say why at the call."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


async def until(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float = TIMEOUT,
    what: str = "condition",
    interval: float = 0.02,
) -> Any:
    """
    Call C{predicate} (which may return an awaitable) until it gives
    something true, the reactor running between calls; return that.

    @raise AssertionError: naming C{what}, after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout}s")
        await sleep(interval)


def until_sync(
    predicate: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition", interval: float = 0.05
) -> Any:
    """
    L{until}, blocking: for tests whose clients are other processes (the
    reactor of this process does not run meanwhile).

    @raise AssertionError: naming C{what}, after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout}s")
        time.sleep(interval)


def new_marker() -> str:
    """A broadcast no test pushes otherwise."""
    return f"marker {uuid.uuid4().hex}"


async def read_to_marker(
    client: Client, push: Callable[[str], object], marker: str | None = None, timeout: float = 20.0
) -> list[dict[str, Any]]:
    """Push the broadcast C{marker} (a new one by default) with C{push}; every frame C{client} got before it."""
    marker = marker or new_marker()
    push(marker)
    return await client.until_marker(marker, timeout)


async def nothing_more(clients: Iterable[Client], push: Callable[[str], object], timeout: float = 20.0) -> None:
    """Nothing arrived that was not read yet: each client's next frame is a marker pushed now with C{push}."""
    marker = new_marker()
    push(marker)
    for client in clients:
        extra = await client.until_marker(marker, timeout)
        assert extra == [], f"unexpected frames before the marker: {extra[:3]}"
