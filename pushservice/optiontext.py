"""How option text is read: sizes with k/m/g, seconds, rates, lists, networks. Each raises ValueError saying what is wrong."""

from __future__ import annotations

import math
from collections.abc import Callable

from .redisurl import RedisAddress, parse_redis_url

__all__ = [
    "choice",
    "networks",
    "non_negative",
    "non_negative_int",
    "optional_redis",
    "positive_int",
    "queue_bound",
    "rate",
    "seconds",
    "size",
    "text_list",
]


def size(text: str) -> int:
    """Bytes, with an optional k/m/g suffix (powers of 1024)."""
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = {"k": 1024, "m": 1024**2, "g": 1024**3}.get(text[-1:], 1)
    value = int(float(text[:-1] if scale > 1 else text) * scale)
    if value <= 0:
        raise ValueError("must be more than 0")
    return value


def queue_bound(text: str) -> int:
    """A per-connection queue bound: above Twisted's 64 KiB pause threshold, so a full socket pauses us."""
    value = size(text)
    if value < 128 * 1024:
        raise ValueError("must be at least 128k (Twisted pauses a connection past 64 KiB queued)")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a whole number above 0")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be a whole number, 0 or more")
    return value


def seconds(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError("must be a number of seconds above 0")
    return value


def non_negative(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError("must be a number of seconds, 0 or more")
    return value


def choice(*allowed: str) -> Callable[[str], str]:
    def coerce(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return text

    return coerce


def text_list(text: str) -> tuple[str, ...]:
    return tuple(item for item in (p.strip() for p in text.replace("\n", ",").split(",")) if item)


def rate(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError("must be a number per second above 0")
    return value


def networks(text: str) -> tuple[str, ...]:
    """Comma-separated networks (CIDR), or the word `unix` for unix-socket clients."""
    import ipaddress

    items = text_list(text)
    for item in items:
        if item != "unix":
            ipaddress.ip_network(item, strict=False)  # ValueError names the bad one
    return items


def optional_redis(text: str) -> RedisAddress:
    return parse_redis_url(text)
