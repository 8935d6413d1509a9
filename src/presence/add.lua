-- Adds (or re-adds) members of one channel and pushes their expiry TTL ahead.
-- KEYS[1] members hash (conn_id -> member JSON), KEYS[2] expiry zset (conn_id -> ms)
-- ARGV[1] ttl in ms, then pairs: conn_id, member JSON
-- Expiry uses Redis's clock, so nodes with skewed clocks agree.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
