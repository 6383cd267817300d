"""Join/leave frames, sent to the connections watching their channel without holding the reactor."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime

from .presencebook import Event
from .wire import encode

__all__ = ["SENDS_PER_TURN", "EventSender"]

#: Most event frames handed to connections in one reactor turn (the rest in the next ones).
SENDS_PER_TURN = 1000


class EventSender:
    """Join/leave frames to the watchers of their channel, in order, L{SENDS_PER_TURN} per reactor turn."""

    def __init__(
        self, clock: IReactorTime, watchers: Callable[[str], list[Any]], watching: Callable[[Any, str], bool]
    ) -> None:
        self._clock = clock
        self._watchers = watchers
        self._watching = watching
        self._outgoing: deque[tuple[str, bytes]] = deque()
        self._current: tuple[str, bytes, list[Any], int] | None = None
        self._timer: Any = None

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()

    def send(self, channel: str, events: list[Event]) -> None:
        for user, joined in events:
            frame = {"type": "join" if joined else "leave", "channel": channel, "user": user}
            self._outgoing.append((channel, encode(frame)))
        if self._outgoing and self._timer is None:
            self._timer = self._clock.callLater(0, self._send_some)

    def _send_some(self) -> None:
        self._timer = None
        budget = SENDS_PER_TURN
        while budget > 0:
            if self._current is None:
                if not self._outgoing:
                    return
                channel, payload = self._outgoing.popleft()
                self._current = (channel, payload, self._watchers(channel), 0)
            channel, payload, sessions, start = self._current
            end = min(len(sessions), start + budget)
            for session in sessions[start:end]:
                if self._watching(session, channel):  # not unsubscribed meanwhile
                    session.send(payload)
            budget -= end - start
            self._current = None if end >= len(sessions) else (channel, payload, sessions, end)
        self._timer = self._clock.callLater(0, self._send_some)
