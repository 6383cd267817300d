"""
Tokens and channel permissions, pure (no Twisted).

A token is an HS256 JWT with claims ``sub`` (the user), ``exp``, and optional
``channels`` / ``publish``: lists of shell-style patterns (``news.*``) of
channels the holder may subscribe to / publish on, beyond the public ones.

What a pattern grants, exactly:
  - a channel named ``private:...`` only if the pattern itself starts with
    ``private:`` (so ``*`` or ``*:admin`` never grant a private channel);
  - other channels by shell-style matching (``*``, ``?``, ``[...]``);
  - broadcasts (``publish`` only) by the entry ``*`` itself.
Channel names cannot hold ``*?[]`` (see L{pushservice.wire.check_channel}), so
a name never widens a pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import jwt

__all__ = ["AuthError", "Grant", "Policy", "TokenVerifier", "normalize_origin"]

PRIVATE_PREFIX = "private:"


class AuthError(Exception):
    """A token that cannot be accepted; the message says why (never the secret)."""


@dataclass(frozen=True)
class Grant:
    """What a verified token allows."""

    user: str
    expires: float
    channels: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()


def _patterns(claims: dict[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name, [])
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise AuthError(f"claim {name!r} must be a list of strings")
    return tuple(value)


class TokenVerifier:
    """Checks HS256 tokens against one secret."""

    def __init__(self, secret: bytes, leeway: float = 0) -> None:
        if not secret:
            raise ValueError("the token secret is empty")
        self._secret = secret
        self._leeway = leeway

    @classmethod
    def from_file(cls, path: str) -> TokenVerifier:
        with open(path, "rb") as f:
            return cls(f.read().strip())

    def verify(self, token: str) -> Grant:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                leeway=self._leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError as e:
            raise AuthError(f"invalid token: {e}") from None
        user = claims["sub"]
        if not isinstance(user, str) or not user:
            raise AuthError("claim 'sub' must be a non-empty string")
        try:
            user.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape: no envelope could name it, Redis cannot store it
            raise AuthError("claim 'sub' must be valid Unicode") from None
        return Grant(user, float(claims["exp"]), _patterns(claims, "channels"), _patterns(claims, "publish"))


@dataclass(frozen=True)
class Policy:
    """Who may subscribe and publish where, given a connection's grant (or None)."""

    client_publish: str = "on"  # on | off | token

    @staticmethod
    def _granted(patterns: tuple[str, ...], channel: str) -> bool:
        if channel.startswith(PRIVATE_PREFIX):
            return any(p.startswith(PRIVATE_PREFIX) and fnmatchcase(channel, p) for p in patterns)
        return any(fnmatchcase(channel, p) for p in patterns)

    def may_subscribe(self, grant: Grant | None, channel: str) -> bool:
        if not channel.startswith(PRIVATE_PREFIX):
            return True
        return grant is not None and self._granted(grant.channels, channel)

    def may_publish(self, grant: Grant | None, channel: str | None) -> bool:
        """A broadcast (no channel) needs the entry ``*`` when a grant is needed."""
        if self.client_publish == "off":
            return False
        if self.client_publish == "on" and (channel is None or not channel.startswith(PRIVATE_PREFIX)):
            return True
        if grant is None:
            return False
        if channel is None:
            return "*" in grant.publish
        return self._granted(grant.publish, channel)


_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def normalize_origin(origin: str) -> str:
    """``https://App.example.com`` -> ``https://app.example.com:443``, as browsers' Origin is compared."""
    scheme, sep, rest = origin.strip().partition("://")
    if not sep:
        return origin.strip().lower()
    host = rest.rstrip("/").lower()
    if ":" not in host.rsplit("]", 1)[-1] and scheme.lower() in _DEFAULT_PORTS:
        host = f"{host}:{_DEFAULT_PORTS[scheme.lower()]}"
    return f"{scheme.lower()}://{host}"
