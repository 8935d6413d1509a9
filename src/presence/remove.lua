-- Removes members of one channel; each one that was present is announced with its stored JSON.
-- KEYS[1] members hash
-- ARGV[1] events channel, ARGV[2] the channel name as a JSON string, then conn_ids
local leaves = 0
for i = 3, #ARGV do
  local json = redis.call('HGET', KEYS[1], ARGV[i])
  if json then
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('PUBLISH', ARGV[1],
      '{"type":"leave","channel":' .. ARGV[2] .. ',"member":' .. json .. '}')
    leaves = leaves + 1
  end
end
return leaves
