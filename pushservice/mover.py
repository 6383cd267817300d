"""
The ingest loop: producers' items, from the list to the ordered log.

Every node runs one. It waits with ``BLMOVE Q Q RIGHT RIGHT``, which takes
nothing (the tail item goes back where it was) and hands the node the oldest
item; the node decides what it is (L{pushservice.ingest}), then runs
step.lua, which pops the items it decided, in order, into the log or the
dead-letter list, trims the log and peeks at the next items to decide. So an
item is decided once, by one node, and is always either on the list, in the
log or on the dead-letter list, whatever node dies when.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .config import Config
from .ingest import Entry, IngestRules, Undeliverable
from .metrics import Stats
from .progress import Progress, Retries
from .redislink import Prefix, RedisLink

__all__ = ["BLOCK_SECONDS", "Mover"]

#: How long one BLMOVE / XREAD waits in Redis; the reply deadline is this plus --redis-timeout.
BLOCK_SECONDS = 5
#: Bytes of items peeked (and sent back decided) per step, beyond the first item.
PEEK_BYTES = 1024 * 1024

_SCRIPT = resources.files("pushservice").joinpath("step.lua").read_bytes()
_SHA = hashlib.sha1(_SCRIPT).hexdigest()


def _decision(item: bytes, decided: Entry | Undeliverable) -> tuple[bytes, bytes, str, str, str]:
    """The five script arguments for one decided item."""
    if isinstance(decided, Undeliverable):
        return item, b"", "", "", decided.reason
    return item, decided.content, decided.channel or "", decided.user or "", ""


class Mover:
    """Moves producers' items from the list to the log, deciding each once."""

    _log = Logger()

    def __init__(self, clock: IReactorTime, link: RedisLink, config: Config, rules: IngestRules, stats: Stats) -> None:
        self._clock = clock
        self._link = link
        self._config = config
        self._rules = rules
        self._stats = stats
        self._stopping = False
        self.progress = Progress(clock, "ingest")
        #: The script's keys and first arguments, the same every step.
        self._constant_args = (
            5,
            config.queue,
            config.log_key,
            config.dead_key,
            config.seq_key,
            config.nodes_key,
            config.max_item_size,
            config.batch,
            PEEK_BYTES,
            config.log_maxlen,
            config.log_hard_maxlen,
            config.dead_maxlen,
            config.node_key_prefix,
        )
        self._constant = Prefix.of("EVALSHA", _SHA, *self._constant_args)
        self._retries = Retries(clock, self.progress)

    def stop(self) -> None:
        """Finish after the current step (BLMOVE takes nothing, so stopping loses nothing)."""
        self._stopping = True

    async def run(self) -> None:
        config = self._config
        peeked: list[bytes | None] = []
        while not self._stopping:
            try:
                if not peeked:
                    self.progress.blocked()
                    await self._link.when_up()
                    tail = await self._link.command(
                        "BLMOVE", config.queue, config.queue, "RIGHT", "RIGHT", BLOCK_SECONDS
                    )
                    if tail is None:
                        self.progress.idle()
                        continue
                    peeked = [tail]
                    woken = True
                else:
                    woken = False
                self.progress.working()
                # woken with one item: if more wait (a burst), peek them first and move them as one batch
                peeked = await self._step(peeked, hold=woken)
                self.progress.stepped()
                self._retries.succeeded()
            except Exception:
                from twisted.python.failure import Failure

                failure = Failure()
                peeked = []
                if not self._stopping:
                    await self._retries.after(failure)

    async def _step(self, peeked: list[bytes | None], hold: bool = False) -> list[bytes | None]:
        """Decide the peeked items, run the script; the next items to decide."""
        import txredisapi

        config = self._config
        decided: dict[bytes, tuple[bytes, bytes, str, str, str]] = {}
        for item in peeked:
            # None: peeked but over the size limit, which the script decides by length alone
            if item is not None and len(item) <= config.max_item_size and item not in decided:
                decided[item] = _decision(item, self._decide(item))
        args: list[Any] = [1 if hold else 0, len(decided)]
        for arguments in decided.values():
            args.extend(arguments)
        try:
            reply = await self._link.command_after(self._constant, *args)
        except txredisapi.ResponseError as e:
            if "NOSCRIPT" not in str(e):
                raise
            reply = await self._link.command("EVAL", _SCRIPT, *self._constant_args, *args)
        moved, dead, next_items, _ = reply
        self._stats.messages_moved += int(moved)
        for reason in dead:
            self._stats.dead_letters += 1
            self._log.warn("moved an item to {dead}: {reason}", dead=config.dead_key, reason=reason.decode())
        return list(next_items)

    def _decide(self, item: bytes) -> Entry | Undeliverable:
        """The rules' decision; an error in them dead-letters the item rather than stopping the loop."""
        try:
            return self._rules.classify(item)
        except Exception:
            self._log.failure("could not decide an item; dead-lettering it")
            return Undeliverable("internal error while deciding (see the node's log)")
