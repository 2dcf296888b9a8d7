"""The Lua scripts of the Redis engine (STORAGE.md, "Redis engine").

Every script gets the same KEYS, the keys of one channel, which share one hash tag and so
one cluster slot: 1 meta, 2 log, 3 msgs, 4 chg, 5 tomb, 6 idx, 7 dd, 8 dq, 9 rc. A write
script is one atomic step of one channel; a read script reads one consistent state.

Scripts never decode what a user wrote: Lua's msgpack would turn big integers into doubles
and binary into text. Entries are built by concatenating msgpack pieces that Python packed
(the ``ts``, ``sender``, ``text`` and ``meta`` pairs) with the pieces only the script knows
(``seq`` and the message id), in a fixed order: ``seq``, ``kind``, ``ts`` first, so that
compaction can read an entry's ts at a known position.

They are loaded as one Redis function library (``LIBRARY``, FUNCTION LOAD), not as cached
scripts: Redis keeps a library in its AOF and RDB and sends it to its replicas, so a
restart or a failover finds it, where a script cache starts empty (STORAGE.md, "Writes").
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ResponseError

# Shared by every script: msgpack encoders producing what tsmsg's packb produces for the
# same values (the smallest form), so a stored entry's size is its size on the wire.
_LIB = r"""
local function u(n)
  if n < 128 then return string.char(n) end
  if n < 256 then return '\204' .. string.char(n) end
  if n < 65536 then return '\205' .. string.char(math.floor(n / 256), n % 256) end
  local function be4(x)
    return string.char(math.floor(x / 16777216), math.floor(x / 65536) % 256,
      math.floor(x / 256) % 256, x % 256)
  end
  if n < 4294967296 then return '\206' .. be4(n) end
  return '\207' .. be4(math.floor(n / 4294967296)) .. be4(n % 4294967296)
end
local function s(str)
  local n = #str
  if n < 32 then return string.char(160 + n) .. str end
  if n < 256 then return '\217' .. string.char(n) .. str end
  return '\218' .. string.char(math.floor(n / 256), n % 256) .. str
end
local function map(n) return string.char(128 + n) end
local function du(v, p)
  local b = string.byte(v, p)
  if b < 128 then return b, p + 1 end
  local len = ({[204] = 1, [205] = 2, [206] = 4, [207] = 8})[b]
  local x = 0
  for i = 1, len do x = x * 256 + string.byte(v, p + i) end
  return x, p + 1 + len
end
local function entry_ts(v)
  local _, p = du(v, 6)
  p = p + 5
  p = p + 1 + string.byte(v, p) - 160
  return (du(v, p + 3))
end
local function dec(n) return string.format('%d', n) end
local DELETED = '\167deleted\195'
local function fresh(epoch)
  redis.call('UNLINK', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9])
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'head', 0, 'horizon', 0)
end
"""

# A run of new messages to one channel (a batch's consecutive appends to it: one call, one
# atomic step), each either stored or answered with the first result of its cid.
# ARGV: 1 candidate epoch (used if the channel's meta is missing: new, or lost), 2 ts pair,
# 3 ts, 4 dedup_max, 5 dedup cutoff ts, 6 most dedup entries to prune per new message,
# 7 the messages: one msgpack array (str items, any bytes: Lua's cmsgpack knows no bin),
# five items per message: dedup key, sender, body pairs (text, meta), number of body pairs,
# meta pair or ''. One argument for the run, not five per message: redis-py encodes every
# argument in Python, which cost more than the rest of the writer's work per message.
# Reply: {id prefix, epoch, created, r1, r2, ...}: per message its seq (an integer) if it
# was stored, or {seq, entry} for a known cid ({seq} once the entry is compacted away). The
# id prefix is the epoch unless the meta has a 'pfx' (a restored log).
APPEND = r"""
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'pfx', 'head')
local epoch, pfx, head, created = meta[1], meta[2], tonumber(meta[3]), 0
if not epoch then
  epoch, pfx, head, created = ARGV[1], nil, 0, 1
  fresh(epoch)
