-- Ends a request's time in flight (see acquire.lua): takes its reservation out of the in-flight log and, when it
-- was sent, logs what it cost in the answered log at now, when its answer is back (or it failed). The provider
-- counted it from its arrival, somewhere between the two, so the logs count it at least as long as the provider's
-- window does, however late the request went out.
-- KEYS[1] answered log (hash: `<name>:<slot mod ring>` = `<slot>:<units>`)  KEYS[2] in flight (hash:
-- `<name>:<slot>` = units)
-- ARGV[1] the time the request was allowed to go (ms, Redis time)  ARGV[2] number of dimensions, then for each:
-- name, the logs' slot (ms), the ring's length (slots), units reserved, units to log as answered (0: it was
-- never sent)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local granted = tonumber(ARGV[1])
local n = tonumber(ARGV[2])

for i = 0, n - 1 do
  local at = 3 + i * 5
  local name = ARGV[at]
  local slot = tonumber(ARGV[at + 1])
  local ring = tonumber(ARGV[at + 2])
  local reserved = tonumber(ARGV[at + 3])
  local units = tonumber(ARGV[at + 4])
  local from = math.floor(granted / slot)
  local flying = name .. ':' .. from
  if reserved > 0 and redis.call('HEXISTS', KEYS[2], flying) == 1 then
    local left = tonumber(redis.call('HINCRBYFLOAT', KEYS[2], flying, -reserved))
    if left <= 1e-9 then
      redis.call('HDEL', KEYS[2], flying)
    end
  end
  if units > 0 then
    local to = math.max(math.floor(now / slot), from)
    local field = name .. ':' .. (to % ring)
    local v = redis.call('HGET', KEYS[1], field)
    if v then
      local old, u = string.match(v, '^(%-?%d+):(.+)$')
      if tonumber(old) == to then
        units = units + tonumber(u)
      end
    end
    redis.call('HSET', KEYS[1], field, to .. ':' .. units)
  end
end
redis.call('PEXPIRE', KEYS[1], 86400000)
return 1
