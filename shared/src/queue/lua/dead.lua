-- Moves an entry this consumer owns to the dead letters (capped at maxlen, oldest dropped first).
-- The job id leaves the `live` set, so the same job can be pushed again, unless a push asked for it to run once
-- more (`again`): then it is added back with fresh attempts. Returns 0 when the entry is no longer ours.
-- KEYS[1] stream  KEYS[2] dead  KEYS[3] live  KEYS[4] again   ARGV[1] group  ARGV[2] consumer  ARGV[3] entry id  ARGV[4] maxlen  ARGV[5..] fields
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p ~= 1 or p[1][2] ~= ARGV[2] then return 0 end
local fields = {}
local job
for i = 5, #ARGV do
  fields[#fields + 1] = ARGV[i]
  if (i - 5) % 2 == 0 and ARGV[i] == 'id' then job = ARGV[i + 1] end
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
if job then
  local payload = redis.call('HGET', KEYS[4], job)
  if payload then
    redis.call('HDEL', KEYS[4], job)
    local t = redis.call('TIME')
    local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
    redis.call('XADD', KEYS[1], '*', 'id', job, 'p', payload, 'a', '0', 'e', now)
  else
    redis.call('SREM', KEYS[3], job)
  end
end
return 1
