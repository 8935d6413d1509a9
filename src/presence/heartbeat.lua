-- One node's heartbeat: pushes its expiry ahead and reports what the node must know.
-- KEYS[1] nodes zset (node id -> heartbeat expiry, ms, Redis clock), KEYS[2] this node's reap lock
-- ARGV[1] node id, ARGV[2] ms until the heartbeat expires
-- Returns {lost, being_reaped, dead node ids (at most 16)}: lost when the node was missing or
-- already expired (first beat, Redis restarted empty, or a lapse long enough to be reaped).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local lost = 0
if (not old) or tonumber(old) < now then
  lost = 1
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, 16)
return {lost, redis.call('EXISTS', KEYS[2]), dead}
