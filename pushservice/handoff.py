"""
What the parent of ``--workers N`` hands each worker, and how: one JSON
document written to the worker's stdin (never its command line or
environment, which other users of the machine can read), read to its end
before the worker imports a reactor.

It holds the Config (with the Redis the parent resolved), the token secret
and the TLS keys the parent read before twistd dropped privileges, and one
L{Socket} per --listen endpoint: a listening socket the parent bound, passed
as a file descriptor of the worker (pure, no Twisted).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .config import Config, RedisAddress

__all__ = ["FIRST_SOCKET_FD", "LOG_FD", "Handoff", "Socket", "TLSMaterial"]

#: The worker's fd its log events go out on (one JSON event a line); 0-2 are stdin, stdout, stderr.
LOG_FD = 3
#: The worker's fd of the first listening socket; the others follow in --listen order.
FIRST_SOCKET_FD = 4


@dataclass(frozen=True)
class TLSMaterial:
    """An ssl: endpoint's key and certificates, PEM, as the parent read them."""

    key: str
    certificate: str
    chain: tuple[str, ...] = ()


@dataclass(frozen=True)
class Socket:
    """A listening socket the worker finds at file descriptor C{fd}."""

    fd: int
    family: int
    description: str
    tls: TLSMaterial | None = None
    haproxy: bool = False


@dataclass(frozen=True)
class Handoff:
    """Everything a worker needs to run one node."""

    number: int
    parent_pid: int
    reactor: str
    config: Config
    sockets: tuple[Socket, ...]
    token_secret: bytes | None = None
    #: how many workers the parent runs (the worker's own config says 1: it is one node)
    workers: int = 1

    def to_json(self) -> bytes:
        document = {
            "number": self.number,
            "parent_pid": self.parent_pid,
            "reactor": self.reactor,
            "config": dataclasses.asdict(self.config),
            "sockets": [dataclasses.asdict(s) for s in self.sockets],
            "token_secret": None if self.token_secret is None else base64.b64encode(self.token_secret).decode(),
            "workers": self.workers,
        }
        return json.dumps(document, allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Handoff:
        """@raise ValueError: C{data} is not a handoff document."""
        try:
            doc = json.loads(data)
            secret = doc["token_secret"]
            return cls(
                number=int(doc["number"]),
                parent_pid=int(doc["parent_pid"]),
                reactor=str(doc["reactor"]),
                config=_config(doc["config"]),
                sockets=tuple(_socket(s) for s in doc["sockets"]),
                token_secret=None if secret is None else base64.b64decode(secret),
                workers=int(doc["workers"]),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a worker handoff: {e!r}") from None


def _tuples(value: Any) -> Any:
    """JSON arrays back into the tuples the frozen values hold."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _config(fields: dict[str, Any]) -> Config:
    values = {name: _tuples(value) for name, value in fields.items()}
    if values.get("redis") is not None:
        values["redis"] = RedisAddress(**{name: _tuples(value) for name, value in values["redis"].items()})
    return Config(**values)


def _socket(fields: dict[str, Any]) -> Socket:
    values = {name: _tuples(value) for name, value in fields.items()}
    if values.get("tls") is not None:
        values["tls"] = TLSMaterial(**{name: _tuples(value) for name, value in values["tls"].items()})
    return Socket(**values)
