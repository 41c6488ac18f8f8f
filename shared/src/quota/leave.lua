-- A caller gives its place in line up (its call ended or was dropped): its ticket leaves the line, and a grant
-- made for it that it never picked up goes back out of the in-flight log (see acquire.lua).
-- KEYS[1] line  KEYS[2] asks  KEYS[3] in flight
-- ARGV[1] the ticket  ARGV[2] number of dimensions, then for each: name, the logs' slot (ms)
local id = ARGV[1]
local grant = redis.call('HGET', KEYS[2], 'at:' .. id)
local asked = redis.call('HGET', KEYS[2], id)
if grant and asked then
  local slots = {}
  for i = 0, tonumber(ARGV[2]) - 1 do
    slots[ARGV[3 + i * 2]] = tonumber(ARGV[4 + i * 2])
  end
  for name, cost in string.gmatch(asked, '([^=,]+)=([^,]+)') do
    local slot = slots[name]
    if slot then
      local field = name .. ':' .. math.floor(tonumber(grant) / slot)
      if redis.call('HEXISTS', KEYS[3], field) == 1 then
        local left = tonumber(redis.call('HINCRBYFLOAT', KEYS[3], field, -tonumber(cost)))
        if left <= 1e-9 then
          redis.call('HDEL', KEYS[3], field)
        end
      end
    end
  end
end
redis.call('ZREM', KEYS[1], id)
redis.call('HDEL', KEYS[2], id, 'at:' .. id)
return 1
