-- Lists the live members of one channel after removing the expired ones (a crashed node's).
-- KEYS[1] members hash, KEYS[2] expiry zset
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for i = 1, #expired, 1000 do
  redis.call('HDEL', KEYS[1], unpack(expired, i, math.min(i + 999, #expired)))
end
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
end
return redis.call('HVALS', KEYS[1])
