-- Pauses a provider fleet-wide: its pause key holds `<reason>: <message>`, and the probe lock starts now, so the
-- first probe call goes out one interval later.
-- KEYS[1] pause  KEYS[2] probe lock  ARGV[1] the pause's value  ARGV[2] its reason (`quota`, `auth`)
-- ARGV[3] probe interval (ms)
-- Returns 1 when this starts a pause (or changes its reason), 0 when the provider was already paused for the same
-- reason (a probe call failed).
local before = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
if before and string.sub(before, 1, #ARGV[2] + 1) == ARGV[2] .. ':' then
  return 0
end
return 1
