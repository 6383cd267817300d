"""Whether a Redis loop is keeping up: for /healthz, which must say 503 when one is stuck."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

__all__ = ["Progress"]


class Progress:
    """
    One loop's progress. The stall clock runs from the last step completed
    or the last time the loop found no work; it stops while the loop is
    blocked in Redis waiting for work (such a wait has a reply deadline of
    its own). A loop that keeps failing the same step is stalled.
    """

    def __init__(self, clock: IReactorTime, name: str) -> None:
        self._clock = clock
        self.name = name
        self._blocked = True
        self._since = clock.seconds()

    def blocked(self) -> None:
        """Waiting in Redis (or for Redis) for work."""
        self._blocked = True

    def idle(self) -> None:
        """The wait found no work."""
        self._since = self._clock.seconds()

    def working(self) -> None:
        """Has work in hand."""
        self._blocked = False

    def stepped(self) -> None:
        """Completed a step."""
        self._since = self._clock.seconds()

    def stalled_for(self) -> float:
        """Seconds with work in hand and no step completed (0 while blocked)."""
        return 0.0 if self._blocked else self._clock.seconds() - self._since
