"""
Whether the log goes on where this node left it: pure bookkeeping of the
entries' sequence numbers. A jump forward means entries were trimmed before
the node read them; a step back (or a log that now ends before the node's
place) means Redis lost data. Either way one marker goes before the next
deliverable message: a ``gap`` frame for every connection, which also keeps
any replay across it from claiming to be complete.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from .logentry import Message, gap_message
from .metrics import Stats

__all__ = ["Continuity"]

Gap = tuple[str, int | None]  # (reason, entries missed if known)


class Continuity:
    """Follows the log's sequence numbers and says which gap marker goes before a message."""

    _log = Logger()

    def __init__(self, stats: Stats, framer: Callable[[bytes], bytes]) -> None:
        self._stats = stats
        self._framer = framer
        self._seq: int | None = None  # number of the last entry read
        self._went_back = False
        self._untold: Gap | None = None  # found at an entry that could not be delivered

    @property
    def last(self) -> int:
        """The number of the last entry read (0 before any)."""
        return self._seq or 0

    def went_back(self) -> None:
        """The log now ends before this node's place: whatever comes next follows a reset."""
        self._went_back = True

    def marker(self, seq: int, message: Message | None, quiet: bool = False) -> Message | None:
        """
        The gap marker to put before entry number C{seq} (before C{message},
        its message, or the next one when it cannot be delivered), if any.
        C{quiet}: no log line and no metric (the history load's old gaps).
        """
        last, self._seq = self._seq, seq
        reset, self._went_back = self._went_back, False
        gap, self._untold = self._untold, None
        if last is not None and (seq != last + 1 or reset):
            found: Gap = ("trimmed", seq - last - 1) if seq > last + 1 and not reset else ("reset", None)
            if not quiet:
                self._tell(*found)
            # one gap not told yet and another: one marker says both
            if gap is not None and (gap[0], found[0]) == ("trimmed", "trimmed"):
                found = ("trimmed", (gap[1] or 0) + (found[1] or 0))
            elif gap is not None:
                found = ("reset", None)
            gap = found
        if gap is None:
            return None
        if message is None:
            self._untold = gap
            return None
        return gap_message(message.offset, gap[0], gap[1], self._framer)

    def _tell(self, reason: str, missed: int | None) -> None:
        self._stats.gaps[reason] += 1
        if reason == "trimmed":
            self._log.warn(
                "{n} log entries were trimmed before this node read them (it was paused or cut off longer "
                "than --node-ttl, or the log reached --log-hard-maxlen); telling every connection",
                n=missed,
            )
        else:
            self._log.warn("the log went back in time (Redis lost data); telling every connection")
