-- Sets a fleet-wide cool-down of ARGV[1] ms on a budget, unless a longer one is already running.
-- KEYS[1] cool-down key (holds the ms timestamp it ends at)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if now + ms > current then
  redis.call('SET', KEYS[1], tostring(now + ms), 'PX', ms)
  return 1
end
return 0
