"""What a connection's session is given (the node it lives on, what its URL asked for, its connection) and its states."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime

from .auth import Policy
from .bus import Bus
from .config import Config
from .hub import Hub
from .metrics import Stats
from .outbox import Sink
from .presence import Presence
from .strictjson import JSONRules
from .wire import Offset

__all__ = ["Connection", "Node", "Query", "State"]


class Connection(Sink, Protocol):
    """What a session needs of its connection, beyond writing."""

    def close(self, code: int, reason: str) -> None:
        """Close with a WebSocket close code."""


@dataclass(frozen=True)
class Node:
    """What every session of this node shares."""

    clock: IReactorTime
    config: Config
    hub: Hub
    bus: Bus
    stats: Stats
    policy: Policy
    rules: JSONRules
    verify: Any  # (token: str) -> Grant, raising AuthError
    presence: Presence | None = None  # None: presence is not served (tests of the session alone)


@dataclass(frozen=True)
class Query:
    """What the connect URL asked for."""

    channels: tuple[str, ...] = ()
    since: Offset | None = None
    auth_frame: bool = False


class State(enum.Enum):
    """Where a session is in its life (see pushservice.session)."""

    AUTHENTICATING = "authenticating"
    JOINING = "joining"
    JOINED = "joined"
    CLOSED = "closed"
