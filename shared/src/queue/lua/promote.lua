-- Moves delayed envelopes that are due (Redis clock) into the stream, at most `limit` per call.
-- Returns {moved, ms until the next one is due or -1}.
-- KEYS[1] delayed  KEYS[2] stream   ARGV[1] limit
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGE', KEYS[1], '-inf', now, 'BYSCORE', 'LIMIT', 0, ARGV[1])
for _, m in ipairs(due) do
  local j = cjson.decode(m)
  local f = {'id', j.id, 'p', j.p, 'a', j.a, 'e', j.e}
  if j.err then f[#f + 1] = 'err'; f[#f + 1] = j.err end
  redis.call('XADD', KEYS[2], '*', unpack(f))
  redis.call('ZREM', KEYS[1], m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = -1
if #nxt == 2 then wait = math.max(0, tonumber(nxt[2]) - now) end
return {#due, wait}
