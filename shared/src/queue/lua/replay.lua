-- Moves dead letters back to the queue with a fresh attempt count: the given ids, or up to `limit` of the
-- oldest when no id is given. Returns the number moved.
-- KEYS[1] dead  KEYS[2] stream   ARGV[1] limit  ARGV[2..] dead-letter entry ids (optional)
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
  local out = {'id', h['id'], 'p', h['p'], 'a', '0', 'e', now}
  if h['err'] then out[#out + 1] = 'err'; out[#out + 1] = h['err'] end
  redis.call('XADD', KEYS[2], '*', unpack(out))
  redis.call('XDEL', KEYS[1], e[1])
end
return #entries
