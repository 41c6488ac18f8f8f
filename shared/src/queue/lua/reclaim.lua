-- Claims entries another consumer left idle for at least min_idle_ms and returns them with their delivery counts.
-- KEYS[1] stream   ARGV[1] group  ARGV[2] consumer  ARGV[3] min_idle_ms  ARGV[4] count
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', ARGV[4])
local out = {}
for _, e in ipairs(r[2]) do
  if type(e) == 'table' and type(e[2]) == 'table' then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    local n = 1
    if #p == 1 then n = p[1][4] end
    out[#out + 1] = {e[1], e[2], n}
  end
end
return out
