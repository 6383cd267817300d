"""
Presence, pure (no Redis, no sockets): what this node holds, and what the
whole deployment holds as one node sees it.

L{PresenceBook} counts this node's connections per channel: user (a verified
token's ``sub``) -> connections, and anonymous connections. The hub tells it
of every change in who listens to what; it remembers, per channel, what
changed since the last write to Redis, so writes are per channel and per
flush, never per connection event: a user who leaves and comes back between
two flushes costs nothing.

L{ChannelView} is one channel's users across every node, as one node sees
it, for the join/leave events: per node, the users it has and the version
(the node's flush number) of that knowledge. A user is present while at
least one node has it; it joins when the first node gets it and leaves when
the last one loses it, whatever the number of tabs and nodes. Versions make
updates idempotent and order-proof: a node's update older than what the view
knows of that node is ignored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["ChannelChanges", "ChannelView", "Event", "PresenceBook"]

#: Events as (user, True for a join / False for a leave).
Event = tuple[str, bool]


@dataclass(frozen=True)
class ChannelChanges:
    """
    One channel's changes since the last flush: the new connection count of
    each user that changed (0: gone), the anonymous count if it changed, the
    users whose presence on this node flipped (True: now present), and the
    counts at the last flush (to take them back if the write fails).
    """

    channel: str
    users: dict[str, int]
    anonymous: int | None
    flipped: dict[str, bool]
    before: dict[str | None, int]


class PresenceBook:
    """This node's connections per channel, and what changed since the last flush."""

    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        """@param on_change: called at every change (to schedule a flush)."""
        self._on_change = on_change
        self._users: dict[str, Counter[str]] = {}
        self._anonymous: Counter[str] = Counter()
        # channel -> {user (None: anonymous): its count at the last flush}
        self._dirty: dict[str, dict[str | None, int]] = {}

    # -- the hub's changes ---------------------------------------------------

    def joined(self, user: str | None, channels: Iterable[str]) -> None:
        """A connection of C{user} (None: anonymous) now listens to C{channels}."""
        for channel in channels:
            self._change(channel, user, 1)

    def left(self, user: str | None, channels: Iterable[str]) -> None:
        """A connection of C{user} no longer listens to C{channels}."""
        for channel in channels:
            self._change(channel, user, -1)

    def _change(self, channel: str, user: str | None, delta: int) -> None:
        before = self.count(channel, user)
        after = before + delta
        if after < 0:  # a bug elsewhere must not make counts negative in Redis
            return
        self._dirty.setdefault(channel, {}).setdefault(user, before)
        self._on_change()
        if user is None:
            if after:
                self._anonymous[channel] = after
            else:
                self._anonymous.pop(channel, None)
            return
        users = self._users.setdefault(channel, Counter())
        if after:
            users[user] = after
        else:
            del users[user]
            if not users:
                del self._users[channel]

    def leave_all(self) -> None:
        """Every connection leaves (the node stops); later changes are ignored."""
        for channel, users in self._users.items():
            dirty = self._dirty.setdefault(channel, {})
            for user, count in users.items():
                dirty.setdefault(user, count)
        for channel, count in self._anonymous.items():
            self._dirty.setdefault(channel, {}).setdefault(None, count)
        self._users.clear()
        self._anonymous.clear()

    # -- reading -------------------------------------------------------------

    def count(self, channel: str, user: str | None) -> int:
        """Connections of C{user} (None: anonymous) on C{channel} on this node."""
        if user is None:
            return self._anonymous.get(channel, 0)
        users = self._users.get(channel)
        return users.get(user, 0) if users is not None else 0

    def channels(self) -> list[str]:
        """The channels this node has anyone on."""
        return list(set(self._users) | set(self._anonymous))

    def has_changes(self) -> bool:
        return bool(self._dirty)

    # -- flushing --------------------------------------------------------------

    def take_changes(self, max_fields: int) -> list[ChannelChanges]:
        """
        The changes of whole channels, oldest first, until about C{max_fields}
        fields (at least one channel); they are forgotten here.
        """
        taken: list[ChannelChanges] = []
        fields = 0
        for channel in list(self._dirty):
            if taken and fields + len(self._dirty[channel]) > max_fields:
                break
            before = self._dirty.pop(channel)
            fields += len(before)
            users: dict[str, int] = {}
            flipped: dict[str, bool] = {}
            anonymous = None
            for user, old in before.items():
                now = self.count(channel, user)
                if user is None:
                    anonymous = now if now != old else None
                    continue
                if now != old:
                    users[user] = now
                if (now > 0) != (old > 0):
                    flipped[user] = now > 0
            if users or anonymous is not None:
                taken.append(ChannelChanges(channel, users, anonymous, flipped, before))
        return taken

    def restore(self, changes: list[ChannelChanges]) -> None:
        """C{changes} were not written: they are changes again, from the counts Redis last had."""
        for change in changes:
            self._dirty.setdefault(change.channel, {}).update(change.before)
        if changes:
            self._on_change()

    def lost(self, channel: str) -> None:
        """Redis lost this node's record of C{channel} (it expired): write all of it again, as new."""
        dirty = self._dirty.setdefault(channel, {})
        for user in self._users.get(channel, ()):
            dirty[user] = 0
        if self._anonymous.get(channel):
            dirty[None] = 0
        self._on_change()


class ChannelView:
    """One channel's users on every node, as this node knows them (see the module docstring)."""

    def __init__(self) -> None:
        self._nodes: dict[str, tuple[int, set[str]]] = {}
        self._holders: Counter[str] = Counter()

    def users(self) -> set[str]:
        return set(self._holders)

    def nodes(self) -> list[str]:
        return list(self._nodes)

    def update(self, node: str, version: int, flipped: dict[str, bool]) -> list[Event]:
        """A node's flush: C{flipped} users are now present (True) or gone (False) there."""
        known, users = self._nodes.get(node, (-1, set()))
        if version <= known:
            return []
        self._nodes[node] = (version, users)
        events: list[Event] = []
        for user, present in flipped.items():
            if present and user not in users:
                users.add(user)
                self._holders[user] += 1
                if self._holders[user] == 1:
                    events.append((user, True))
            elif not present and user in users:
                users.discard(user)
                events.extend(self._release(user))
        return events

    def replace(self, node: str, version: int, present: set[str]) -> list[Event]:
        """Everything C{node} has, as of C{version} (a snapshot read from Redis)."""
        known, users = self._nodes.get(node, (-1, set()))
        if version <= known:
            return []
        flipped = {user: True for user in present - users}
        flipped.update({user: False for user in users - present})
        return self.update(node, version, flipped)

    def drop(self, node: str) -> list[Event]:
        """C{node} is gone (it stopped refreshing its presence): its users leave unless another node has them."""
        _, users = self._nodes.pop(node, (0, set()))
        events: list[Event] = []
        for user in users:
            events.extend(self._release(user))
        return events

    def _release(self, user: str) -> list[Event]:
        self._holders[user] -= 1
        if self._holders[user] <= 0:
            del self._holders[user]
            return [(user, False)]
        return []
