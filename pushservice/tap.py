"""
``twistd pushservice``: command-line and config-file options, and makeService.

Imports nothing that installs a reactor (no txredisapi): twistd imports this
before it has chosen one.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.python import usage

from .config import Config, parse_redis_url

__all__ = ["Options", "makeService"]


def _size(text: str) -> int:
    """Bytes, with an optional k/m/g suffix (powers of 1024)."""
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = {"k": 1024, "m": 1024**2, "g": 1024**3}.get(text[-1:], 1)
    value = int(float(text[:-1] if scale > 1 else text) * scale)
    if value <= 0:
        raise ValueError("must be more than 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a whole number above 0")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be a number of seconds above 0")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be a number of seconds, 0 or more")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def coerce(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return text

    return coerce


def _list(text: str) -> tuple[str, ...]:
    return tuple(item for item in (p.strip() for p in text.replace("\n", ",").split(",")) if item)


# (long name, default, coerce, help); the Config field is the name with "_".
_PARAMETERS: list[tuple[str, str | None, Callable[[str], Any], str]] = [
    (
        "redis",
        None,
        parse_redis_url,
        "Redis URL: redis://[user:pass@]host:port/db, rediss://host:port/db[?ca=ca.pem] "
        "(TLS, certificate checked), unix:///path.sock?db=N or "
        "redis+sentinel://host:26379[,host:port...]/master/db (follows failovers). Unset: use 127.0.0.1:6379, "
        "starting a private redis-server there if none answers.",
    ),
    ("queue", "messages", str, "Redis list producers LPUSH onto."),
    ("max-message-size", "64k", _size, "Largest client message; bigger ones get a too_large error."),
    ("max-frame-size", "1m", _size, "Hard limit on a client frame/message: the connection is closed with 1009."),
    ("ping-interval", "25", _seconds, "Seconds between WebSocket pings."),
    ("ping-timeout", "10", _seconds, "Seconds to wait for a pong before dropping the connection."),
    ("handshake-timeout", "5", _seconds, "Seconds a client has to finish the WebSocket handshake."),
    ("max-connections", "25000", _positive_int, "WebSocket connections per node; more get HTTP 503."),
    ("redis-timeout", "5", _seconds, "Seconds Redis has to confirm a client publish before `unavailable`."),
    ("history", "1000", _positive_int, "Recent messages each node keeps for replay (`since`)."),
    ("history-bytes", "8m", _size, "Byte bound on the replay history."),
    ("log-maxlen", "100000", _positive_int, "Approximate length the Redis stream (the ordered log) is trimmed to."),
    ("batch", "500", _positive_int, "Most items moved from the list to the log in one step."),
    ("linger", "0", _non_negative, "Seconds at least between two fan-outs: more messages per write under load."),
    (
        "backlog",
        "1024",
        _positive_int,
        "Listen backlog for tcp/ssl/unix endpoints that set none (Twisted's 50 drops reconnect storms).",
    ),
    ("max-subscriptions", "100", _positive_int, "Channels one connection may subscribe to."),
    ("client-rate", "50", _seconds, "Client frames per second allowed per connection (token bucket)."),
    ("client-burst", "100", _positive_int, "Burst size of that token bucket."),
    (
        "slow-client-bytes",
        "1m",
        _size,
        "Bytes queued for a client that is not reading before it is dropped (close 3008).",
    ),
    ("slow-client-seconds", "10", _seconds, "Seconds a client may stay unable to take data before it is dropped."),
    ("shutdown-timeout", "10", _seconds, "Seconds a graceful shutdown may take."),
    (
        "allowed-origins",
        "*",
        _list,
        "Comma-separated browser origins allowed to connect, e.g. https://app.example.com; '*' allows all.",
    ),
    ("token-secret-file", None, str, "File holding the HS256 secret for client JWTs (enables auth)."),
    (
        "client-publish",
        "on",
        _choice("on", "off", "token"),
        "Client publishing: on, off, or token (only with a token whose `publish` claim grants the channel).",
    ),
    ("auth-timeout", "5", _seconds, "Seconds a client has to send its auth frame when tokens are required."),
    ("trusted-proxies", "0", int, "Number of reverse proxies whose X-Forwarded-For is trusted for client addresses."),
]
_FLAGS = [
    ("require-token", "Every connection needs a valid token (query `token=` or a first auth frame)."),
    ("no-demo", "Do not serve the demo page at /."),
]


class Options(usage.Options):
    """Options of ``twistd pushservice``; ``--config FILE`` supplies defaults."""

    synopsis = "[options]"
    longdesc = (
        "Serve WebSocket clients and push them what backends LPUSH onto a Redis list. "
        "Every option can also come from an INI file given with --config (a [pushservice] "
        "section, names as the long options); the command line wins."
    )
    optParameters = [[name, None, default, doc] for name, default, _, doc in _PARAMETERS] + [
        ["config", "c", None, "INI file with a [pushservice] section of option = value lines."],
    ]
    optFlags = [[name, None, doc] for name, doc in _FLAGS]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self.config: Config | None = None

    def opt_listen(self, endpoint: str) -> None:
        """Twisted endpoint to listen on, repeatable (default tcp:8000)."""
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        args = list(options) if options is not None else __import__("sys").argv[1:]
        path = _find_config(args)
        if path is not None:
            from_file = _read_config(path)
            if any(a in ("-l", "--listen") or a.startswith("--listen=") for a in args):
                from_file = [a for a in from_file if not a.startswith("--listen=")]
            args = from_file + args
        super().parseOptions(args)

    def postOptions(self) -> None:
        values: dict[str, Any] = {}
        for name, _, coerce, _ in _PARAMETERS:
            raw = self[name]
            if raw is None:
                continue
            try:
                values[name.replace("-", "_")] = coerce(raw) if isinstance(raw, str) else raw
            except ValueError as e:
                raise usage.UsageError(f"--{name}={raw!r}: {e}") from None
        listen = tuple(self["listen"]) or ("tcp:8000",)
        for endpoint in listen:
            _check_endpoint(endpoint)
        secret = values.get("token_secret_file")
        if secret is not None and not os.access(secret, os.R_OK):
            raise usage.UsageError(f"--token-secret-file: cannot read {secret!r}")
        if self["require-token"] and secret is None:
            raise usage.UsageError("--require-token needs --token-secret-file")
        if values.get("client_publish") == "token" and secret is None:
            raise usage.UsageError("--client-publish=token needs --token-secret-file")
        if values["max_message_size"] > values["max_frame_size"]:
            raise usage.UsageError("--max-message-size must not exceed --max-frame-size")
        if not values["queue"]:
            raise usage.UsageError("--queue must not be empty")
        self.config = Config(
            listen=listen,
            require_token=bool(self["require-token"]),
            demo=not self["no-demo"],
            **values,
        )


def _find_config(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _read_config(path: str) -> list[str]:
    """The [pushservice] section of an INI file, as command-line arguments."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, configparser.Error) as e:
        raise usage.UsageError(f"--config {path}: {e}") from None
    if not parser.has_section("pushservice"):
        raise usage.UsageError(f"--config {path}: no [pushservice] section")
    params = {name for name, *_ in _PARAMETERS} | {"listen"}
    flags = {name for name, _ in _FLAGS}
    args = []
    for name, value in parser.items("pushservice"):
        if name == "listen":
            args += [f"--listen={v}" for v in value.split() if v]
        elif name in params:
            args.append(f"--{name}={value}")
        elif name in flags:
            if value.strip().lower() in ("1", "yes", "true", "on"):
                args.append(f"--{name}")
            elif value.strip().lower() not in ("0", "no", "false", "off"):
                raise usage.UsageError(f"--config {path}: {name} must be yes or no, not {value!r}")
        else:
            raise usage.UsageError(f"--config {path}: unknown option {name!r}")
    return args


def _check_endpoint(description: str) -> None:
    """Reject an endpoint string Twisted cannot parse, before twistd daemonizes."""
    from twisted.internet import endpoints

    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "unix", "ssl", "systemd", "haproxy", "tls"):
        try:
            _, parsed_args, _ = endpoints._parseServer(description, None)  # type: ignore[attr-defined]
        except Exception as e:
            raise usage.UsageError(f"--listen {description!r}: {e}") from None
        if kind in ("tcp", "tcp6") and not (parsed_args and str(parsed_args[0]).isdigit()):
            raise usage.UsageError(f"--listen {description!r}: the port must be a number, as in tcp:8000")
        return
    raise usage.UsageError(
        f"--listen {description!r}: not a Twisted endpoint (try tcp:8000, "
        "ssl:8443:privateKey=key.pem, unix:/run/pushservice.sock or systemd:domain=INET6:index=0)"
    )


def makeService(options: Options):  # type: ignore[no-untyped-def]
    """Build the service from parsed options (twistd calls this)."""
    from .service import PushService

    assert options.config is not None
    return PushService(options.config)