end
pfx = pfx or epoch
local out = {pfx, epoch, created}
local ts, added = ARGV[3], 0
local log, idx, msgs, dd, dq, seen, built = {}, {}, {}, {}, {}, {}, {}
local m = cmsgpack.unpack(ARGV[7])
for a = 1, #m, 5 do
  local dkey = m[a]
  local first = seen[dkey]
  if not first and created == 0 then
    local v = redis.call('HGET', KEYS[7], dkey)
    if v then first = string.match(v, '^(%d+)') end
  end
  if first then
    out[#out + 1] = {tonumber(first), built[first] or redis.call('HGET', KEYS[2], first)}
  else
    head = head + 1
    added = added + 1
    local seq = dec(head)
    local base = '\163seq' .. u(head) .. '\164kind\167message' .. ARGV[2]
      .. '\162id' .. s(pfx .. '-' .. seq) .. '\166sender' .. s(m[a + 1])
    local entry = map(5 + m[a + 3]) .. base .. m[a + 2]
    local n = #log
    log[n + 1], log[n + 2] = seq, entry
    n = #idx
    idx[n + 1], idx[n + 2], idx[n + 3], idx[n + 4] = 'b' .. seq, base, 's' .. seq, m[a + 1]
    if m[a + 4] ~= '' then idx[n + 5], idx[n + 6] = 'm' .. seq, m[a + 4] end
    n = #msgs
    msgs[n + 1], msgs[n + 2] = seq, seq
    dd[n + 1], dd[n + 2] = dkey, seq .. ':' .. ts
    dq[n + 1], dq[n + 2] = seq, dkey
    seen[dkey], built[seq] = seq, entry
    out[#out + 1] = head
  end
end
if added == 0 then return out end
redis.call('HSET', KEYS[1], 'head', dec(head))
redis.call('HSET', KEYS[2], unpack(log))
redis.call('HSET', KEYS[6], unpack(idx))
redis.call('ZADD', KEYS[3], unpack(msgs))
redis.call('HSET', KEYS[7], unpack(dd))
redis.call('ZADD', KEYS[8], unpack(dq))
local budget = added * tonumber(ARGV[6])
local excess = redis.call('ZCARD', KEYS[8]) - tonumber(ARGV[4])
while budget > 0 do
  local oldest = redis.call('ZRANGE', KEYS[8], 0, 0)[1]
  if not oldest then break end
  if excess <= 0 then
    local v = redis.call('HGET', KEYS[7], oldest)
    if v and tonumber(string.match(v, ':(%d+)$')) >= tonumber(ARGV[5]) then break end
  end
  redis.call('ZREM', KEYS[8], oldest)
  redis.call('HDEL', KEYS[7], oldest)
  excess = excess - 1
  budget = budget - 1
end
return out
"""

# An edit ('e') or a delete ('d') of message seq ARGV[3] of id prefix ARGV[2]. ARGV: 4 user,
# 5 moderator '1'/'0', 6 ts, 7 ts pair, 8 id and sender pairs, 9 text pair, 10 edited pair,
# 11 the most edits a message may have (max_edits_per_message).
# Reply: {'ok', seq, epoch}, {'nf'} (no such live message), {'fb'} (not the sender's) or
# {'le', count} (an edit of a message edited count >= ARGV[11] times: nothing written).
CHANGE = r"""
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'pfx')
local mseq = ARGV[3]
if not meta[1] or (meta[2] or meta[1]) ~= ARGV[2] then return {'nf'} end
local sender = redis.call('HGET', KEYS[6], 's' .. mseq)
if not sender then return {'nf'} end
if sender ~= ARGV[4] and ARGV[5] ~= '1' then return {'fb'} end
local edits = redis.call('HGET', KEYS[6], 'e' .. mseq)
if ARGV[1] == 'e' and edits then
  local count = select(2, string.gsub(edits, ',', '')) + 1
  if count >= tonumber(ARGV[11]) then return {'le', count} end
end
local seq = dec(redis.call('HINCRBY', KEYS[1], 'head', 1))
local mbase = redis.call('HGET', KEYS[6], 'b' .. mseq)
if ARGV[1] == 'e' then
  local ebase = '\163seq' .. u(tonumber(seq)) .. '\164kind\164edit' .. ARGV[7] .. ARGV[8]
  redis.call('HSET', KEYS[2], seq, map(6) .. ebase .. ARGV[9])
  local list = seq
  if edits then list = edits .. ',' .. seq end
  redis.call('HSET', KEYS[6], 'b' .. seq, ebase, 'e' .. mseq, list)
  local mm = redis.call('HGET', KEYS[6], 'm' .. mseq)
  local n = 7
  if mm then n = 8 else mm = '' end
  redis.call('HSET', KEYS[2], mseq, map(n) .. mbase .. ARGV[9] .. mm .. ARGV[10])
else
  redis.call('HSET', KEYS[2], seq,
    map(5) .. '\163seq' .. u(tonumber(seq)) .. '\164kind\166delete' .. ARGV[7] .. ARGV[8])
  redis.call('HSET', KEYS[2], mseq, map(6) .. mbase .. DELETED)
  if edits then
    for e in string.gmatch(edits, '%d+') do
      local eb = redis.call('HGET', KEYS[6], 'b' .. e)
      if eb then
        redis.call('HSET', KEYS[2], e, map(6) .. eb .. DELETED)
        redis.call('HDEL', KEYS[6], 'b' .. e)
      end
    end
  end
  redis.call('HDEL', KEYS[6], 'b' .. mseq, 'm' .. mseq, 's' .. mseq, 'e' .. mseq)
  redis.call('HSET', KEYS[6], 't' .. mseq, ARGV[6])
  redis.call('ZADD', KEYS[5], mseq, mseq)
end
redis.call('ZADD', KEYS[4], seq, seq)
return {'ok', seq, meta[1]}
"""

# Move user ARGV[1]'s read cursor forward to ARGV[2], clamped to the head.
# Reply: {cursor, 1 if it moved else 0}.
READ = r"""
local head = redis.call('HGET', KEYS[1], 'head')
if not head then return {0, 0} end
local new = math.min(math.max(tonumber(ARGV[2]), 0), tonumber(head))
local old = tonumber(redis.call('HGET', KEYS[9], ARGV[1]) or '0')
if new <= old then return {old, 0} end
redis.call('HSET', KEYS[9], ARGV[1], dec(new))
return {new, 1}
"""

# One bounded step of a compaction pass: at most ARGV[6] entries dropped or looked at.
# ARGV: 1 the channel's epoch ('' on the first step: plan the pass), 2 keep_recent,
# 3 max_count (-1: none), 4 age cutoff ts, 5 tombstone cutoff ts, 6 chunk, then the plan
# as the previous step returned it: 7 phase, 8 point, 9 drop_below, 10 next tombstone.
# Reply: {finished, horizon, epoch, phase, point, drop_below, next tombstone}.
COMPACT = r"""
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'head', 'horizon')
if not meta[1] then return {1, 0, '', 0, 0, 0, 0} end
local head, horizon = tonumber(meta[2]), tonumber(meta[3])
if ARGV[1] ~= '' and ARGV[1] ~= meta[1] then return {1, horizon, meta[1], 0, 0, 0, 0} end
local phase, point, drop_below, tnext
if ARGV[1] == '' then
  local keep = 0
  if tonumber(ARGV[3]) >= 0 then keep = head - tonumber(ARGV[3]) end
  drop_below = math.max(0, keep)
  point = math.max(0, head - tonumber(ARGV[2]), keep)
  phase, tnext = 1, 0
