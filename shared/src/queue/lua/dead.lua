-- Moves an entry this consumer owns to the dead letters (capped at maxlen, oldest dropped first).
-- Returns 0 when the entry is no longer ours.
-- KEYS[1] stream  KEYS[2] dead   ARGV[1] group  ARGV[2] consumer  ARGV[3] entry id  ARGV[4] maxlen  ARGV[5..] fields
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p ~= 1 or p[1][2] ~= ARGV[2] then return 0 end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
