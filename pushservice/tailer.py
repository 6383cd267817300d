"""
The fan-out loop: the ordered log, from this node's place, to the hub.

Every node tails the log with XREAD BLOCK on a connection of its own, from
the last entry it read. It records that place in Redis (with a TTL) so the
movers never trim what it has not read while it lives. Each entry carries a
contiguous sequence number: a jump means entries were trimmed before this
node read them (it was paused past its TTL, or the log hit its hard bound), a
step back means Redis lost data (a restart without persistence, a restore, a
failover before replication). Either way the node logs it, counts it, and puts
a gap marker in the stream, which tells every connection and keeps any replay
across it from claiming to be complete.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from .config import Config
from .hub import Hub
from .ingest import IngestRules
from .logentry import BadEntry, Message, decode_entry, gap_message
from .metrics import Stats
from .mover import BLOCK_SECONDS
from .progress import Progress, Retries
from .redislink import RedisLink
from .wire import parse_offset

__all__ = ["Tailer"]

#: Entries read per XREAD.
READ_COUNT = 1000
#: At most one position write per this many seconds while reading (it only has to beat the TTL).
REPORT_EVERY = 1.0


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
        self._node_key = config.node_key_prefix + node_id
        self._node_id = node_id
        self._stopping = False
        self._seq: int | None = None  # sequence number of the last entry read
        self._reset_seen = False
        self._untold: tuple[str, int | None] | None = None  # a gap found at an entry that could not be delivered
        self._reported = 0.0
        self._refresh = LoopingCall(self._report)
        self._refresh.clock = clock
        self.last_id = b"0-0"
        self.progress = Progress(clock, "fan-out")
        self._retries = Retries(clock, self.progress)

    def stop(self) -> defer.Deferred[Any]:
        """Finish after the current step and give up this node's place (XREAD takes nothing)."""
        self._stopping = True
        if self._refresh.running:
            self._refresh.stop()
        d = self._request("DEL", self._node_key)
        d.addCallback(lambda _: self._request("SREM", self._config.nodes_key, self._node_id))
        return d.addErrback(lambda _: None)

    async def run(self, loaded: Callable[[], None]) -> None:
        """Load the history, call C{loaded}, then read and deliver until stopped."""
        if not await self._retrying(self._load_history):
            return
        self._hub.set_ready()
        self._refresh.start(min(10.0, self._config.node_ttl / 3), now=True)
        loaded()
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

    # -- this node's place ------------------------------------------------------

    def _report(self) -> defer.Deferred[Any]:
        """Write this node's place (the last sequence number read; 0 holds everything) with its TTL."""
        self._reported = self._clock.seconds()
        config = self._config
        ttl = int(config.node_ttl * 1000)
        d = self._request("SET", self._node_key, self._seq or 0, "PX", ttl)
        d.addCallback(lambda _: self._request("SADD", config.nodes_key, self._node_id))
        return d.addErrback(lambda _: None)  # Redis down: the loops say so; the TTL decides

    # -- history ------------------------------------------------------------------

    async def _load_history(self) -> None:
        """Fill the replay window from the log, newest last; find where it starts."""
        config = self._config
        self.progress.working()
        await self._link.when_up()
        await self._requests_up()
        # hold the whole log (place 0) until this node knows its place
        await self._request("SET", self._node_key, 0, "PX", int(config.node_ttl * 1000))
        await self._request("SADD", config.nodes_key, self._node_id)
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
        reply = await self._link.command(
            "XREAD", "COUNT", READ_COUNT, "BLOCK", BLOCK_SECONDS * 1000, "STREAMS", config.log_key, self.last_id
        )
        if not reply:
            self.progress.idle()
            await self._check_for_reset()
            return
        self.progress.working()
        entries = reply[0][1]
        batch = self._batch(entries)
        self.last_id = entries[-1][0]
        if self._clock.seconds() - self._reported >= REPORT_EVERY:
            self._report()
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
                marker = self._gap_before(seq, message, quiet)
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

    def _gap_before(self, seq: int, message: Message | None, quiet: bool) -> Message | None:
        """A marker if entry number C{seq} does not follow the last one read (before C{message}, if any)."""
        last, self._seq = self._seq, seq
        reset, self._reset_seen = self._reset_seen, False
        gap = self._untold
        self._untold = None
        if last is not None and (seq != last + 1 or reset):
            found: tuple[str, int | None] = (
                ("trimmed", seq - last - 1) if seq > last + 1 and not reset else ("reset", None)
            )
            if not quiet:
                self._tell_log(*found)
            # one gap not told yet and another: one marker says both
            if gap is not None and (gap[0], found[0]) == ("trimmed", "trimmed"):
                found = ("trimmed", (gap[1] or 0) + (found[1] or 0))
            elif gap is not None:
                found = ("reset", None)
            gap = found
        if gap is None:
            return None
        if message is None:
            self._untold = gap  # the entry after the gap cannot be delivered: tell before the next
            return None
        return gap_message(message.offset, gap[0], gap[1], self._framer)

    def _tell_log(self, reason: str, missed: int | None) -> None:
        self._stats.gaps[reason] += 1
        if reason == "trimmed":
            self._log.warn(
                "{n} log entries were trimmed before this node read them (it was paused or cut off longer "
                "than --node-ttl, or the log reached --log-hard-maxlen); telling every connection",
                n=missed,
            )
        else:
            self._log.warn("the log went back in time (Redis lost data); telling every connection")

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
            self._reset_seen = True