else
  phase, point = tonumber(ARGV[7]), tonumber(ARGV[8])
  drop_below, tnext = tonumber(ARGV[9]), tonumber(ARGV[10])
end
local budget = tonumber(ARGV[6])
local function drop(q)
  redis.call('HDEL', KEYS[2], q)
  redis.call('ZREM', KEYS[3], q)
  redis.call('ZREM', KEYS[4], q)
  redis.call('ZREM', KEYS[5], q)
  redis.call('HDEL', KEYS[6], 'b' .. q, 'm' .. q, 's' .. q, 't' .. q, 'e' .. q)
end
if phase == 1 then
  while true do
    local a = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
    local b = redis.call('ZRANGE', KEYS[4], 0, 0)[1]
    local q = a
    if b and (not a or tonumber(b) < tonumber(a)) then q = b end
    if not q then phase = 2 break end
    if tonumber(q) > drop_below
      and entry_ts(redis.call('HGET', KEYS[2], q)) >= tonumber(ARGV[4]) then
      phase = 2
      break
    end
    if budget == 0 then break end
    budget = budget - 1
    point = math.max(point, tonumber(q))
    drop(q)
  end
end
if phase == 2 and budget > 0 then
  local qs = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', point, 'LIMIT', 0, budget)
  for _, q in ipairs(qs) do drop(q) end
  budget = budget - #qs
  if budget > 0 then phase = 3 end
