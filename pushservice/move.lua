-- Move up to ARGV[1] items from the tail of the list KEYS[1] (producers LPUSH,
-- so the tail is the oldest) to the stream KEYS[2], trimmed to about ARGV[2]
-- entries. Redis runs a script at once and alone, so items keep their push
-- order across every node, and each item is either still on the list or in
-- the stream, whenever a node dies.
--
-- Each entry has k = "e" (an envelope: a JSON object with "content") or
-- "r" (anything else: delivered as a string) and d = the item as pushed.
-- Items that cannot be delivered go to the dead-letter list KEYS[3], their
-- reasons are returned for the log: {moved, {reason, ...}}.

local function valid_utf8(s)
  if not string.find(s, "[\128-\255]") then return true end
  local i, n = 1, #s
  while i <= n do
    local c = string.byte(s, i)
    if c < 0x80 then
      i = i + 1
    elseif c >= 0xC2 and c <= 0xDF then
      local c2 = string.byte(s, i + 1)
      if not c2 or c2 < 0x80 or c2 > 0xBF then return false end
      i = i + 2
    elseif c >= 0xE0 and c <= 0xEF then
      local c2, c3 = string.byte(s, i + 1, i + 2)
      if not c3 or c2 < 0x80 or c2 > 0xBF or c3 < 0x80 or c3 > 0xBF then return false end
      if (c == 0xE0 and c2 < 0xA0) or (c == 0xED and c2 > 0x9F) then return false end
      i = i + 3
    elseif c >= 0xF0 and c <= 0xF4 then
      local c2, c3, c4 = string.byte(s, i + 1, i + 3)
      if not c4 or c2 < 0x80 or c2 > 0xBF or c3 < 0x80 or c3 > 0xBF or c4 < 0x80 or c4 > 0xBF then
        return false
      end
      if (c == 0xF0 and c2 < 0x90) or (c == 0xF4 and c2 > 0x8F) then return false end
      i = i + 4
    else
      return false
    end
  end
  return true
end

local function bad_name(v)
  return v ~= nil and v ~= cjson.null and (type(v) ~= "string" or #v == 0 or #v > 255)
end

local function classify(item)
  if not valid_utf8(item) then return nil, "item is not UTF-8 text" end
  if string.find(item, "^%s*{") then
    local ok, v = pcall(cjson.decode, item)
    if ok and type(v) == "table" and v.content ~= nil then
      if bad_name(v.channel) then return nil, "envelope channel must be a string of 1-255 bytes" end
      if bad_name(v.user) then return nil, "envelope user must be a string of 1-255 bytes" end
      return "e"
    end
    -- meant as an envelope but undecodable here (lone surrogate escape, nesting over
    -- 1000, broken JSON): broadcasting it as text could leak a channel's or user's message
    if not ok and string.find(item, '"content"', 1, true) then
      return nil, "item looks like an envelope but is not JSON that Redis can decode"
    end
  end
  return "r"
end

-- A failed call aborts a script without undoing what it did: check the keys
-- before popping anything, so a wrong-typed key cannot swallow items.
local log_type = redis.call("TYPE", KEYS[2]).ok
local dead_type = redis.call("TYPE", KEYS[3]).ok
if (log_type ~= "stream" and log_type ~= "none") or (dead_type ~= "list" and dead_type ~= "none") then
  return redis.error_reply("pushservice: " .. KEYS[2] .. " must be a stream and " .. KEYS[3] .. " a list")
end
local items = redis.call("RPOP", KEYS[1], ARGV[1])
if not items then return {0, {}} end
local moved, dead = 0, {}
for _, item in ipairs(items) do
  local kind, why = classify(item)
  if kind then
    redis.call("XADD", KEYS[2], "MAXLEN", "~", ARGV[2], "*", "k", kind, "d", item)
    moved = moved + 1
  else
    redis.call("LPUSH", KEYS[3], item)
    table.insert(dead, why)
  end
end
return {moved, dead}
