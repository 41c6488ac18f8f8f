-- Acknowledges finished entries this consumer still owns: each leaves the stream, and its job id leaves the `live`
-- set, unless a push asked for the job to run once more meanwhile (`again`): then it is added back at the tail and
-- stays live. An entry another consumer took over is left to that consumer; one that is not pending (acknowledged
-- before, or undelivered again after Redis lost its last writes) stays, to be delivered and acknowledged by its
-- next run.
-- KEYS[1] stream  KEYS[2] live  KEYS[3] again   ARGV[1] group  ARGV[2] consumer  ARGV[3] enqueue time (ms)
-- ARGV[4..] entry id, job id, entry id, job id, ...
for i = 4, #ARGV, 2 do
  local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if ok and #p == 1 and p[1][2] == ARGV[2] then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
    local payload = redis.call('HGET', KEYS[3], ARGV[i + 1])
    if payload then
      redis.call('HDEL', KEYS[3], ARGV[i + 1])
      redis.call('XADD', KEYS[1], '*', 'id', ARGV[i + 1], 'p', payload, 'a', '0', 'e', ARGV[3])
    else
      redis.call('SREM', KEYS[2], ARGV[i + 1])
    end
  end
end
return 1
