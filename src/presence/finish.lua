-- Ends a reap: forgets the dead node once its index is empty (unless it came back meanwhile)
-- and releases the lock if it is still ours.
-- KEYS[1] nodes zset, KEYS[2] the node's reap lock, KEYS[3] the node's channel index
-- ARGV[1] dead node, ARGV[2] lock token
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('SCARD', KEYS[3]) == 0 then
  local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if score and tonumber(score) < now then
    redis.call('ZREM', KEYS[1], ARGV[1])
  end
end
if redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('DEL', KEYS[2])
end
return 1
