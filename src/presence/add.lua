-- Adds (or re-adds) members of one channel; each one that was not present is announced.
-- KEYS[1] members hash (conn_id -> member JSON)
-- ARGV[1] events channel, ARGV[2] the channel name as a JSON string, then pairs conn_id, JSON
local joins = 0
for i = 3, #ARGV, 2 do
  if redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('PUBLISH', ARGV[1],
      '{"type":"join","channel":' .. ARGV[2] .. ',"member":' .. ARGV[i + 1] .. '}')
    joins = joins + 1
  end
end
return joins
