"""
The fan-out loop: the ordered log, from this node's place, to the hub.

Every node tails the log with XREAD BLOCK on a connection of its own, from
the last entry it read, and keeps that place in Redis (L{pushservice.place})
so the movers never trim what it has not read while it lives. The entries'
sequence numbers say when something is missing (L{pushservice.continuity}):
a gap marker then goes into the stream before the next message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from .config import Config
from .continuity import Continuity
from .hub import Hub
from .ingest import IngestRules
from .logentry import BadEntry, Message, decode_entry
from .metrics import Stats
from .mover import BLOCK_SECONDS
from .place import Place
from .progress import Progress, Retries
from .redislink import Prefix, RedisLink
from .wire import parse_offset

__all__ = ["Tailer"]

#: Entries read per XREAD.
READ_COUNT = 1000


class Tailer:
    """Reads the log from this node's place, finds gaps, hands batches to the hub."""

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        link: RedisLink,
        request: Callable[..., defer.Deferred[Any]],
        requests_up: Callable[[], defer.Deferred[None]],
        config: Config,
        hub: Hub,
        stats: Stats,
        framer: Callable[[bytes], bytes],
        rules: IngestRules,
        node_id: str,
    ) -> None:
        self._clock = clock
        self._link = link
        self._request = request
        self._requests_up = requests_up
        self._config = config
        self._hub = hub
        self._stats = stats
        self._framer = framer
        self._rules = rules
        self._stopping = False
        self._continuity = Continuity(stats, framer)
        self._place = Place(clock, request, config, node_id, lambda: self._continuity.last)
        self.last_id = b"0-0"
        #: XREAD's arguments before the last ID read, the same every step: encoded once.
        self._xread = Prefix.of("XREAD", "COUNT", READ_COUNT, "BLOCK", BLOCK_SECONDS * 1000, "STREAMS", config.log_key)
        self.progress = Progress(clock, "fan-out")
        self._retries = Retries(clock, self.progress)

    def stop(self) -> defer.Deferred[Any]:
        """Finish after the current step and give up this node's place (XREAD takes nothing)."""
        self._stopping = True
        return self._place.give_up()

    async def run(self, loaded: Callable[[], None]) -> None:
        """Load the history, call C{loaded}, then read and deliver until stopped."""
        if not await self._retrying(self._load_history):
            return
        loaded()  # first: a node ready for replays is moving items too (what /healthz checks)
        self._hub.set_ready()
        self._place.keep_fresh()
        while not self._stopping:
            await self._retrying(self._step)

    async def _retrying(self, step: Callable[[], Any]) -> bool:
        """Run C{step} until it succeeds (True) or the node stops (False)."""
        while not self._stopping:
            try:
                await step()
                self._retries.succeeded()
                return True
            except Exception:
                from twisted.python.failure import Failure

                failure = Failure()
                if self._stopping:
                    break
                await self._retries.after(failure)
        return False

    # -- history ------------------------------------------------------------------

    async def _load_history(self) -> None:
        """Fill the replay window from the log, newest last; find where it starts."""
        config = self._config
        self.progress.working()
        await self._link.when_up()
        await self._requests_up()
        await self._place.hold_everything()
        entries = await self._link.command("XREVRANGE", config.log_key, "+", "-", "COUNT", config.history + 1)
        deleted = b"0-0"
        if len(entries) > config.history:
            deleted = entries.pop()[0]
        elif entries:
            info = await self._link.command("XINFO", "STREAM", config.log_key)
            deleted = dict(zip(info[::2], info[1::2])).get(b"max-deleted-entry-id", b"0-0")
        history = self._hub.history
        history.horizon = parse_offset(deleted.decode())
        for message in self._batch(list(reversed(entries)), quiet=True):
            history.append(message)
        if entries:
            self.last_id = entries[0][0]
        self.progress.stepped()
        self._log.info(
            "history: {n} messages from {key}, reading on after {last}",
            n=len(history),
            key=config.log_key,
            last=self.last_id.decode(),
        )

    # -- reading --------------------------------------------------------------------

    async def _step(self) -> None:
        config = self._config
        self.progress.blocked()
        await self._link.when_up()
        reply = await self._link.command_after(self._xread, self.last_id)
        if not reply:
            self.progress.idle()
            await self._check_for_reset()
            return
        self.progress.working()
        entries = reply[0][1]
        batch = self._batch(entries)
        self.last_id = entries[-1][0]
        self._place.moved()
        started = self._clock.seconds()
        if batch:
            self._stats.messages_in += len(batch)
            self._stats.last_offset_ms = batch[-1].offset[0]
            written = self._hub.deliver(batch)
            if written is not None:
                # what arrives meanwhile waits in Redis and comes as one batch
                await written
        self.progress.stepped()
        rest = config.linger - (self._clock.seconds() - started)
        if rest > 0:
            # at most one fan-out per linger: each costs a send per connection
            await deferLater(self._clock, rest, lambda: None)

    def _batch(self, entries: list[Any], quiet: bool = False) -> list[Message]:
        """Decode entries, with a gap marker before any that does not follow the last one read."""
        batch: list[Message] = []
        for entry_id, fields in entries:
            message, seq = self._decode(entry_id, fields)
            if seq is not None:
                marker = self._continuity.marker(seq, message, quiet)
                if marker is not None:
                    batch.append(marker)
            if message is not None:
                batch.append(message)
        return batch

    def _decode(self, entry_id: bytes, fields: list[bytes]) -> tuple[Message | None, int | None]:
        """The entry's message (None, with a log line and a metric, if it cannot be delivered) and its number."""
        try:
            message = decode_entry(entry_id, fields, self._framer, self._rules)
        except BadEntry as e:
            self._stats.skipped_entries += 1
            self._log.warn("skipped log entry {id}: {why}", id=entry_id.decode(errors="replace"), why=e)
            return None, e.seq
        except Exception:
            self._stats.skipped_entries += 1
            self._log.failure("skipped log entry {id}", id=entry_id.decode(errors="replace"))
            return None, None
        return message, message.seq

    async def _check_for_reset(self) -> None:
        """Idle: if the log now ends before this node's place, Redis lost data; read on from its end."""
        try:
            info = await self._link.command("XINFO", "STREAM", self._config.log_key)
        except Exception as e:
            if "no such key" in str(e).lower():
                return  # nothing written yet, or it is gone: new entries will show the reset
            raise
        last = dict(zip(info[::2], info[1::2])).get(b"last-generated-id")
        if last is not None and parse_offset(last.decode()) < parse_offset(self.last_id.decode()):
            self._log.warn(
                "the log ends at {last}, before this node's place {mine}",
                last=last.decode(),
                mine=self.last_id.decode(),
            )
            self.last_id = last
            self._continuity.went_back()
