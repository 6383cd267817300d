"""
``twistd pushservice``: command-line and config-file options, and makeService.

Imports nothing that installs a reactor (no txredisapi): twistd imports this
before it has chosen one.
"""

from __future__ import annotations

import configparser
from collections.abc import Sequence
from typing import Any

from twisted.python import usage

from .config import FLAGS, OPTIONS, Config

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    """Options of ``twistd pushservice``; ``--config FILE`` supplies defaults."""

    synopsis = "[options]"
    longdesc = (
        "Serve WebSocket clients and push them what backends LPUSH onto a Redis list. "
        "Every option can also come from an INI file given with --config (a [pushservice] "
        "section, names as the long options); the command line wins."
    )
    optParameters = [[o.name, None, o.default, o.help] for o in OPTIONS] + [
        ["config", "c", None, "INI file with a [pushservice] section of option = value lines."],
    ]
    optFlags = [[name, None, doc] for name, _, _, doc in FLAGS]

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
        for option in OPTIONS:
            raw = self[option.name]
            if raw is None:
                continue
            try:
                values[option.field] = option.coerce(raw) if isinstance(raw, str) else raw
            except ValueError as e:
                raise usage.UsageError(f"--{option.name}={raw!r}: {e}") from None
        for name, field, given, _ in FLAGS:
            values[field] = given if self[name] else not given
        listen = tuple(self["listen"]) or ("tcp:8000",)
        if values["workers"] > 1:  # before parsing: parsing an ssl: endpoint already reads its files
            from .listeners import unshareable

            for endpoint in listen:
                why = unshareable(endpoint)
                if why is not None:
                    raise usage.UsageError(f"--listen {endpoint!r}: {why}")
        for endpoint in listen:
            _check_endpoint(endpoint)
        secret = values.get("token_secret_file")
        if values["require_token"] and secret is None:
            raise usage.UsageError("--require-token needs --token-secret-file")
        if values.get("client_publish") == "token" and secret is None:
            raise usage.UsageError("--client-publish=token needs --token-secret-file")
        if values["max_message_size"] > values["max_frame_size"]:
            raise usage.UsageError("--max-message-size must not exceed --max-frame-size")
        if values["log_hard_maxlen"] < values["log_maxlen"]:
            raise usage.UsageError("--log-hard-maxlen must not be under --log-maxlen")
        if not values["queue"]:
            raise usage.UsageError("--queue must not be empty")
        if secret is not None:
            _check_secret(secret)
        self.config = Config(listen=listen, **values)


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
    params = {o.name for o in OPTIONS} | {"listen"}
    flags = {name for name, *_ in FLAGS}
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
    from ._internals import parse_server_endpoint

    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "unix", "ssl", "systemd", "haproxy", "tls"):
        try:
            _, parsed_args, _ = parse_server_endpoint(description)
        except Exception as e:
            raise usage.UsageError(f"--listen {description!r}: {e}") from None
        if kind in ("tcp", "tcp6") and not (parsed_args and str(parsed_args[0]).isdigit()):
            raise usage.UsageError(f"--listen {description!r}: the port must be a number, as in tcp:8000")
        return
    raise usage.UsageError(
        f"--listen {description!r}: not a Twisted endpoint (try tcp:8000, "
        "ssl:8443:privateKey=key.pem, unix:/run/pushservice.sock or systemd:domain=INET6:index=0)"
    )


def _check_secret(path: str) -> None:
    """An unreadable or empty secret is a start-up error with a message, not a traceback later."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise usage.UsageError(f"--token-secret-file: cannot read {path!r}: {e.strerror}") from None
    if not secret:
        raise usage.UsageError(f"--token-secret-file: {path!r} is empty; put a long random secret in it")


def makeService(options: Options):  # type: ignore[no-untyped-def]
    """Build the service from parsed options (twistd calls this): the node, or with --workers > 1 their parent."""
    assert options.config is not None
    from twisted.internet import reactor

    from .gctune import tune

    tune(reactor)
    if options.config.workers > 1:
        from .workers import WorkerPool

        return WorkerPool(options.config)
    from .service import PushService

    return PushService(options.config)
