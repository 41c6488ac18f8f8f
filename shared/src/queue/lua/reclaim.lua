-- Claims up to `count` entries that other consumers left idle for at least min_idle_ms and returns them with
-- their delivery counts. At most one suspect (an entry that would reach suspect_deliveries) is claimed per call:
-- suspects run alone, so the others must not sit in the buffer of a process a suspect may crash.
-- KEYS[1] stream   ARGV[1] group  ARGV[2] consumer  ARGV[3] min_idle_ms  ARGV[4] count  ARGV[5] suspect_deliveries
local count = tonumber(ARGV[4])
local suspect_from = tonumber(ARGV[5])
local pel = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', count * 4)
local ids, deliveries = {}, {}
local suspect = false
for _, p in ipairs(pel) do
  if #ids >= count then break end
  local n = p[4] + 1
  if n < suspect_from or not suspect then
    if n >= suspect_from then suspect = true end
    ids[#ids + 1] = p[1]
    deliveries[p[1]] = n
  end
end
if #ids == 0 then return {} end
local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], unpack(ids))
local out = {}
for _, e in ipairs(claimed) do
  if type(e) == 'table' and type(e[2]) == 'table' then
    out[#out + 1] = {e[1], e[2], deliveries[e[1]]}
  end
end
return out