end
if phase == 3 and budget > 0 then
  local qs = redis.call('ZRANGEBYSCORE', KEYS[5], '(' .. dec(tnext), point, 'LIMIT', 0, budget)
  for _, q in ipairs(qs) do
    if tonumber(redis.call('HGET', KEYS[6], 't' .. q)) <= tonumber(ARGV[5]) then drop(q) end
    tnext = tonumber(q)
  end
  if #qs < budget then phase = 4 end
end
horizon = math.max(horizon, math.min(point, head))
redis.call('HSET', KEYS[1], 'horizon', dec(horizon))
local finished = 0
if phase == 4 then finished = 1 end
return {finished, horizon, meta[1], phase, point, drop_below, tnext}
"""

# Drop the channel's log and start a new one under epoch ARGV[1] (0 for an unknown channel).
RESET = r"""
if not redis.call('HGET', KEYS[1], 'epoch') then return 0 end
fresh(ARGV[1])
return 1
"""

# Entries ARGV[1]+1 .. ARGV[1]+ARGV[2] (at most up to the head) if ARGV[1] is within
# [horizon, head]. Reply: {epoch or '', head, horizon, entries...} (an entry may be nil).
SYNC = r"""
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'head', 'horizon')
if not meta[1] then return {'', 0, 0} end
local since, head = tonumber(ARGV[1]), tonumber(meta[2])
local out = {meta[1], head, tonumber(meta[3])}
if since < tonumber(meta[3]) or since > head then return out end
local n = math.min(tonumber(ARGV[2]), head - since)
if n <= 0 then return out end
local fields = {}
for i = 1, n do fields[i] = dec(since + i) end
local vals = redis.call('HMGET', KEYS[2], unpack(fields))
for i = 1, n do out[3 + i] = vals[i] end
return out
"""

# The newest ARGV[2] messages with seq <= ARGV[1] ('' : the head), newest first.
# Reply: {seq, entry, seq, entry, ...}.
HISTORY = r"""
local head = redis.call('HGET', KEYS[1], 'head')
if not head then return {} end
local top = tonumber(head)
if ARGV[1] ~= '' then top = math.min(top, tonumber(ARGV[1])) end
if top < 1 then return {} end
local qs = redis.call('ZREVRANGEBYSCORE', KEYS[3], top, '-inf', 'LIMIT', 0, tonumber(ARGV[2]))
if #qs == 0 then return {} end
local vals = redis.call('HMGET', KEYS[2], unpack(qs))
local out = {}
for i, q in ipairs(qs) do
  out[2 * i - 1] = q
  out[2 * i] = vals[i] or ''
end
return out
"""

# Live messages of others among the next ARGV[3] messages after ARGV[2] ('' : the user
# ARGV[1]'s read cursor). Reply: {count, messages looked at, the last one's seq}.
UNREAD = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0, '0'} end
local from = ARGV[2]
if from == '' then from = redis.call('HGET', KEYS[9], ARGV[1]) or '0' end
local qs = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. from, '+inf', 'LIMIT', 0, tonumber(ARGV[3]))
local count = 0
for _, q in ipairs(qs) do
  local sender = redis.call('HGET', KEYS[6], 's' .. q)
  if sender and sender ~= ARGV[1] then count = count + 1 end
end
return {count, #qs, qs[#qs] or from}
"""

