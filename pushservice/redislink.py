"""
One Redis connection that keeps itself alive: it reconnects with backoff,
asks the sentinels for the master first (``redis+sentinel://``), notices a
dead peer, and reports its state instead of logging every attempt.

A dead peer (Redis host powered off, a half-open socket) is noticed two ways:
every command has a reply deadline (txredisapi's ``replyTimeout``, which
aborts the connection when a reply is late; for a blocking command, its block
time plus the Redis timeout), and TCP keepalive probes an idle socket. Either
way the connection is dropped and made again.

txredisapi supplies the protocol (RESP, AUTH, SELECT); the connection's life
is managed here with public Twisted APIs, not with txredisapi's pool, whose
ClientService logs a line per slot per attempt.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, NamedTuple

from twisted.internet import defer, endpoints, protocol
from twisted.internet.interfaces import IReactorTime

from ._internals import encode_arguments
from .redisprotocols import command_protocol, subscriber_protocol, tune
from .redisurl import RedisAddress

__all__ = ["NotConnected", "Prefix", "RedisLink", "Unavailable", "is_connection_error"]

#: Reconnection delays: the first, the factor after each failure, the most.
FIRST_RETRY, RETRY_FACTOR, MAX_RETRY = 0.2, 2.0, 5.0


class NotConnected(Exception):
    """The link is not connected to Redis right now."""


class Unavailable(Exception):
    """Redis did not confirm a request in time (or was not connected)."""


def is_connection_error(failure: Any) -> bool:
    """Whether C{failure} says Redis is unreachable or too slow, rather than that a command was wrong."""
    import txredisapi

    return bool(
        failure.check(NotConnected, Unavailable, txredisapi.ConnectionError, defer.CancelledError, defer.TimeoutError)
    )


def _endpoint(reactor: Any, address: RedisAddress, host: str, port: int, timeout: float) -> Any:
    from twisted.internet import ssl

    if address.unix_path:
        return endpoints.UNIXClientEndpoint(reactor, address.unix_path, timeout=timeout)
    endpoint: Any = endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    if address.tls:
        trust = None
        if address.tls_ca_file:
            with open(address.tls_ca_file, "rb") as f:
                trust = ssl.Certificate.loadPEM(f.read())
        endpoint = endpoints.wrapClientTLS(ssl.optionsForClientTLS(host, trustRoot=trust), endpoint)
    return endpoint


class _ProtocolFactory(protocol.Factory):
    """
    Builds txredisapi protocols speaking bytes. The protocol calls back
    C{stopTrying}, C{connectionError} and reads C{isLazy} when AUTH or SELECT
    fails; the link keeps retrying and reports the error instead.
    """

    noisy = False
    isLazy = False  # txredisapi logs its own line when lazy; the link reports instead

    def __init__(self, link: RedisLink, reply_timeout: float | None) -> None:
        self._link = link
        self._reply_timeout = reply_timeout

    def buildProtocol(self, addr: Any) -> Any:
        address = self._link.address
        kind = subscriber_protocol() if self._link.on_message is not None else command_protocol()
        p = kind(
            charset=None,
            replyTimeout=self._reply_timeout,
            password=address.password,
            dbid=address.db,
            convertNumbers=False,
            username=address.username,
        )
        p.factory = self
        p.link = self._link
        return p

    def stopTrying(self) -> None:
        """AUTH or SELECT failed: the link retries with backoff (the password may be fixed meanwhile)."""

    def connectionError(self, why: str) -> None:
        self._link.last_error = why


class Prefix(NamedTuple):
    """The first arguments of a command sent every step (the mover's script call, XREAD), encoded once."""

    arity: int
    encoded: bytes

    @classmethod
    def of(cls, *args: Any) -> Prefix:
        return cls(len(args), encode_arguments(args))


class RedisLink:
    """
    A self-reconnecting connection to Redis. C{command} fails at once with
    L{NotConnected} while it is down; loops wait with C{when_up}.
    C{on_change(link)} is called whenever C{up} changes. With C{on_message},
    the connection is in Pub/Sub mode: each message is handed to it as
    C{on_message(channel, payload)}.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        address: RedisAddress,
        reply_timeout: float | None,
        connect_timeout: float,
        on_change: Callable[[RedisLink], None],
        on_message: Callable[[bytes, bytes], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self.on_message = on_message
        self.address = address
        self._connect_timeout = connect_timeout
        self._factory = _ProtocolFactory(self, reply_timeout)
        self._on_change = on_change
        self._protocol: Any = None
        self._waiting: list[defer.Deferred[None]] = []
        self._retry: Any = None
        self._attempt: defer.Deferred[Any] | None = None
        self._delay = FIRST_RETRY
        self._stopped = True
        self.up = False
        #: Why the last attempt failed or the connection was lost, for the log.
        self.last_error = "not connected yet"

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._stopped = False
        self._connect()

    def stop(self) -> defer.Deferred[None]:
        """Stop reconnecting, close the connection, fail whoever waits."""
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._attempt is not None:
            self._attempt.cancel()
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(NotConnected("stopped"))
        proto, self._protocol = self._protocol, None
        self._set_up(False)
        if proto is None or proto.transport is None:
            return defer.succeed(None)
        gone = proto.whenDisconnected().addCallback(lambda _: None)
        proto.transport.loseConnection()
        return gone  # type: ignore[no-any-return]

    def when_up(self) -> defer.Deferred[None]:
        """Fires once the link is connected (at once if it is); fails if it is stopped."""
        if self.up:
            return defer.succeed(None)
        if self._stopped:
            return defer.fail(NotConnected("stopped"))
        d: defer.Deferred[None] = defer.Deferred(lambda d: self._waiting.remove(d) if d in self._waiting else None)
        self._waiting.append(d)
        return d

    def command(self, *args: Any) -> defer.Deferred[Any]:
        """Send one command; its reply, or a failure (L{NotConnected} at once when down)."""
        return self._send(lambda protocol: protocol.execute_command(*args))

    def command_after(self, prefix: Prefix, *args: Any) -> defer.Deferred[Any]:
        """L{command} of C{prefix}'s arguments then C{args}, the prefix not encoded again."""
        return self._send(
            lambda protocol: protocol.send_encoded(
                b"*%d\r\n%s%s" % (prefix.arity + len(args), prefix.encoded, encode_arguments(args))
            )
        )

    def _send(self, send: Callable[[Any], defer.Deferred[Any]]) -> defer.Deferred[Any]:
        if not self.up:
            return defer.fail(NotConnected(self.last_error))
        try:
            return send(self._protocol)
        except Exception:
            return defer.fail()

    def drop(self) -> None:
        """Abort the connection (it is made again): for a reply that makes no sense."""
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.abortConnection()

    # -- connecting ----------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        if self._stopped:
            return
        self._attempt = defer.ensureDeferred(self._open())
        self._attempt.addCallbacks(self._opened, self._failed)

    async def _open(self) -> Any:
        host, port = self.address.host, self.address.port
        if self.address.sentinels:
            host, port = await self._ask_sentinels()
        endpoint = _endpoint(self._reactor, self.address, host, port, self._connect_timeout)
        proto = await endpoint.connect(self._factory)
        try:
            await proto.whenConnected().addTimeout(self._connect_timeout, self._reactor)
            if self.address.sentinels:
                role = await proto.execute_command("ROLE")
                if role[0] not in (b"master", "master"):
                    raise NotConnected(f"{host}:{port} is not the master any more")
        except BaseException:
            proto.transport.abortConnection()
            raise
        return proto

    async def _ask_sentinels(self) -> tuple[str, int]:
        import txredisapi

        why = "no sentinel answered"
        for host, port in self.address.sentinels:
            endpoint = endpoints.HostnameEndpoint(self._reactor, host, port, timeout=self._connect_timeout)
            factory = protocol.Factory.forProtocol(lambda: txredisapi.RedisProtocol(charset=None))
            try:
                proto: Any = await endpoint.connect(factory)
            except Exception as e:
                why = f"sentinel {host}:{port}: {e}"
                continue
            try:
                reply = await proto.execute_command(
                    "SENTINEL", "get-master-addr-by-name", self.address.service
                ).addTimeout(self._connect_timeout, self._reactor)
            except Exception as e:
                why = f"sentinel {host}:{port}: {e}"
                continue
            finally:
                proto.transport.loseConnection()
            if reply:
                return reply[0].decode(), int(reply[1])
            why = f"sentinel {host}:{port} knows no master {self.address.service!r}"
        raise NotConnected(why)

    def _opened(self, proto: Any) -> None:
        self._attempt = None
        if self._stopped:
            proto.transport.loseConnection()
            return
        tune(proto.transport)
        self._protocol = proto
        self._delay = FIRST_RETRY
        proto.whenDisconnected().addCallback(self._lost)
        self._set_up(True)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def _failed(self, failure: Any) -> None:
        self._attempt = None
        if self._stopped:
            return
        self.last_error = failure.getErrorMessage() or failure.type.__name__
        self._schedule()

    def _lost(self, proto: Any) -> None:
        if proto is not self._protocol:
            return
        self._protocol = None
        if not self._stopped:
            self.last_error = "connection lost"
        self._set_up(False)
        self._schedule()

    def _schedule(self) -> None:
        if self._stopped or self._retry is not None:
            return
        delay, self._delay = self._delay, min(MAX_RETRY, self._delay * RETRY_FACTOR)
        self._retry = self._reactor.callLater(delay * random.uniform(0.8, 1.2), self._connect)

    def _set_up(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            self._on_change(self)
