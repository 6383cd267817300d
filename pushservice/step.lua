-- One step of a node's mover. Redis runs a script at once and alone, so every
-- item is at any instant either on the list or in the log (or the dead-letter
-- list), in push order, whichever node dies when.
--
-- KEYS: 1 the list producers LPUSH onto, 2 the log (a stream), 3 the
--       dead-letter list, 4 the sequence counter, 5 the set of node ids
-- ARGV: 1 max item bytes, 2 peek count, 3 peek byte budget, 4 log maxlen,
--       5 log hard maxlen, 6 dead-letter maxlen, 7 node position key prefix,
--       8 "1": commit nothing if more items wait than were decided (just peek
--       them: a burst is then decided and committed as one batch),
--       9 n, then n decisions of 5 arguments each:
--       item, content (JSON), channel, user, reason ("" unless undeliverable)
--
-- 1. Commit: pop items from the tail (the oldest) while the node has decided
--    them, matched by their bytes (the same bytes always get the same
--    decision, so another node's concurrent step is harmless), or while they
--    are over the size limit (decided here by length alone, never read).
--    Deliverable items go to the log with a contiguous sequence number "s";
--    the others to the dead-letter list, as pushed.
-- 2. Trim the log to maxlen entries, but never past an entry a live node has
--    not read (its position key, refreshed with a TTL, names the last sequence
--    number it read; an expired key drops the node from the set), and to hard
--    maxlen whatever the positions: that node then sees a gap and says so.
-- 3. Peek: the next items from the tail, for the node to decide (oversized
--    ones as false: the node does not need their bytes).
-- Returns {moved, {dead reasons}, {peeked items, oldest first}, last sequence number}.
--
-- No per-byte work: Python makes every decision; this script only compares
-- strings (interned by Lua) and lengths.

local max_item = tonumber(ARGV[1])
local peek_count = tonumber(ARGV[2])
local peek_budget = tonumber(ARGV[3])
local n = tonumber(ARGV[9])
local MAX_OVERSIZED = 1 -- oversized items copied into Lua per step (they are read only to be measured)

-- A failed call aborts a script without undoing what it did: check the keys
-- before popping anything, so a wrong-typed key cannot swallow items.
local expected = {{KEYS[1], "list"}, {KEYS[2], "stream"}, {KEYS[3], "list"}, {KEYS[4], "string"}, {KEYS[5], "set"}}
for _, key in ipairs(expected) do
  local t = redis.call("TYPE", key[1]).ok
  if t ~= key[2] and t ~= "none" then
    return redis.error_reply("pushservice: " .. key[1] .. " must be a " .. key[2] .. ", not a " .. t)
  end
end

local decided = {}
for i = 0, n - 1 do
  decided[ARGV[10 + 5 * i]] = 10 + 5 * i
end

local seq = tonumber(redis.call("GET", KEYS[4]) or "0")
local moved, dead, oversized = 0, {}, 0
local commits = n + MAX_OVERSIZED
if ARGV[8] == "1" and redis.call("LLEN", KEYS[1]) > n then
  commits = 0
end
for _ = 1, commits do
  local item = redis.call("LINDEX", KEYS[1], -1)
  if not item then break end
  local reason, at = nil, nil
  if #item > max_item then
    if oversized == MAX_OVERSIZED then break end
    oversized = oversized + 1
    reason = "item is " .. #item .. " bytes, over the " .. max_item .. " byte limit"
  else
    at = decided[item]
    if not at then break end
    if ARGV[at + 4] ~= "" then reason = ARGV[at + 4] end
  end
  if reason then
    redis.call("LMOVE", KEYS[1], KEYS[3], "RIGHT", "LEFT") -- moved as it is, not copied again
    table.insert(dead, reason)
  else
    redis.call("RPOP", KEYS[1])
    seq = seq + 1
    local entry = {"XADD", KEYS[2], "*", "s", seq, "c", ARGV[at + 1]}
    if ARGV[at + 2] ~= "" then table.insert(entry, "ch"); table.insert(entry, ARGV[at + 2]) end
    if ARGV[at + 3] ~= "" then table.insert(entry, "u"); table.insert(entry, ARGV[at + 3]) end
    redis.call(unpack(entry))
    moved = moved + 1
  end
end

if #dead > 0 then
  redis.call("LTRIM", KEYS[3], 0, tonumber(ARGV[6]) - 1)
end
if moved > 0 then
  redis.call("SET", KEYS[4], seq)
  local keep = tonumber(ARGV[4])
  for _, id in ipairs(redis.call("SMEMBERS", KEYS[5])) do
    local position = redis.call("GET", ARGV[7] .. id)
    if position then
      keep = math.max(keep, seq - tonumber(position))
    else
      redis.call("SREM", KEYS[5], id)
    end
  end
  redis.call("XTRIM", KEYS[2], "MAXLEN", "~", math.min(keep, tonumber(ARGV[5])))
end

local peeked, bytes = {}, 0
oversized = 0
while #peeked < peek_count and bytes < peek_budget and oversized < MAX_OVERSIZED do
  local item = redis.call("LINDEX", KEYS[1], -1 - #peeked) -- one element at a time: nothing big copied for nothing
  if not item then break end
  if #item > max_item then
    oversized = oversized + 1
    table.insert(peeked, false)
  else
    bytes = bytes + #item
    table.insert(peeked, item)
  end
end
return {moved, dead, peeked, seq}
