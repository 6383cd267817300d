"""txredisapi's Pub/Sub protocol, for a L{pushservice.redislink.RedisLink} made with C{on_message}."""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["subscriber_protocol"]


@functools.cache
def subscriber_protocol() -> Any:
    """A protocol class handing each Pub/Sub message to its link's C{on_message(channel, payload)}."""
    import txredisapi

    class Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]
        link: Any  # set by the link's factory

        def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
            self.link.on_message(channel, message)

    return Subscriber
