-- Pushes one job that becomes runnable after delay_ms (Redis clock), unless its id is already live.
-- Returns 1 when added, 0 when the job was already waiting, in flight or delayed.
-- KEYS[1] delayed  KEYS[2] live   ARGV[1] job id  ARGV[2] delay_ms  ARGV[3] envelope
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[2]), ARGV[3])
return 1
