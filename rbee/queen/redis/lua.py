"""The Lua scripts the redis store runs: each one write (or one consistent read) done atomically
inside Redis, so queens never see a hive half-written and never race one another.

Keys (``KEYS[n]`` below, all under ``<key_prefix>:``, in the order of ``keys.RedisKeys``): 1
``hives``, a hash of each hive's last whole heartbeat (msgpack); 2 ``seen``, a sorted set of each hive's
last heartbeat time in ms on Redis's own clock (the ms part of its stream entry id); 3 ``stale``,
the set of hives judged stale; 4 ``stream``, the Redis Stream of events, fields ``k`` (``hb``: a
whole heartbeat, msgpack; ``dl``: a channel's delta, msgpack, with ``h`` and ``b``; ``ev``: an
event's JSON) and ``d``; 5 ``sweeper``, the lease of the queen that sweeps; 6 ``first``, a sorted
set of the time each hive was first seen (ms), which tells established hives
(``established_after_s``) for the mass-silence guard; 7 ``last``, a hash of the id of each hive's
newest heartbeat entry; 8 ``whole``, a hash of the id of the entry each record comes from.
"""

from __future__ import annotations

HEARTBEATS = """
local ids = {}
for i = 2, #ARGV, 3 do
  local hive, kind, data = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local id = false
  if kind == 'hb' then
    id = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[1], '*', 'k', 'hb', 'd', data)
    redis.call('HSET', KEYS[1], hive, data)
    redis.call('HSET', KEYS[8], hive, id)
  elseif redis.call('HEXISTS', KEYS[1], hive) == 1 then
    local base = redis.call('HGET', KEYS[7], hive) or '0-0'
    id = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[1], '*', 'k', 'dl', 'h', hive,
                    'b', base, 'd', data)
  end
  if id then
    redis.call('HSET', KEYS[7], hive, id)
    local ms = tonumber(string.match(id, '^(%d+)'))
    redis.call('ZADD', KEYS[2], ms, hive)
    redis.call('ZADD', KEYS[6], 'NX', ms, hive)
    redis.call('SREM', KEYS[3], hive)
  end
  ids[#ids + 1] = id
end
return ids
"""
"""A batch of heartbeats, in order, each: its stream entry, its time of receipt, its stale flag
cleared. A whole one (``hb``: a POST, a channel's snapshot) replaces the hive's record; a delta
(``dl``) is only an entry, naming the hive (``h``) and the entry it applies to (``b``, the hive's
newest before it), so its record stays as of its last whole heartbeat, written again with each
snapshot (``channel.snapshot_every_s``). ARGV: MAXLEN, then (hive id, ``hb`` or ``dl``, msgpack)
for each. Returns the entry ids, in order; false for a delta of a hive Redis holds no record of
(removed, or Redis restarted empty): its channel must send a snapshot."""

REMOVE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return false end
redis.call('HDEL', KEYS[7], ARGV[1])
redis.call('HDEL', KEYS[8], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
return redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'k', 'ev', 'd', ARGV[2])
"""
"""A hive removed (it said goodbye, or an operator asked). ARGV: hive id, the removal event's
JSON, MAXLEN. Returns the entry id, or nil for a hive Redis does not hold."""

SILENCES = """
local t = redis.call('TIME')
return {tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000),
        redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES'), redis.call('SMEMBERS', KEYS[3]),
        redis.call('ZRANGE', KEYS[6], 0, -1, 'WITHSCORES')}
"""
"""What the sweeper judges: Redis's time now (ms), every hive's last heartbeat time, the stale
set, every hive's first heartbeat time."""

SWEEP = """
if redis.call('GET', KEYS[5]) ~= ARGV[1] then return -1 end
local stale_count = tonumber(ARGV[3])
local done = 0
local i = 4
local function still_silent(hive, seen)
  local score = redis.call('ZSCORE', KEYS[2], hive)
  return score and tonumber(score) <= tonumber(seen)
end
for _ = 1, stale_count do
  local hive, seen, event = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  i = i + 3
  if still_silent(hive, seen) and redis.call('SADD', KEYS[3], hive) == 1 then
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'k', 'ev', 'd', event)
    done = done + 1
  end
end
while i <= #ARGV do
  local hive, seen, event = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  i = i + 3
  if still_silent(hive, seen) then
    redis.call('HDEL', KEYS[1], hive)
    redis.call('HDEL', KEYS[7], hive)
    redis.call('HDEL', KEYS[8], hive)
    redis.call('ZREM', KEYS[2], hive)
    redis.call('ZREM', KEYS[6], hive)
    redis.call('SREM', KEYS[3], hive)
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'k', 'ev', 'd', event)
    done = done + 1
  end
end
return done
"""
"""The sweeper's verdicts, applied only while it holds the lease and only to hives that sent no
heartbeat since it read their silence. ARGV: lease token, MAXLEN, the number of stale marks,
then (hive, last seen ms, event JSON) for each stale mark, then for each removal. Returns how
many were applied, or -1 when the lease is no longer this queen's."""

SNAPSHOT = """
local last = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
local id = '0-0'
if #last > 0 then id = last[1][1] end
return {id, redis.call('HGETALL', KEYS[1]), redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES'),
        redis.call('SMEMBERS', KEYS[3]), redis.call('HGETALL', KEYS[8])}
"""
"""The whole fleet as of one stream entry: a queen's mirror starts (or restarts) from it and
follows the stream after that id. Each record comes with the id of its entry (``whole``)."""

RECORD = """
return {redis.call('HGET', KEYS[1], ARGV[1]), redis.call('HGET', KEYS[8], ARGV[1]),
        redis.call('ZSCORE', KEYS[2], ARGV[1]), redis.call('SISMEMBER', KEYS[3], ARGV[1])}
"""
"""One hive's record as Redis holds it, for a mirror that missed what a delta applies to: the
record (nil for a hive removed), the id of its entry, its last heartbeat time (ms), whether it
is stale. ARGV: hive id."""

RENEW = """
if redis.call('GET', KEYS[5]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[5], ARGV[2]) end
return 0
"""
"""Renew the sweeper's lease if it is still this queen's (ARGV: token, ms); 1 if renewed."""

RELEASE = """
if redis.call('GET', KEYS[5]) == ARGV[1] then return redis.call('DEL', KEYS[5]) end
return 0
"""
"""Give the lease up at a clean stop, so another queen sweeps at once."""
