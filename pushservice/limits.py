"""
Rate and abuse limits, pure of sockets: a token bucket, and what one client
address may still do (L{AddressLimits}). The clock is any IReactorTime, so
tests drive them with C{task.Clock}.

A client address is the peer's IP (an IPv6 peer's /64, which one client
usually holds whole), or with C{--trusted-proxies N} the N-th
X-Forwarded-For entry from the right, the rule Autobahn's
C{trustXForwardedFor} applies; every unix-socket client is C{"unix"}.
Addresses in C{--address-limits-exempt} (by default loopback and private
networks: a reverse proxy in front would otherwise make every client one
address) are not limited, and their frame budgets are not carried over.

Every table is bounded:
  - open connections: an entry only while the address has one open;
  - handshake and frame budgets: an entry is forgotten once it would have
    refilled to its burst (then it equals no entry), swept oldest first on
    every use, so they hold the addresses of the last burst/rate seconds
    only, and at most L{MAX_REMEMBERED} (the oldest, most refilled, goes first).
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from typing import NamedTuple

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress, IReactorTime

from .config import Config

__all__ = ["MAX_REMEMBERED", "AddressLimits", "Refusal", "TokenBucket"]

#: Addresses each budget table remembers at most (~200 bytes each).
MAX_REMEMBERED = 65536
#: Retry-After for an address at its connection cap: nothing says when one of its connections closes.
_BUSY_RETRY_AFTER = 5


class TokenBucket:
    """C{rate} tokens a second, at most C{burst} saved up; starts full unless told otherwise."""

    __slots__ = ("_clock", "_rate", "_burst", "_tokens", "_at")

    def __init__(self, clock: IReactorTime, rate: float, burst: float, tokens: float | None = None) -> None:
        self._clock = clock
        self._rate = rate
        self._burst = burst
        self._tokens = burst if tokens is None else min(burst, tokens)
        self._at = clock.seconds()

    def take(self) -> bool:
        """Take one token if there is one."""
        now = self._clock.seconds()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def level(self) -> float:
        """Tokens there are now."""
        return min(self._burst, self._tokens + (self._clock.seconds() - self._at) * self._rate)


class Refusal(NamedTuple):
    """Why an address may not open one more connection now, and the seconds to say in Retry-After."""

    why: str
    retry_after: int


class _Levels:
    """Token levels by address, refilling at C{rate} up to C{burst}; a full level is not stored."""

    __slots__ = ("_clock", "_rate", "_burst", "_horizon", "_entries")

    def __init__(self, clock: IReactorTime, rate: float, burst: float) -> None:
        self._clock = clock
        self._rate = rate
        self._burst = burst
        # an entry this old has refilled to the burst whatever it held
        self._horizon = burst / rate if rate > 0 else math.inf
        #: address -> (tokens, when stored); least recently stored first
        self._entries: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def level(self, address: str) -> float:
        """The tokens C{address} has now."""
        now = self._clock.seconds()
        entries = self._entries
        cutoff = now - self._horizon
        while entries:  # OrderedDict: the oldest entry is found in O(1), unlike a dict with holes at its front
            oldest, (_, at) = next(iter(entries.items()))
            if at > cutoff:
                break
            del entries[oldest]
        entry = entries.get(address)
        if entry is None:
            return self._burst
        tokens, at = entry
        return min(self._burst, tokens + (now - at) * self._rate)

    def store(self, address: str, tokens: float) -> None:
        """C{address} has C{tokens} now."""
        entries = self._entries
        entries.pop(address, None)
        if tokens < self._burst:
            entries[address] = (tokens, self._clock.seconds())
            if len(entries) > MAX_REMEMBERED:
                entries.popitem(last=False)


class AddressLimits:
    """
    What one client address may still do: connections open at once
    (C{max_connections_per_address}), handshakes a second (a token bucket of
    C{address_handshake_rate} and C{address_handshake_burst}), and the
    client-frame budget its connections leave behind (C{client_rate},
    C{client_burst}), so that reconnecting does not refill it.
    """

    def __init__(self, clock: IReactorTime, config: Config) -> None:
        self._clock = clock
        self._trusted = config.trusted_proxies
        self._max_open = config.max_connections_per_address
        self._handshake_rate = config.address_handshake_rate
        self._handshakes = _Levels(clock, config.address_handshake_rate, config.address_handshake_burst)
        self._frame_rate = config.client_rate
        self._frame_burst = config.client_burst
        self._frames = _Levels(clock, config.client_rate, config.client_burst)
        self._open: dict[str, int] = {}
        self._exempt_names = frozenset(n for n in config.address_limits_exempt if n == "unix")
        self._exempt_networks = tuple(
            ipaddress.ip_network(n, strict=False) for n in config.address_limits_exempt if n != "unix"
        )
        self._exempt_seen: OrderedDict[str, bool] = OrderedDict()

    def exempt(self, address: str) -> bool:
        """Whether C{address} is spared the per-address limits (cached; the cache is bounded)."""
        known = self._exempt_seen.get(address)
        if known is None:
            known = address in self._exempt_names or _within(address, self._exempt_networks)
            self._exempt_seen[address] = known
            if len(self._exempt_seen) > MAX_REMEMBERED:
                self._exempt_seen.popitem(last=False)
        return known

    def address_of(self, peer: IAddress, forwarded_for: bytes | None) -> str:
        """
        The client address of a request from C{peer} with this X-Forwarded-For value.

        @param forwarded_for: the request's X-Forwarded-For (repeated fields joined by commas), or None.
        """
        if self._trusted and forwarded_for:
            entries = [e.strip(" \t") for e in forwarded_for.decode("latin-1").split(",")]
            return _normalize(entries[-self._trusted :][0])
        if isinstance(peer, IPv4Address):
            return peer.host  # already canonical: skip the parse on the handshake path
        if isinstance(peer, IPv6Address):
            return _normalize(peer.host)
        if isinstance(peer, UNIXAddress):
            return "unix"
        return type(peer).__name__

    def admit(self, address: str) -> Refusal | None:
        """
        Count one more connection of C{address}, or say why not. Every call
        takes a handshake token, refused or not.

        @return: None when admitted: call L{release} once when that connection closes.
        """
        if self.exempt(address):
            return None
        tokens = self._handshakes.level(address)
        if tokens < 1:
            wait = math.ceil((1 - tokens) / self._handshake_rate) if self._handshake_rate > 0 else 3600
            return Refusal("too many new connections from your address", max(1, wait))
        self._handshakes.store(address, tokens - 1)
        count = self._open.get(address, 0)
        if count >= self._max_open:
            return Refusal("too many open connections from your address", _BUSY_RETRY_AFTER)
        self._open[address] = count + 1
        return None

    def release(self, address: str) -> None:
        """A connection L{admit} counted (or spared) has closed."""
        count = self._open.pop(address, 0) - 1
        if count > 0:
            self._open[address] = count

    def open_connections(self, address: str) -> int:
        """Connections of C{address} admitted and not released."""
        return self._open.get(address, 0)

    def frame_bucket(self, address: str) -> TokenBucket:
        """
        The frame budget for a new connection of C{address}: what its
        connections left when they closed, refilled since; full when unknown.
        """
        tokens = None if self.exempt(address) else self._frames.level(address)
        return TokenBucket(self._clock, self._frame_rate, self._frame_burst, tokens)

    def save_frame_bucket(self, address: str, bucket: TokenBucket) -> None:
        """
        A connection of C{address} closed with C{bucket}. The lowest level
        left is kept: closing an idle connection last does not launder a
        spent budget.
        """
        if not self.exempt(address):
            self._frames.store(address, min(bucket.level(), self._frames.level(address)))

    def remembered(self) -> int:
        """Entries in the budget tables (handshakes and frames): bounded, see the module docstring."""
        return len(self._handshakes) + len(self._frames)


def _within(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    """Whether C{address} (an IP, or an IPv6 /64 as L{_normalize} writes it) lies in one of C{networks}."""
    try:
        net = ipaddress.ip_network(address, strict=False)
    except ValueError:
        return False
    return any(net.version == n.version and net.subnet_of(n) for n in networks)  # type: ignore[arg-type]


def _normalize(host: str) -> str:
    """One string per client: IPs canonical, an IPv6 address as its /64, anything else as given (bounded)."""
    if host.startswith("["):  # [v6]:port
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # v4:port
        host = host.partition(":")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]  # not an IP (a proxy's "unknown"): a key of its own, of bounded size
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
