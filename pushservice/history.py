"""
A node's window on the log: the most recent messages, bounded by count and
bytes, addressed by a local index, for replays (``since``) and for
connections catching up after their socket was full. Pure; no Twisted.
"""

from __future__ import annotations

from bisect import bisect_right

from .logentry import Message
from .wire import Offset

__all__ = ["History"]

_COMPACT = 4096  # evicted slots kept before the list is compacted


class History:
    """
    The newest messages this node has read, in log order. Indices are local
    and only grow: C{self[i]} is valid for C{first <= i < next}.
    """

    def __init__(self, count: int, max_bytes: int) -> None:
        self._items: list[Message] = []
        self._start = 0  # position of index `first` in _items
        self._count = count
        self._max_bytes = max_bytes
        self._bytes = 0
        self._gaps: list[int] = []  # indices of gap markers held, ascending
        #: Index of the oldest message held.
        self.first = 0
        #: Index the next message appended gets.
        self.next = 0
        #: Newest offset no longer held (0-0: none was ever dropped): a replay from before it is incomplete.
        self.horizon: Offset = (0, 0)
        #: Newest offset appended.
        self.last_offset: Offset = (0, 0)

    def __len__(self) -> int:
        return self.next - self.first

    @property
    def last(self) -> int:
        """Index of the newest message (C{first - 1} when empty)."""
        return self.next - 1

    def __getitem__(self, index: int) -> Message:
        if not self.first <= index < self.next:
            raise IndexError(index)
        return self._items[self._start + index - self.first]

    def append(self, message: Message) -> int:
        """Add the newest message; drop the oldest past the bounds. Returns its index."""
        index = self.next
        self._items.append(message)
        self.next += 1
        self._bytes += len(message.frame)
        if message.offset > self.last_offset:
            self.last_offset = message.offset
        if message.gap:
            self._gaps.append(index)
        while len(self) > self._count or (self._bytes > self._max_bytes and len(self) > 1):
            self._evict()
        return index

    def _evict(self) -> None:
        old = self._items[self._start]
        self._start += 1
        self.first += 1
        self._bytes -= len(old.frame)
        self.horizon = old.offset
        if self._gaps and self._gaps[0] < self.first:
            self._gaps.pop(0)
        if self._start >= _COMPACT and self._start * 2 >= len(self._items):
            del self._items[: self._start]
            self._start = 0

    def index_after(self, offset: Offset) -> int:
        """Index of the first message held newer than C{offset} (C{next} if none)."""
        position = bisect_right(self._items, offset, lo=self._start, key=lambda m: m.offset)
        return self.first + position - self._start

    def recovery(self, since: Offset) -> tuple[bool, int | None]:
        """
        Where a resume from C{since} starts, and whether it is complete.
        C{since} must not be newer than C{last_offset} (ask the log about those).

        @return: C{(recovered, start)}: C{start} is the index to replay from,
            None when C{since} was never issued (no replay; go on live);
            C{recovered} is false when messages after C{since} are not all
            held, or a gap lies in between.
        """
        if since < self.horizon:
            return False, self.first
        start = self.index_after(since)
        issued = since == self.horizon or (start > self.first and self[start - 1].offset == since)
        if not issued:
            return False, None
        return not (self._gaps and self._gaps[-1] >= start), start
