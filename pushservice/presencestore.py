"""
Presence in Redis: this node's L{PresenceBook} written in aggregate, and
every node's read back.

Keys, for a queue named Q (a node id is 12 hex digits):
    Q:presence:<channel>:<node>   a hash: ``u:<user>`` -> connections, ``a`` -> anonymous
                                  connections, ``v`` -> the node's flush number when it last
                                  wrote it; expires after --presence-ttl unless refreshed
    Q:presence:<channel>:nodes    a set: the nodes that wrote a hash for the channel
    Q:presence-alive:<node>       exists while the node runs (same TTL)
    Q:presence-events             Pub/Sub: every flush's join/leave flips, as JSON

Traffic is per flush and per channel, never per connection: changes are
written at most every --presence-flush seconds, one script call of at most
L{FLUSH_FIELDS} fields (the next one as soon as it returns when more are
waiting), and a heartbeat every --presence-ttl / 3 refreshes the TTLs of the
channels this node has anyone on, L{BEAT_CHANNELS} per call. A node killed
with -9 stops refreshing: its hashes expire within --presence-ttl.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .presencebook import ChannelChanges, PresenceBook
from .redisscript import RedisScript

__all__ = ["BEAT_CHANNELS", "FLUSH_FIELDS", "PresenceKeys", "PresenceStore", "Snapshot"]

#: Most user and anonymous fields written by one flush (one script call).
FLUSH_FIELDS = 2000
#: Most channels one heartbeat call refreshes.
BEAT_CHANNELS = 1000

# ARGV: node, version, ttl ms, prefix, events channel, event payload ('' for none), alive key,
# then per channel: name, n, then n pairs of field, count (0: delete)
_FLUSH = RedisScript(b"""
local node, version, ttl, prefix = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
redis.call('SET', ARGV[7], '1', 'PX', ttl)
local i = 8
while i <= #ARGV do
  local channel, n = ARGV[i], tonumber(ARGV[i + 1])
  local key, index = prefix .. channel .. ':' .. node, prefix .. channel .. ':nodes'
  for j = i + 2, i + 2 * n, 2 do
    if ARGV[j + 1] == '0' then redis.call('HDEL', key, ARGV[j]) else redis.call('HSET', key, ARGV[j], ARGV[j + 1]) end
  end
  i = i + 2 + 2 * n
  redis.call('HSET', key, 'v', version)
  redis.call('PEXPIRE', key, ttl)
  redis.call('SADD', index, node)
  if redis.call('PTTL', index) < ttl then redis.call('PEXPIRE', index, ttl) end
