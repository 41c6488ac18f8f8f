-- Pushes jobs, each at most once: a job id already waiting, in flight or delayed (in the `live` set) is not added
-- again, so pushing the same job again (the reconciler, a redelivered stage) never duplicates live work. With
-- mode `again` (work that must run after the live copy, such as a retry of a failed document), a live id is
-- marked instead, and runs once more when its live copy is acknowledged or dead-lettered.
-- Returns the ids that were added.
-- KEYS[1] stream  KEYS[2] live  KEYS[3] again   ARGV[1] enqueue time (ms)  ARGV[2] mode (`once` or `again`)
-- ARGV[3..] job id, payload, job id, payload, ...
local added = {}
for i = 3, #ARGV, 2 do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[1], '*', 'id', ARGV[i], 'p', ARGV[i + 1], 'a', '0', 'e', ARGV[1])
    added[#added + 1] = ARGV[i]
  elseif ARGV[2] == 'again' then
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  end
end
return added
