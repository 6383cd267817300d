"""
What one connection reads from the node's history when it is not live:
the messages for it (its user's, its channels', the broadcasts, gap
markers), minus those it already saw on a node that was ahead of this one.
Pure of sockets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .deflate import deflated_join
from .logentry import Message
from .wire import Offset

if TYPE_CHECKING:
    from .hub import Hub, Peer

__all__ = ["PIECE", "Backlog"]

#: Bytes gathered from history per write while catching up.
PIECE = 64 * 1024


def wants(peer: Peer, message: Message) -> bool:
    """Whether C{message} is for C{peer}: its user's, on its channels, or for everyone."""
    if message.user is not None and message.user != peer.user:
        return False
    return message.channel is None or message.channel in peer.channels


class Backlog:
    """Reads one connection's messages from history, a piece at a time, skipping what it saw elsewhere."""

    __slots__ = ("_hub", "_peer", "_deflate", "_floors")

    def __init__(self, hub: Hub, peer: Peer, deflate: bool = False) -> None:
        self._hub = hub
        self._peer = peer
        self._deflate = deflate  # it negotiated permessage-deflate: compressed frames
        self._floors: dict[str | None, Offset] = {}

    def skip_until(self, offset: Offset, channel: str | None) -> None:
        """Leave out messages up to C{offset} (of C{channel}, or all): a client that saw them on a node ahead."""
        self._floors[channel] = max(offset, self._floors.get(channel, offset))

    def settled(self) -> bool:
        """Whether no message still to come could be one to skip (the log has passed every floor)."""
        last = self._hub.history.last_offset
        for key, floor in list(self._floors.items()):
            if last >= floor:
                del self._floors[key]
        return not self._floors

    def gather(self, start: int, end: int, channel: str | None) -> tuple[int, bytes]:
        """
        Frames for the connection from history indices C{start}..C{end} (of
        C{channel} only, if given), up to a piece; and where it stopped.
        """
        hub, peer, floors = self._hub, self._peer, self._floors
        history = hub.history
        picked: list[Message] = []
        size = 0
        index = start
        while index <= end and size < PIECE:
            message = history[index]
            index += 1
            if channel is not None and message.channel != channel:
                continue
            if not wants(peer, message):
                continue
            if floors and self._seen(message.offset, message.channel):
                continue
            picked.append(message)
            size += len(message.frame)
        if not picked:
            return index, b""
        if self._deflate:
            piece = deflated_join(picked)
        else:
            piece = picked[0].frame if len(picked) == 1 else b"".join(m.frame for m in picked)
        hub.stats.delivered(len(picked), len(piece))
        return index, piece

    def _seen(self, offset: Offset, channel: str | None) -> bool:
        floors = self._floors
        return (None in floors and offset <= floors[None]) or (
            channel is not None and channel in floors and offset <= floors[channel]
        )
