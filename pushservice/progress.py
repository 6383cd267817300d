"""
How a Redis loop is doing: whether it keeps up (for /healthz, which must
say 503 when one is stuck), and how it reports and spaces out a failing step.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from .redislink import is_connection_error

__all__ = ["Progress", "Retries"]

#: Retry delays after a failed step: the first, doubled each time, at most.
STEP_RETRY_FIRST, STEP_RETRY_MAX = 0.5, 5.0
#: The same failure is logged again (with how often it happened) at most this often.
REPEAT_LOG_SECONDS = 60.0


class Progress:
    """
    One loop's progress. The stall clock runs from the last step completed
    or the last time the loop found no work. It stops while the loop is
    blocked in Redis waiting for work (such a wait has a reply deadline of
    its own), unless the loop's last attempt failed: a loop that keeps
    failing the same step is stalled, however fast it fails.
    """

    def __init__(self, clock: IReactorTime, name: str) -> None:
        self._clock = clock
        self.name = name
        self._blocked = True
        self._failing = False
        self._since = clock.seconds()

    def blocked(self) -> None:
        """Waiting in Redis (or for Redis) for work."""
        self._blocked = True

    def idle(self) -> None:
        """The wait found no work."""
        self._since = self._clock.seconds()
        self._failing = False

    def working(self) -> None:
        """Has work in hand."""
        self._blocked = False

    def stepped(self) -> None:
        """Completed a step."""
        self._since = self._clock.seconds()
        self._failing = False

    def failed(self) -> None:
        """The last attempt failed."""
        self._failing = True

    def stalled_for(self) -> float:
        """Seconds with work in hand (or failing) and no step completed (0 while blocked and not failing)."""
        return 0.0 if self._blocked and not self._failing else self._clock.seconds() - self._since


class Retries:
    """
    What a loop does after a failed step: marks it in its L{Progress}, logs
    it (a lost connection is the bus's to log, once per outage; any other
    failure with its traceback the first time, then once a minute with a
    count), and waits before the next try, longer each time up to 5 s.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, progress: Progress) -> None:
        self._clock = clock
        self._progress = progress
        self._delay = STEP_RETRY_FIRST
        self._last: tuple[Any, str] | None = None
        self._logged_at = 0.0
        self._repeats = 0

    def succeeded(self) -> None:
        self._delay = STEP_RETRY_FIRST
        self._last = None

    async def after(self, failure: Any) -> None:
        self._progress.failed()
        if not is_connection_error(failure):
            self._report(failure)
        delay, self._delay = self._delay, min(STEP_RETRY_MAX, self._delay * 2)
        await deferLater(self._clock, delay, lambda: None)

    def _report(self, failure: Any) -> None:
        now = self._clock.seconds()
        key = (failure.type, failure.getErrorMessage())
        name = self._progress.name
        if key != self._last:
            self._last, self._logged_at, self._repeats = key, now, 0
            self._log.failure("{loop} step failed; retrying", failure, loop=name)
            return
        self._repeats += 1
        if now - self._logged_at >= REPEAT_LOG_SECONDS:
            self._log.error("{loop} step still failing ({n} more times): {why}", loop=name, n=self._repeats, why=key[1])
            self._logged_at, self._repeats = now, 0