# User ARGV[1]'s read cursor: 0 while the channel has no log (its meta lost: what is left
# of the old log is not its state, STORAGE.md).
CURSOR = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return tonumber(redis.call('HGET', KEYS[9], ARGV[1]) or '0')
"""

# The first result of dedup key ARGV[1]. Reply: {} or {id prefix, seq, entry or nil}.
DUP = r"""
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'pfx')
if not meta[1] then return {} end
local first = redis.call('HGET', KEYS[7], ARGV[1])
if not first then return {} end
local seq = string.match(first, '^(%d+)')
return {meta[2] or meta[1], seq, redis.call('HGET', KEYS[2], seq)}
"""

# The seqs of the first ARGV[2] entries after ARGV[1] ('asc') or of the last ARGV[2]
# entries ('desc', ARGV[1] unused), from the message and change indexes, in that order.
_LIB_RANGE = r"""
local function entry_seqs(order, after, n)
  local a, b
  if order == 'asc' then
    a = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. after, '+inf', 'LIMIT', 0, n)
    b = redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. after, '+inf', 'LIMIT', 0, n)
  else
    a = redis.call('ZREVRANGEBYSCORE', KEYS[3], '+inf', '-inf', 'LIMIT', 0, n)
    b = redis.call('ZREVRANGEBYSCORE', KEYS[4], '+inf', '-inf', 'LIMIT', 0, n)
  end
  local qs, i, j = {}, 1, 1
  while #qs < n and (a[i] or b[j]) do
    local take_a = b[j] == nil
    if a[i] and b[j] then
      if order == 'asc' then take_a = tonumber(a[i]) < tonumber(b[j])
      else take_a = tonumber(a[i]) > tonumber(b[j]) end
    end
    if take_a then qs[#qs + 1] = a[i]; i = i + 1 else qs[#qs + 1] = b[j]; j = j + 1 end
  end
  return qs
end
"""

# Export: the first ARGV[2] log entries after seq ARGV[1], with each one's tombstone time.
# Reply: {epoch or '', head, horizon, id prefix or '', seq, entry, deleted ts or '', ...}.
DUMP = r"""
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'head', 'horizon', 'pfx')
if not meta[1] then return {''} end
local out = {meta[1], meta[2], meta[3], meta[4] or ''}
local qs = entry_seqs('asc', ARGV[1], tonumber(ARGV[2]))
if #qs == 0 then return out end
local vals = redis.call('HMGET', KEYS[2], unpack(qs))
for k, q in ipairs(qs) do
  out[#out + 1] = q
  out[#out + 1] = vals[k] or ''
  out[#out + 1] = redis.call('HGET', KEYS[6], 't' .. q) or ''
end
return out
"""

# Inspect: the last ARGV[1] log entries, oldest first. Reply: {epoch or '', head, horizon,
# entries...}.
TAIL = r"""
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'head', 'horizon')
if not meta[1] then return {''} end
local out = {meta[1], meta[2], meta[3]}
local n = tonumber(ARGV[1])
if n < 1 then return out end
local qs = entry_seqs('desc', '', n)
if #qs == 0 then return out end
local vals = redis.call('HMGET', KEYS[2], unpack(qs))
for k = #qs, 1, -1 do out[#out + 1] = vals[k] or '' end
return out
"""

# Presence (RedisPresence). A user's presence hash {u:<user>}:pres: one field per node
# with a device of the user, the node's mark (hex) -> "<since_ms> <expires_ms>", and the
# user's status, field "s" -> "<set_ms> <status>": a user's, not a node's (PROTOCOL.md
# 6.13). {u:<user>}:pv: the user's presence order, a counter moved by every presence_set
# and by every sweep that finds a change (presence_expire), kept for good (an integer per
# user, as last_seen): each change's number says which of two changes of the user came
# last in the engine, whatever order the nodes' pushes of them take (docs/cluster.md).
_BUMP = r"""
-- The counter at `key` moved on: one more than it held, and never below now_ms, so one
-- lost with Redis's data (FLUSHALL, a restart without its AOF, a failover that lost the
-- last writes) starts again above the values nodes remember, not below (a user's
-- presence order and memberships' version, STORAGE.md "Presence between nodes").
local function bump(key, now)
  local v = redis.call('INCR', key)
  if v < now then redis.call('SET', key, now); return now end
  return v
end
"""

_PRESENCE_LIB = (
    _BUMP
    + r"""
-- How many nodes other than `skip` hold a live entry, and the user's status: nil while no
-- status is held, i.e. the user was not announced present, or was announced gone.
local function presence_state(key, now, skip)
  local live, status = 0, nil
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    if all[i] == 's' then
      status = string.match(all[i + 1], '^%d+ (.*)$')
    elseif all[i] ~= skip then
      local e = tonumber(string.match(all[i + 1], '^%d+ (%d+)$'))
      if e and e > now then live = live + 1 end
    end
  end
  return live, status
end
local function status_of(live, status)
  if live == 0 then return 'offline' end
  return status or 'online'
end
"""
)

# KEYS: the user's hash. ARGV: node, change, since_ms, expires_ms, now_ms, keep_until_ms
# (the hash outlives its entries' expiry, so a sweep still finds a dead node's entry).
# change: '' this node's last device is gone; '\0' this node's first device connected (the
# user's status stays if another node has a live entry, else it is "online"); anything
# else: the status the user set. ARGV[7]: '' or a status the user set just before this
# change (the node queued both: it is applied first). KEYS[2]: the user's last_seen, set
# to now_ms when this node's last device of the user leaves and no other node has a live
# entry (the user's last device anywhere). KEYS[3]: the user's presence order (moved).
# Returns {status before, status after, live entries after, order} ("offline" with 0
# entries: no device anywhere).
PRESENCE_SET = r"""
local now = tonumber(ARGV[5])
local others, status = presence_state(KEYS[1], now, ARGV[1])
local before = status or 'offline' -- as announced: an entry expired unswept still counts
if ARGV[7] ~= '' then status = ARGV[7] end
local me = 0
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3] .. ' ' .. ARGV[4])
  me = 1
  if ARGV[2] ~= '\0' then
    status = ARGV[2]
  elseif others == 0 or not status then
    status = 'online'
  end
  redis.call('PEXPIREAT', KEYS[1], ARGV[6], 'GT')
  redis.call('PEXPIREAT', KEYS[1], ARGV[6], 'NX')
