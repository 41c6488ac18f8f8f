-- Which of the given job ids are live (waiting, in flight or delayed): 1 or 0 for each, in order.
-- KEYS[1] live   ARGV[1..] job ids
local out = {}
for i = 1, #ARGV do out[i] = redis.call('SISMEMBER', KEYS[1], ARGV[i]) end
return out
