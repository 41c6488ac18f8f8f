-- Corrects one dimension of a budget after the answer: gives back what was over-estimated (or takes what was
-- under-estimated), and never lets the bucket believe in more than the provider said remains.
-- KEYS[1] bucket hash  ARGV[1] name  ARGV[2] capacity  ARGV[3] refill per ms  ARGV[4] delta (+ gives back)
-- ARGV[5] the provider's remaining count, or -1 when it did not say
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local name = ARGV[1]
local cap = tonumber(ARGV[2])
local level = tonumber(redis.call('HGET', KEYS[1], name .. ':level') or cap)
local ts = tonumber(redis.call('HGET', KEYS[1], name .. ':ts') or now)
level = math.min(cap, level + math.max(now - ts, 0) * tonumber(ARGV[3]))
level = math.min(cap, level + tonumber(ARGV[4]))
local remaining = tonumber(ARGV[5])
if remaining >= 0 and level > remaining then
  level = remaining
end
redis.call('HSET', KEYS[1], name .. ':level', tostring(level), name .. ':ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], 86400000)
return 1
