-- The exact member count of one channel and at most ARGV[1] members (0: the count only).
-- KEYS[1] members hash. A capped list is a random subset (HRANDFIELD: O(max), not O(members)).
local n = redis.call('HLEN', KEYS[1])
local max = tonumber(ARGV[1])
if max == 0 or n == 0 then
  return {n, {}}
end
if n <= max then
  return {n, redis.call('HVALS', KEYS[1])}
end
local pairs = redis.call('HRANDFIELD', KEYS[1], max, 'WITHVALUES')
local values = {}
for i = 2, #pairs, 2 do
  values[#values + 1] = pairs[i]
end
return {n, values}
