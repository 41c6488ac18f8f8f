-- Gives entries this consumer holds back to the queue at once (graceful shutdown): each is added again at the
-- tail, its attempt count raised by the deliveries that did not finish, and the old entry acknowledged and
-- deleted. With no ids, releases everything the consumer owns and then removes the consumer.
-- Returns the number of entries released.
-- KEYS[1] stream   ARGV[1] group  ARGV[2] consumer  ARGV[3..] entry ids (optional)
local ids = {}
if #ARGV > 2 then
  for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
  local ok, pel = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 10000, ARGV[2])
  if not ok then return 0 end
  for _, p in ipairs(pel) do ids[#ids + 1] = p[1] end
end
local n = 0
for _, id in ipairs(ids) do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #p == 1 and p[1][2] == ARGV[2] then
    local e = redis.call('XRANGE', KEYS[1], id, id)
    if #e == 1 then
      local f = e[1][2]
      for k = 1, #f, 2 do
        if f[k] == 'a' then f[k + 1] = tostring(tonumber(f[k + 1]) + p[1][4] - 1) end
      end
      redis.call('XADD', KEYS[1], '*', unpack(f))
    end
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('XDEL', KEYS[1], id)
    n = n + 1
  end
end
if #ARGV == 2 then
  local left = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
  if #left == 0 then redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end
end
return n
