-- Moves dead letters back to the queue with a fresh attempt count: the given ids, or up to `limit` of the
-- oldest when no id is given. A dead letter whose job was pushed again meanwhile (its id is live) is only removed,
-- so a replay never runs a job twice. Returns the number of dead letters taken.
-- KEYS[1] dead  KEYS[2] stream  KEYS[3] live   ARGV[1] limit  ARGV[2..] dead-letter entry ids (optional)
local entries = {}
if #ARGV > 1 then
  for i = 2, #ARGV do
    local e = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
    if #e == 1 then entries[#entries + 1] = e[1] end
  end
else
  entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[1])
end
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
for _, e in ipairs(entries) do
  local h = {}
  local f = e[2]
  for k = 1, #f, 2 do h[f[k]] = f[k + 1] end
  local id = h['id'] or e[1]
  local out = {'id', id, 'p', h['p'] or '', 'a', '0', 'e', now}
  if h['err'] then out[#out + 1] = 'err'; out[#out + 1] = h['err'] end
  if redis.call('SADD', KEYS[3], id) == 1 then
    redis.call('XADD', KEYS[2], '*', unpack(out))
  end
  redis.call('XDEL', KEYS[1], e[1])
end
return #entries
