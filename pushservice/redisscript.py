"""A Lua script run by its SHA1, sent whole only when Redis does not have it yet (after a restart)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer

__all__ = ["RedisScript"]


class RedisScript:
    """C{await script.run(request, keys, args)}: EVALSHA, then EVAL on ``NOSCRIPT``."""

    def __init__(self, source: bytes) -> None:
        self.source = source
        self.sha = hashlib.sha1(source).hexdigest()

    async def run(self, request: Callable[..., defer.Deferred[Any]], keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return await request("EVALSHA", self.sha, len(keys), *keys, *args)
        except Exception as e:
            if "NOSCRIPT" not in str(e):
                raise
        return await request("EVAL", self.source, len(keys), *keys, *args)