end
if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return 1
""")

# ARGV: node, ttl ms, prefix, alive key, channels...; returns the channels whose hash was gone
_BEAT = RedisScript(b"""
local node, ttl, prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3]
redis.call('SET', ARGV[4], '1', 'PX', ttl)
local lost = {}
for i = 5, #ARGV do
  local key, index = prefix .. ARGV[i] .. ':' .. node, prefix .. ARGV[i] .. ':nodes'
  if redis.call('PEXPIRE', key, ttl) == 0 then lost[#lost + 1] = ARGV[i] end
  redis.call('SADD', index, node)
  if redis.call('PTTL', index) < ttl then redis.call('PEXPIRE', index, ttl) end
end
return lost
""")

# KEYS[1]: the channel's index; ARGV: hash prefix (Q:presence:<channel>:), most users listed.
# Returns {distinct users, anonymous connections, up to ARGV[2] users}.
_QUERY = RedisScript(b"""
local most, seen, users, count, anonymous = tonumber(ARGV[2]), {}, {}, 0, 0
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local fields = redis.call('HGETALL', ARGV[1] .. node)
  if #fields == 0 then redis.call('SREM', KEYS[1], node) end
  for i = 1, #fields, 2 do
    local name = fields[i]
    if name == 'a' then
      anonymous = anonymous + tonumber(fields[i + 1])
    elseif string.sub(name, 1, 2) == 'u:' and not seen[name] then
      seen[name] = true
      count = count + 1
      if #users < most then users[#users + 1] = string.sub(name, 3) end
    end
  end
end
return {count, anonymous, users}
""")

# KEYS[1]: the channel's index; ARGV[1]: hash prefix. Returns {node, version, {users}, ...}.
_SNAPSHOT = RedisScript(b"""
local out = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local fields = redis.call('HGETALL', ARGV[1] .. node)
  local users, version = {}, '0'
  for i = 1, #fields, 2 do
    if fields[i] == 'v' then version = fields[i + 1]
    elseif string.sub(fields[i], 1, 2) == 'u:' then users[#users + 1] = string.sub(fields[i], 3) end
  end
  if #fields > 0 then out[#out + 1] = node; out[#out + 1] = version; out[#out + 1] = users end
end
return out
""")

#: A channel's users per node, with the version of each: {node: (version, users)}.
Snapshot = dict[str, tuple[int, set[str]]]


class PresenceKeys:
    """The Redis names of presence for one queue."""

    def __init__(self, queue: str) -> None:
        self.prefix = f"{queue}:presence:"
        self.events = f"{queue}:presence-events"
        self.alive_prefix = f"{queue}:presence-alive:"

    def index(self, channel: str) -> str:
        return f"{self.prefix}{channel}:nodes"

    def channel_prefix(self, channel: str) -> str:
        return f"{self.prefix}{channel}:"


class PresenceStore:
    """Writes this node's book to Redis (flushes, heartbeats) and reads every node's."""

    _log = Logger()

    def __init__(
        self, clock: IReactorTime, request: Any, keys: PresenceKeys, node_id: str, ttl: float, flush_every: float
    ) -> None:
        """@param request: C{(*command) -> Deferred}, the node's request connection (ordered)."""
        self.book = PresenceBook(self.changed)
        self._clock = clock
        self._request = request
        self._keys = keys
        self.node_id = node_id
        self._ttl_ms = max(1, int(ttl * 1000))
        self._flush_every = flush_every
        self._version = 0
        self._lock = defer.DeferredLock()
        self._timer: Any = None
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = clock
        self._beat_every = ttl / 3
        self._stopped = False
        self._failing = False

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._beat.start(self._beat_every, now=True)

    def stop(self) -> defer.Deferred[None]:
        """Write what is left (every connection has gone by now), and say this node is gone."""
        if self._beat.running:
            self._beat.stop()
        return defer.ensureDeferred(self._final())

    async def _final(self) -> None:
        self._stopped = True
        # every connection is closing (Autobahn calls their onClose a little later): they all leave now
        self.book.leave_all()
        try:
            await self.flush()
            await self._request("DEL", self._keys.alive_prefix + self.node_id)
        except Exception:  # Redis down: the TTL decides
            pass

    # -- writing -------------------------------------------------------------

    def changed(self) -> None:
        """The book changed: flush within --presence-flush."""
        if self._timer is None and not self._stopped:
            self._timer = self._clock.callLater(self._flush_every, self._flush_later)

    def _flush_later(self) -> None:
        self._timer = None

        def written(_: object) -> None:
            self._failing = False

        def failed(failure: Any) -> None:
            if not self._failing:  # one line per outage, not one per attempt
                self._failing = True
                self._log.warn("cannot write presence to Redis ({why}); retrying", why=failure.getErrorMessage())
            self.changed()  # what was not written is kept

        self.flush().addCallbacks(written, failed)

    def flush(self) -> defer.Deferred[None]:
        """Write every change now (after a flush in flight); fires when Redis has them, fails if it did not."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._timer = None
        return self._lock.run(lambda: defer.ensureDeferred(self._write_all()))

    async def _write_all(self) -> None:
        while self.book.has_changes():
            await self._write(self.book.take_changes(FLUSH_FIELDS))

    async def _write(self, changes: list[ChannelChanges]) -> None:
        self._version += 1
        args: list[Any] = []
        flips: dict[str, dict[str, int]] = {}
        for change in changes:
            fields: list[Any] = []
            for user, count in change.users.items():
                fields += ["u:" + user, count]
            if change.anonymous is not None:
                fields += ["a", change.anonymous]
            args += [change.channel, len(fields) // 2, *fields]
            if change.flipped:
                flips[change.channel] = {user: int(present) for user, present in change.flipped.items()}
        event = json.dumps({"n": self.node_id, "v": self._version, "c": flips}) if flips else ""
        alive = self._keys.alive_prefix + self.node_id
        head = [self.node_id, self._version, self._ttl_ms, self._keys.prefix, self._keys.events, event, alive]
        try:
            await _FLUSH.run(self._request, [], head + args)
        except Exception:
            self.book.restore(changes)  # written again, whole, at the next flush
            raise

    async def _heartbeat(self) -> None:
        """Refresh the TTLs; channels whose hash Redis lost (an outage longer than the TTL) are written again."""
        channels = self.book.channels()
        alive = self._keys.alive_prefix + self.node_id
        try:
            for start in range(0, max(1, len(channels)), BEAT_CHANNELS):
                chunk = channels[start : start + BEAT_CHANNELS]
                head = [self.node_id, self._ttl_ms, self._keys.prefix, alive]
                lost = await _BEAT.run(self._request, [], head + chunk)
                for channel in lost or ():
                    self.book.lost(channel.decode() if isinstance(channel, bytes) else channel)
        except Exception:
            return  # Redis down: the next beat tries again, and the TTL decides
        if self.book.has_changes():
            self.changed()

    # -- reading -------------------------------------------------------------

    async def query(self, channel: str, most: int) -> tuple[list[str], int, int]:
        """(up to C{most} users, how many users, anonymous connections) of C{channel}, on every node, now."""
        await self.flush()
        prefix = self._keys.channel_prefix(channel)
        count, anonymous, users = await _QUERY.run(self._request, [self._keys.index(channel)], [prefix, most])
        return sorted(u.decode() for u in users), int(count), int(anonymous)

    async def snapshot(self, channel: str) -> Snapshot:
        """Every live node's users of C{channel}, with versions."""
        reply = await _SNAPSHOT.run(self._request, [self._keys.index(channel)], [self._keys.channel_prefix(channel)])
        return {
            reply[i].decode(): (int(reply[i + 1]), {u.decode() for u in reply[i + 2]}) for i in range(0, len(reply), 3)
        }

    async def gone(self, nodes: list[str]) -> list[str]:
        """Which of C{nodes} stopped refreshing their presence (killed, or cut off past the TTL)."""
        if not nodes:
            return []
        alive = await self._request("MGET", *(self._keys.alive_prefix + node for node in nodes))
        return [node for node, value in zip(nodes, alive) if value is None]
