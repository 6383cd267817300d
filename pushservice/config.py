"""
The service's configuration: a frozen value built once from the options.

Every option lives in L{OPTIONS}, once: its name, its default (as the text a
user would type), how the text is read, and its help line. L{Config}'s field
defaults are those defaults read the same way, so ``twistd pushservice
--help``, README.rst and ``Config()`` cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .optiontext import (
    choice,
    networks,
    non_negative,
    non_negative_int,
    optional_redis,
    positive_int,
    queue_bound,
    rate,
    seconds,
    size,
    text_list,
)
from .redisurl import RedisAddress, parse_redis_url

__all__ = ["FLAGS", "OPTIONS", "Config", "Option", "RedisAddress", "parse_redis_url"]


@dataclass(frozen=True)
class Option:
    """One ``--name value`` option: its default as typed, how it is read, its help line."""

    name: str
    default: str | None
    coerce: Callable[[str], Any]
    help: str

    @property
    def field(self) -> str:
        return self.name.replace("-", "_")

    def default_value(self) -> Any:
        return None if self.default is None else self.coerce(self.default)


OPTIONS: tuple[Option, ...] = (
    Option(
        "redis",
        None,
        optional_redis,
        "Redis URL: redis://[user:pass@]host:port/db, rediss://host:port/db[?ca=ca.pem] "
        "(TLS, certificate checked), unix:///path.sock?db=N or "
        "redis+sentinel://host:26379[,host:port...]/master/db (follows failovers). Unset: use 127.0.0.1:6379, "
        "starting a private redis-server there if none answers.",
    ),
    Option("queue", "messages", str, "Redis list producers LPUSH onto."),
    Option("max-message-size", "64k", size, "Largest client message; bigger ones get a too_large error unparsed."),
    Option("max-frame-size", "1m", size, "Hard limit on a client frame/message: the connection is closed with 1009."),
    Option("max-item-size", "2m", size, "Largest item producers may push; bigger ones are dead-lettered unread."),
    Option("max-json-depth", "64", positive_int, "Deepest nesting of arrays/objects accepted in items and frames."),
    Option("max-number-length", "100", positive_int, "Longest number (in characters) accepted in JSON."),
    Option("ping-interval", "25", seconds, "Seconds between WebSocket pings."),
    Option("ping-timeout", "10", seconds, "Seconds to wait for a pong before dropping the connection."),
    Option(
        "handshake-timeout", "5", seconds, "Seconds a client has to send its request head and finish the handshake."
    ),
    Option("max-connections", "25000", positive_int, "WebSocket connections per node; more get HTTP 503."),
    Option(
        "max-http-connections",
        "1024",
        positive_int,
        "Connections still sending their request head or served as plain HTTP; more are closed at once.",
    ),
    Option(
        "max-connections-per-address",
        "512",
        positive_int,
        "Connections from one client address (after --trusted-proxies); more get HTTP 429.",
    ),
    Option(
        "address-limits-exempt",
        "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7,unix",
        networks,
        "Client addresses (networks, or `unix`) the per-address limits spare: by default loopback and "
        "private networks, where your own proxies usually are. Empty: limit every address.",
    ),
    Option("address-handshake-rate", "20", rate, "Handshakes per second one client address may sustain..."),
    Option("address-handshake-burst", "100", positive_int, "...with this burst; beyond: HTTP 429."),
    Option("http-timeout", "10", seconds, "Seconds a plain HTTP connection may live (one request each)."),
    Option("sse-keepalive", "15", seconds, "Seconds between keep-alive comments on a GET /events stream."),
    Option("sse-retry", "2", seconds, "Seconds a browser waits to reconnect an event stream (each stream 1-2x this)."),
    Option("max-publish-body", "256k", size, "Largest POST /publish body; bigger ones get HTTP 413 unread."),
    Option(
        "redis-timeout", "5", seconds, "Seconds Redis has to answer before a request fails or a connection is dropped."
    ),
    Option("history", "10000", positive_int, "Recent messages each node keeps for replay (`since`) and catch-up."),
    Option("history-bytes", "8m", size, "Byte bound on the replay history."),
    Option("log-maxlen", "100000", positive_int, "Log entries kept when every live node has read them."),
    Option(
        "log-hard-maxlen",
        "1000000",
        positive_int,
        "Log entries kept at most, even when a live node lags (it then reports a gap).",
    ),
    Option("node-ttl", "60", seconds, "Seconds a node that stopped reading (paused, partitioned) still holds the log."),
    Option("dead-maxlen", "10000", positive_int, "Items kept on the dead-letter list (the newest)."),
    Option("batch", "500", positive_int, "Most items moved from the list to the log in one step."),
    Option("linger", "0", non_negative, "Seconds at least between two fan-outs: more messages per write under load."),
    Option(
        "backlog",
        "1024",
        positive_int,
        "Listen backlog for tcp/ssl/unix endpoints that set none (Twisted's 50 drops reconnect storms).",
    ),
    Option("max-subscriptions", "100", positive_int, "Channels one connection may subscribe to."),
    Option("client-rate", "50", rate, "Client frames per second allowed per connection (token bucket)..."),
    Option("client-burst", "100", positive_int, "...with this burst; a reconnect does not refill it."),
    Option(
        "slow-client-bytes",
        "256k",
        queue_bound,
        "Bytes the node queues for a connection beyond what its socket takes; past that it only keeps its place.",
    ),
    Option(
        "slow-client-seconds", "10", seconds, "Seconds a connection may take nothing before it is dropped (close 3008)."
    ),
    Option(
        "stall-timeout",
        "30",
        seconds,
        "Seconds a Redis loop may make no progress while work waits before /healthz says 503.",
    ),
    Option("shutdown-timeout", "10", seconds, "Seconds a graceful shutdown may take."),
    Option(
        "allowed-origins",
        "*",
        text_list,
        "Comma-separated browser origins allowed to connect, e.g. https://app.example.com; '*' allows all.",
    ),
    Option("token-secret-file", None, str, "File holding the HS256 secret for client JWTs (enables auth)."),
    Option(
        "client-publish",
        "on",
        choice("on", "off", "token"),
        "Client publishing: on, off, or token (only with a token whose `publish` claim grants the channel).",
    ),
    Option("auth-timeout", "5", seconds, "Seconds a client has to send its auth frame when it must or said it would."),
    Option(
        "trusted-proxies", "0", non_negative_int, "Reverse proxies in front whose X-Forwarded-For entries are trusted."
    ),
    Option(
        "workers",
        "1",
        positive_int,
        "Node processes serving the same --listen endpoints, supervised by this one (a dead one is replaced).",
    ),
    Option(
        "presence-ttl",
        "30",
        seconds,
        "Seconds a node's presence outlives it in Redis (killed with -9); refreshed every third of it.",
    ),
    Option("presence-flush", "0.5", seconds, "Seconds at most between a change in presence and its write to Redis."),
    Option("presence-max-users", "1000", positive_int, "Users listed at most in a presence reply (all are counted)."),
)

#: ``--flag`` options: (name, Config field, value when given, help).
FLAGS: tuple[tuple[str, str, bool, str], ...] = (
    (
        "require-token",
        "require_token",
        True,
        "Every connection needs a valid token (query `token=` or a first auth frame).",
    ),
    ("no-demo", "demo", False, "Do not serve the demo page at /."),
    ("no-compression", "compression", False, "Do not negotiate permessage-deflate with WebSocket clients."),
)

_BY_NAME = {option.name: option for option in OPTIONS}


def _default(name: str) -> Any:
    return field(default=_BY_NAME[name].default_value())


@dataclass(frozen=True)
class Config:
    """
    Everything the service needs to run; picklable, so a .tap can carry it.

    ``redis`` is None when no Redis was configured: the service then uses the
    one on 127.0.0.1:6379 or starts a private redis-server there.
    """

    listen: tuple[str, ...] = ("tcp:8000",)
    redis: RedisAddress | None = _default("redis")
    queue: str = _default("queue")
    max_message_size: int = _default("max-message-size")
    max_frame_size: int = _default("max-frame-size")
    max_item_size: int = _default("max-item-size")
    max_json_depth: int = _default("max-json-depth")
    max_number_length: int = _default("max-number-length")
    ping_interval: float = _default("ping-interval")
    ping_timeout: float = _default("ping-timeout")
    handshake_timeout: float = _default("handshake-timeout")
    max_connections: int = _default("max-connections")
    max_http_connections: int = _default("max-http-connections")
    max_connections_per_address: int = _default("max-connections-per-address")
    address_limits_exempt: tuple[str, ...] = _default("address-limits-exempt")
    address_handshake_rate: float = _default("address-handshake-rate")
    address_handshake_burst: int = _default("address-handshake-burst")
    http_timeout: float = _default("http-timeout")
    sse_keepalive: float = _default("sse-keepalive")
    sse_retry: float = _default("sse-retry")
    max_publish_body: int = _default("max-publish-body")
    redis_timeout: float = _default("redis-timeout")
    history: int = _default("history")
    history_bytes: int = _default("history-bytes")
    log_maxlen: int = _default("log-maxlen")
    log_hard_maxlen: int = _default("log-hard-maxlen")
    node_ttl: float = _default("node-ttl")
    dead_maxlen: int = _default("dead-maxlen")
    batch: int = _default("batch")
    linger: float = _default("linger")
    backlog: int = _default("backlog")
    max_subscriptions: int = _default("max-subscriptions")
    client_rate: float = _default("client-rate")
    client_burst: int = _default("client-burst")
    slow_client_bytes: int = _default("slow-client-bytes")
    slow_client_seconds: float = _default("slow-client-seconds")
    stall_timeout: float = _default("stall-timeout")
    shutdown_timeout: float = _default("shutdown-timeout")
    allowed_origins: tuple[str, ...] = _default("allowed-origins")
    token_secret_file: str | None = _default("token-secret-file")
    client_publish: str = _default("client-publish")
    auth_timeout: float = _default("auth-timeout")
    trusted_proxies: int = _default("trusted-proxies")
    workers: int = _default("workers")
    presence_ttl: float = _default("presence-ttl")
    presence_flush: float = _default("presence-flush")
    presence_max_users: int = _default("presence-max-users")
    require_token: bool = False
    demo: bool = True
    compression: bool = True

    @property
    def dead_key(self) -> str:
        """The dead-letter list for items that cannot be delivered."""
        return f"{self.queue}:dead"

    @property
    def log_key(self) -> str:
        """The Redis stream that orders every message of the deployment."""
        return f"{self.queue}:log"

    @property
    def seq_key(self) -> str:
        """The counter that numbers log entries contiguously (gap detection)."""
        return f"{self.queue}:seq"

    @property
    def nodes_key(self) -> str:
        """The set of node ids whose read positions hold back the log trim."""
        return f"{self.queue}:nodes"

    @property
    def node_key_prefix(self) -> str:
        """``<prefix><node id>`` holds a node's read position, with a TTL."""
        return f"{self.queue}:node:"
