-- Reserves a call's cost from a fleet-wide budget of token buckets (one per dimension: requests, tokens, uploads).
-- A reservation may leave a bucket in debt: the caller then waits until the bucket has refilled to zero, so
-- waiting callers are served in the order they reserved and the refill rate is never exceeded.
-- KEYS[1] bucket hash  KEYS[2] cool-down (ms timestamp)  KEYS[3] provider pause  KEYS[4] provider probe lock
-- ARGV[1] longest wait to accept (ms)  ARGV[2] probe interval (ms)  ARGV[3] number of dimensions, then for each:
--   name, capacity, refill per ms, cost
-- Returns {status, wait_ms}: 1 reserved (send after wait_ms); 0 not reserved (the wait would be wait_ms);
-- 2 paused (next probe in wait_ms); 3 paused, and this caller is the probe.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[3]) == 1 then
  if redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[2]) then
    return {3, 0}
  end
  return {2, math.max(redis.call('PTTL', KEYS[4]), 0)}
end
local wait = 0
local cool = tonumber(redis.call('GET', KEYS[2]) or '0')
if cool > now then
  wait = cool - now
end
local n = tonumber(ARGV[3])
local levels = {}
for i = 0, n - 1 do
  local name = ARGV[4 + i * 4]
  local cap = tonumber(ARGV[5 + i * 4])
  local rate = tonumber(ARGV[6 + i * 4])
  local cost = tonumber(ARGV[7 + i * 4])
  local level = tonumber(redis.call('HGET', KEYS[1], name .. ':level') or cap)
  local ts = tonumber(redis.call('HGET', KEYS[1], name .. ':ts') or now)
  level = math.min(cap, level + math.max(now - ts, 0) * rate)
  local after = level - cost
  if after < 0 then
    local w = math.ceil(-after / rate)
    if w > wait then
      wait = w
    end
  end
  levels[#levels + 1] = {name, after}
end
if wait > tonumber(ARGV[1]) then
  return {0, wait}
end
for _, l in ipairs(levels) do
  redis.call('HSET', KEYS[1], l[1] .. ':level', tostring(l[2]), l[1] .. ':ts', tostring(now))
end
redis.call('PEXPIRE', KEYS[1], 86400000)
return {1, wait}
