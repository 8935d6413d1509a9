-- Takes the lock to reap a dead node, if its heartbeat is still expired and nobody holds it.
-- KEYS[1] nodes zset, KEYS[2] the dead node's reap lock; ARGV[1] dead node, ARGV[2] lock token,
-- ARGV[3] lock ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not score) or tonumber(score) >= now then
  return 0
end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then
  return 0
end
return 1