end
if others + me == 0 then
  redis.call('HDEL', KEYS[1], 's')
  if ARGV[2] == '' then redis.call('SET', KEYS[2], ARGV[5]) end -- the last device anywhere
elseif status then
  redis.call('HSET', KEYS[1], 's', ARGV[3] .. ' ' .. status)
end
return {before, status_of(others + me, status), others + me, bump(KEYS[3], now)}
"""

# KEYS: the user's hash. ARGV: node, since_ms, expires_ms, keep_until_ms. A live node's
# refresh: extends its entry only if it is still the one set at since_ms (not one a later
# change replaced or removed meanwhile, nor one a sweep took). Returns 1, or 0.
PRESENCE_EXTEND = r"""
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v or string.match(v, '^(%d+) ') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
redis.call('PEXPIREAT', KEYS[1], ARGV[4], 'GT')
redis.call('PEXPIREAT', KEYS[1], ARGV[4], 'NX')
return 1
"""

# KEYS: the user's hash, last_seen, presence order. ARGV: node, now_ms. A node's entry
# that expired is removed, with every other expired entry of the user (nodes that died
# together: the user goes offline once, at this claim; the others' claims then find no
# entry). With no live entry left, last_seen is set to now_ms here, atomically with the
# decision (a device that connects to another node after it is not overwritten by a
# write of the sweeper's made later). Returns {status before, live entries after, order}
# (the status is the user's: it changes only when no entry is left; the order moved), or
# false when the entry was refreshed (or removed) meanwhile.
PRESENCE_EXPIRE = r"""
local now = tonumber(ARGV[2])
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return false end
local e = tonumber(string.match(v, '^%d+ (%d+)$'))
if e and e > now then return false end
local live, status = presence_state(KEYS[1], now, nil)
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local x = all[i] ~= 's' and tonumber(string.match(all[i + 1], '^%d+ (%d+)$'))
  if x and x <= now then redis.call('HDEL', KEYS[1], all[i]) end
end
redis.call('HDEL', KEYS[1], ARGV[1])
if not status then return false end -- announced gone already (its last device left)
if live == 0 then
  redis.call('HDEL', KEYS[1], 's')
  redis.call('SET', KEYS[2], ARGV[2]) -- the last device anywhere: its node's death
