-- Removes one dead node's members from one channel, announcing each with its stored JSON.
-- KEYS[1] members hash; ARGV[1] events channel, ARGV[2] the channel name as a JSON string,
-- ARGV[3] the node id as a JSON string followed by ',"user":'
-- A member's JSON starts {"conn_id":"..","node":..: the first '","node":' is the real field
-- (inside a JSON string a quote is escaped), so the match never looks into `info`.
local all = redis.call('HGETALL', KEYS[1])
local want = ARGV[3]
local leaves = 0
for i = 1, #all, 2 do
  local json = all[i + 1]
  local at = string.find(json, '","node":', 1, true)
  if at and string.sub(json, at + 9, at + 8 + #want) == want then
    redis.call('HDEL', KEYS[1], all[i])
    redis.call('PUBLISH', ARGV[1],
      '{"type":"leave","channel":' .. ARGV[2] .. ',"member":' .. json .. '}')
    leaves = leaves + 1
  end
end
return leaves
