-- Schedules another attempt of an entry this consumer owns: the envelope goes to the delayed set, due after
-- delay_ms (Redis clock), and the entry leaves the stream. Returns 0 when the entry is no longer ours.
-- KEYS[1] stream  KEYS[2] delayed   ARGV[1] group  ARGV[2] consumer  ARGV[3] entry id  ARGV[4] delay_ms  ARGV[5] envelope
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p ~= 1 or p[1][2] ~= ARGV[2] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