end
return {status, live, bump(KEYS[3], now)}
"""

# KEYS: the user's hash. ARGV: now_ms. The user's status, or false with no live entry.
PRESENCE_STATUS = r"""
local live, status = presence_state(KEYS[1], tonumber(ARGV[1]), nil)
if live == 0 then return false end
return status or 'online'
"""

# KEYS: the expiry index (a sorted set of node..user by expires_ms). ARGV: now_ms, most,
# lease (a score no entry's expiry has: ms and a half). Claims the entries due: each goes
# to one caller only, and stays in the index, due again at the lease, until the caller
# releases it once swept (presence_release): a sweep cut short (Redis away, its node
# gone) leaves the entries it did not sweep to a later one, not unswept for good.
PRESENCE_CLAIM = r"""
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for i = 1, #due do redis.call('ZADD', KEYS[1], 'XX', ARGV[3], due[i]) end
return due
"""

# KEYS: the expiry index. ARGV: the lease of a claim, then members it swept: each removed
# unless its score moved since (its node, late but alive, refreshed its entry).
PRESENCE_RELEASE = r"""
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == lease then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
return 0
"""

# Shared send limits (SendLimits): two token buckets, each a string "<tokens> <stamp_ms>"
# in the user's slot: {u:<user>}:rate (per user) and {u:<user>}:rate:c:<channel> (per user
# and channel). One call charges several runs (a batch's runs whose keys share a slot: on
# one Redis all of them), in order. KEYS: the two buckets of each run. ARGV: now_ms, rate,
# burst, channel rate, channel burst, then each run's n (its user's sends in its channel,
# in order). Each send takes a token from both buckets or from neither: the first k of a
# run that both can pay for are granted. Returns per run k and the ms until both have a
# token again (0 if k == n): {k1, wait1, k2, wait2, ...}. Each key expires once its
# bucket would be full again: a user's channels leave nothing behind.
# The buckets are no data to keep: their writes are not appended to the AOF nor sent to
# replicas (REPL_NONE), so under `appendfsync always` this call's reply waits for no fsync
# (a round trip per batch, ~0.2 ms of a batch's latency here). A restarted Redis or a
# promoted replica starts a bucket full, or as an AOF rewrite or a full resync copied it
# (STORAGE.md, "Shared send limits").
SEND_RATE = r"""
redis.set_repl(redis.REPL_NONE)
local now = tonumber(ARGV[1])
-- A bucket's level, and its stamp: never moved back (a node whose clock is behind the
-- one that stamped it refills nothing and keeps the stamp; were the stamp set back to its
-- clock, the other node's next charge would refill the difference again, every time).
local function level(key, rate, burst)
  local v = redis.call('GET', key)
  if not v then return burst, now end
  local t, s = string.match(v, '^(%S+) (%d+)$')
  s = tonumber(s)
  return math.min(burst, tonumber(t) + math.max(0, now - s) * rate / 1000), math.max(now, s)
end
local rate, burst = tonumber(ARGV[2]), tonumber(ARGV[3])
local crate, cburst = tonumber(ARGV[4]), tonumber(ARGV[5])
local out = {}
for i = 1, #ARGV - 5 do
  local user, chan, n = KEYS[2 * i - 1], KEYS[2 * i], tonumber(ARGV[5 + i])
  local a, sa = level(user, rate, burst)
  local b, sb = level(chan, crate, cburst)
  local k = math.max(0, math.min(n, math.floor(a), math.floor(b)))
  if k > 0 then
    a, b = a - k, b - k
    redis.call('SET', user, string.format('%.6f %d', a, sa),
      'PX', math.ceil((burst - a) * 1000 / rate) + (sa - now) + 1000)
    redis.call('SET', chan, string.format('%.6f %d', b, sb),
      'PX', math.ceil((cburst - b) * 1000 / crate) + (sb - now) + 1000)
  end
  local wait = 0
  if k < n then
    wait = 1
    if a < 1 then wait = math.max(wait, math.ceil((1 - a) * 1000 / rate) + sa - now) end
    if b < 1 then wait = math.max(wait, math.ceil((1 - b) * 1000 / crate) + sb - now) end
  end
  out[2 * i - 1], out[2 * i] = k, wait
