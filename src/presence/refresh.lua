-- Keeps members of one channel alive, but only those still present: a member removed by an
-- unsubscribe that raced with this refresh must not come back as a ghost.
-- KEYS[1] members hash, KEYS[2] expiry zset; ARGV[1] ttl in ms, then conn_ids
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local alive = 0
for i = 2, #ARGV do
  if redis.call('ZADD', KEYS[2], 'XX', 'CH', now + ttl, ARGV[i]) == 1 then
    alive = alive + 1
  end
end
if alive > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return alive
