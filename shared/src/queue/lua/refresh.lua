-- Keeps this consumer's claim on entries it is still working on (resets their idle time without counting a
-- delivery) and returns the ids it no longer owns.
-- KEYS[1] stream   ARGV[1] group  ARGV[2] consumer  ARGV[3..] entry ids
local lost = {}
local keep = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[2] then
    keep[#keep + 1] = ARGV[i]
  else
    lost[#lost + 1] = ARGV[i]
  end
end
if #keep > 0 then
  keep[#keep + 1] = 'JUSTID'
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(keep))
end
return lost