end
return out
"""

# A membership (WriteOp "member"). KEYS: the user's set of channels, its version (a
# counter, the user's slot). ARGV: the channel, most (0: no bound), now_ms (the version
# never goes below it: `bump`). Added only while the
# set has fewer than `most`; returns 1 if added (the version then counts one more: a node
# that read the set at another version reads it again, STORAGE.md "Presence between
# nodes").
MEMBER = r"""
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 0 end
local most = tonumber(ARGV[2])
if most > 0 and redis.call('SCARD', KEYS[1]) >= most then return 0 end
bump(KEYS[2], tonumber(ARGV[3]))
return redis.call('SADD', KEYS[1], ARGV[1])
"""

# A membership forgotten (WriteOp "unmember"). KEYS: as MEMBER's. ARGV: the channel,
# now_ms. Returns 1 if it was a member (the version then moves on).
UNMEMBER = r"""
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
bump(KEYS[2], tonumber(ARGV[2]))
return 1
"""

SCRIPTS: dict[str, str] = {
    name: _LIB + body
    for name, body in {
        "append": APPEND,
        "change": CHANGE,
        "read": READ,
        "compact": COMPACT,
        "reset": RESET,
        "sync": SYNC,
        "history": HISTORY,
        "unread": UNREAD,
        "cursor": CURSOR,
        "dup": DUP,
        "dump": _LIB_RANGE + DUMP,
        "tail": _LIB_RANGE + TAIL,
    }.items()
} | {
    "presence_set": _PRESENCE_LIB + PRESENCE_SET,
    "presence_expire": _PRESENCE_LIB + PRESENCE_EXPIRE,
    "presence_claim": PRESENCE_CLAIM,
    "presence_release": PRESENCE_RELEASE,
    "presence_extend": PRESENCE_EXTEND,
    "presence_status": _PRESENCE_LIB + PRESENCE_STATUS,
    "send_rate": SEND_RATE,
    "member": _BUMP + MEMBER,
    "unmember": _BUMP + UNMEMBER,
}
# Redis refuses a function that may write while it is over maxmemory (noeviction), before
# it runs; a script was refused only at its first write that could grow memory. So the
# reads are declared `no-writes`, and the writes that free memory or must go on in a full
# Redis (compaction, a reset, presence sweeps: deletes, and a few small fields) `allow-oom`.
FLAGS = dict.fromkeys(
    ("sync", "history", "unread", "cursor", "dup", "dump", "tail", "presence_status"), "no-writes"
) | dict.fromkeys(
    ("compact", "reset", "presence_expire", "presence_claim", "presence_release"), "allow-oom"
)


def _library(name: str) -> str:
    """The scripts as one Redis function library: each script's body becomes the body
    of a function ``<library>_<script>`` taking KEYS and ARGV, so it runs unchanged."""
    return f"#!lua name={name}\n" + "".join(
        f"redis.register_function{{function_name='{name}_{script}', "
        f"callback=function(KEYS, ARGV)\n{src}\nend"
        + (f", flags={{'{FLAGS[script]}'}}" if script in FLAGS else "")
        + "}\n"
        for script, src in SCRIPTS.items()
    )


# The library's name carries its code's hash: nodes of two tsmsg versions (a rolling
# upgrade) each call their own functions, never the other's (STORAGE.md).
LIBRARY_NAME = "tsmsg_" + hashlib.sha1(_library("tsmsg").encode()).hexdigest()[:16]
LIBRARY = _library(LIBRARY_NAME)
FUNCTIONS: dict[str, str] = {script: f"{LIBRARY_NAME}_{script}" for script in SCRIPTS}


def fcall(name: str, keys: Sequence[bytes], *args: Any) -> tuple[Any, ...]:
    """A pipeline's command calling script ``name`` (its function)."""
    return ("FCALL", FUNCTIONS[name], len(keys), *keys, *args)


def function_missing(reply: Any) -> bool:
    """Whether ``reply`` says Redis lacks the library: it lost its data (a restart with
    no AOF or RDB), the library was deleted, or a primary joined the cluster since."""
    return isinstance(reply, ResponseError) and str(reply).startswith("Function not found")
