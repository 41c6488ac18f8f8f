-- Reads the state of one queue: {pending, in_flight, delayed, dead, oldest pending age ms or -1, consumers}.
-- Acknowledged entries are deleted, so the stream holds exactly the pending and in-flight entries.
-- KEYS[1] stream  KEYS[2] delayed  KEYS[3] dead   ARGV[1] group
local len = redis.call('XLEN', KEYS[1])
local delayed = redis.call('ZCARD', KEYS[2])
local dead = redis.call('XLEN', KEYS[3])
local inflight = 0
local consumers = 0
local last = nil
if len > 0 then
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
  if ok then
    for _, g in ipairs(groups) do
      local h = {}
      for k = 1, #g, 2 do h[g[k]] = g[k + 1] end
      if h['name'] == ARGV[1] then
        inflight = h['pending']
        consumers = h['consumers']
        last = h['last-delivered-id']
      end
    end
  end
end
local age = -1
if len > inflight then
  local first
  if last then
    first = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
  else
    first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  end
  if #first == 1 then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local ms = tonumber(string.match(first[1][1], '^(%d+)-'))
    age = math.max(0, now - ms)
  end
end
return {len - inflight, inflight, delayed, dead, age, consumers}
