-- Reserves a request's cost from a fleet-wide budget of token buckets (one per dimension: requests, tokens,
-- uploads), serving callers in the order they came.
--
-- A request goes when its bucket holds its cost (a request larger than the bucket's burst: when the bucket is
-- full, leaving it in debt, which whoever comes next waits out) and when the provider's sliding window has room
-- for it. The window is read from two logs. A reserved request is in flight (KEYS[8], `<name>:<slot>` = units,
-- at the slot it may go in) and counts in every window until its answer is back, when `restamp.lua` moves it to
-- the answered log at that time (KEYS[7], a ring of fields `<name>:<slot mod ring>` = `<slot>:<units>`). The
-- provider counts a request from its arrival, between the two, so however late it went out (a starved process, a
-- slow connection) the logs count it at least as long as the provider does: of any two requests that arrive
-- within one window, the one reserved later counted the other. The bucket alone would keep a window within the
-- limit only if every request arrived when it was allowed to. A request in flight longer than its window plus
-- its provider's request timeout is no longer counted (a replica killed mid-call); a grant its holder never
-- picked up is taken back when its ticket lapses. A reservation is made at most ARGV[7] ms before the request
-- may go; the caller sleeps until then.
--
-- Callers that cannot reserve now wait in line: each holds a ticket (a number from the bucket's sequence) in a
-- sorted set scored by the end of the ticket's lease, with what it asks for in a hash. Reservations are made in
-- ticket order only, so a large request is never starved by small ones: every ask walks the line from its oldest
-- ticket and reserves for each whose turn has come (a grant, `at:<ticket>` = when it may send, which its holder
-- picks up when it next asks), up to the first that must wait longer. A ticket lapses when its holder stops asking
-- (a killed replica), its grant with it. A call sent in parts asks with the ticket it was given and so keeps (or
-- takes back) its place; with ARGV[6] = 1 its ticket stays in line after a reservation, asking for nothing while
-- the part is sent (SENDING ms more), and nobody passes it.
--
-- KEYS[1] bucket hash (levels, sequence)  KEYS[2] cool-down (ms timestamp)  KEYS[3] provider pause (its reason)
-- KEYS[4] provider probe lock  KEYS[5] line (sorted set: ticket -> lease end, ms)  KEYS[6] asks (hash: ticket ->
-- `name=cost,...`; `at:<ticket>` -> grant)  KEYS[7] answered log  KEYS[8] in flight (hashes, see above)
-- ARGV[1] longest wait the caller reserves at (ms)  ARGV[2] longest wait it stays in line for (ms)
-- ARGV[3] probe interval (ms)  ARGV[4] ticket lease (ms)  ARGV[5] the caller's ticket (0: none)
-- ARGV[6] 1: another part follows this request  ARGV[7] the look-ahead: longest wait anyone reserves at (ms)
-- ARGV[8] number of dimensions, then for each: name, capacity, refill per ms, cost, the provider's limit, its
-- window (ms), the logs' slot (ms), the ring's length (slots), how many slots past the window the answered log
-- still counts, how long a request may be in flight (ms)
-- Returns {status, wait_ms, ticket, pause reason, at}:
--   1 reserved: send after wait_ms, at `at` (ms, Redis time: what restamp.lua moves); `ticket` is the caller's
--   place for its next part
--   0 not reserved: the caller's turn is wait_ms away, beyond ARGV[2]; it left the line
--   4 in line with `ticket`: its turn comes in about wait_ms; ask again before the lease ends
--   2 paused (`reason`; the next probe in wait_ms)  3 paused (`reason`), and this caller is the probe
local SENDING = 5000
-- The turn announced to a caller while the requests in flight alone leave no room: it asks again within that.
local IN_FLIGHT = 500
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mine = tonumber(ARGV[5])
local lease = tonumber(ARGV[4])
local look_ahead = tonumber(ARGV[7])

local n = tonumber(ARGV[8])
local dims = {}
local by_name = {}
local mine_costs = {}
local asked_text = {}
for i = 0, n - 1 do
  local at = 9 + i * 10
  local name = ARGV[at]
  local cap = tonumber(ARGV[at + 1])
  local rate = tonumber(ARGV[at + 2])
  local level = tonumber(redis.call('HGET', KEYS[1], name .. ':level') or cap)
  local ts = tonumber(redis.call('HGET', KEYS[1], name .. ':ts') or now)
  level = math.min(cap, level + math.max(now - ts, 0) * rate)
  local d = {
    name = name, cap = cap, rate = rate, level = level, limit = tonumber(ARGV[at + 4]),
    window = tonumber(ARGV[at + 5]), slot = tonumber(ARGV[at + 6]), ring = tonumber(ARGV[at + 7]),
    late = tonumber(ARGV[at + 8]), flight = tonumber(ARGV[at + 9]), ahead = 0,
  }
  dims[#dims + 1] = d
  by_name[name] = d
  mine_costs[name] = tonumber(ARGV[at + 3])
  asked_text[#asked_text + 1] = name .. '=' .. ARGV[at + 3]
end

local function parse(asked)
  local costs = {}
  for name, cost in string.gmatch(asked, '([^=,]+)=([^,]+)') do
    costs[name] = tonumber(cost)
  end
  return costs
end

-- The requests in flight per dimension (read once per call; `record` keeps it up to date); entries past their
-- time are dropped.
local flying
local function in_flight()
  if flying then
    return flying
  end
  flying = {}
  local all = redis.call('HGETALL', KEYS[8])
  for i = 1, #all, 2 do
    local name, s = string.match(all[i], '^(.+):(%-?%d+)$')
    local d = name and by_name[name]
    if d then
      if (tonumber(s) + 1) * d.slot + d.window + d.flight < now then
        redis.call('HDEL', KEYS[8], all[i])
      else
        flying[name] = (flying[name] or 0) + tonumber(all[i + 1])
      end
    end
  end
  return flying
end

-- Takes back what a ticket's grant reserved, if it has one its holder never picked up.
local function take_back(id)
  local grant = redis.call('HGET', KEYS[6], 'at:' .. id)
  local asked = redis.call('HGET', KEYS[6], id)
  if not (grant and asked) then
    return
  end
  local f = in_flight()
  for name, cost in pairs(parse(asked)) do
    local d = by_name[name]
    if d then
      local field = name .. ':' .. math.floor(tonumber(grant) / d.slot)
      if redis.call('HEXISTS', KEYS[8], field) == 1 then
        local left = tonumber(redis.call('HINCRBYFLOAT', KEYS[8], field, -cost))
        if left <= 1e-9 then
          redis.call('HDEL', KEYS[8], field)
        end
        f[name] = math.max((f[name] or 0) - cost, 0)
      end
    end
  end
end

local function forget(id)
  redis.call('ZREM', KEYS[5], id)
  redis.call('HDEL', KEYS[6], id, 'at:' .. id)
end
-- Leaves the line, giving back a grant not picked up yet.
local function leave()
  if mine > 0 then
    take_back(tostring(mine))
    forget(tostring(mine))
  end
end

local reason = redis.call('GET', KEYS[3])
if reason then
  leave()
  if redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[3]) then
    return {3, 0, 0, reason, 0}
  end
  return {2, math.max(redis.call('PTTL', KEYS[4]), 0), 0, reason, 0}
end

-- Tickets whose holders stopped asking leave the line, and their grants go back.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now)) do
  take_back(id)
  forget(id)
end

local floor = 0
local cool = tonumber(redis.call('GET', KEYS[2]) or '0')
if cool > now then
  floor = cool - now
end

-- The answered log of a dimension: {slot, units} of the slots that may still be in a window, oldest first. Read
-- once per call.
local function answered(d)
  if d.log then
    return d.log
  end
  local fields = {}
  for i = 0, d.ring - 1 do
    fields[#fields + 1] = d.name .. ':' .. i
  end
  local oldest = math.floor((now - d.window) / d.slot) - d.late
  local log = {}
  for _, v in ipairs(redis.call('HMGET', KEYS[7], unpack(fields))) do
    if v then
      local s, units = string.match(v, '^(%-?%d+):(.+)$')
      s = tonumber(s)
      if s and s >= oldest then
        log[#log + 1] = {s, tonumber(units)}
      end
    end
  end
  table.sort(log, function(a, b) return a[1] < b[1] end)
  d.log = log
  return log
end

-- The earliest time from `at` on when the window ending then has room for `cost` more, counting every request in
-- flight (it may arrive at any moment until it is answered); nil when those alone leave no room.
local function room(d, cost, at)
  local total = in_flight()[d.name] or 0
  if total + cost > d.limit then
    return nil
  end
  local log = answered(d)
  local from = math.floor((at - d.window) / d.slot) - d.late
  for _, e in ipairs(log) do
    if e[1] >= from then
      total = total + e[2]
    end
  end
  for _, e in ipairs(log) do
    if total + cost <= d.limit then
      break
    end
    if e[1] >= from then
      total = total - e[2]
      at = math.max(at, (e[1] + 1 + d.late) * d.slot + d.window)
    end
  end
  return at
end

-- Logs a reservation allowed at `at` as in flight, until restamp.lua moves it.
local function record(d, cost, at)
  local f = in_flight()
  redis.call('HINCRBYFLOAT', KEYS[8], d.name .. ':' .. math.floor(at / d.slot), cost)
  f[d.name] = (f[d.name] or 0) + cost
end

-- How long a request of `costs` waits from now: until each bucket holds what it needs (the whole burst, for a
-- request larger than it), and until the window has room. nil when the requests in flight leave no room yet.
-- Past `horizon` the answer is only that: it is not reserved, and the window is not looked at.
local function wait_of(costs, horizon)
  local w = floor
  for _, d in ipairs(dims) do
    local c = costs[d.name]
    if c then
      local x = math.ceil((math.min(c, d.cap) - d.level) / d.rate)
      if x > w then
        w = x
      end
    end
  end
  if w > horizon then
    return w
  end
  local at = now + w
  for _, d in ipairs(dims) do
    local c = costs[d.name]
    if c then
      local r = room(d, c, now + w)
      if not r then
        return nil
      end
      at = math.max(at, r)
    end
  end
  return at - now
end

local reserved = false
local function reserve(costs, w)
  for _, d in ipairs(dims) do
    local c = costs[d.name]
    if c then
      d.level = d.level - c
      record(d, c, now + w)
    end
  end
  reserved = true
end

-- Walk the line in ticket order, the caller in its place (a newcomer last).
local me = mine
if me == 0 then
  me = math.huge
end
local order = {me}
for _, id in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  local other = tonumber(id)
  if other and other ~= mine then
    order[#order + 1] = other
  end
end
table.sort(order)

local blocked = false
local first = false
local status = 4
local wait = 0
local granted = 0
for _, ticket in ipairs(order) do
  if ticket == me then
    local grant = mine > 0 and redis.call('HGET', KEYS[6], 'at:' .. mine)
    if grant then
      granted = tonumber(grant)
      status, wait = 1, math.max(granted - now, 0)
    elseif not blocked then
      first = true
      wait = wait_of(mine_costs, tonumber(ARGV[1]))
      if not wait then
        -- No room until requests in flight are answered: ask again shortly.
        wait = IN_FLIGHT
        blocked = true
      elseif wait <= tonumber(ARGV[1]) then
        reserve(mine_costs, wait)
        status, granted = 1, now + wait
      else
        blocked = true
      end
    end
    if status ~= 1 then
      break
    end
  else
    local id = tostring(ticket)
    if redis.call('HEXISTS', KEYS[6], 'at:' .. id) == 0 then
      local asked = redis.call('HGET', KEYS[6], id)
      if not blocked and asked then
        local costs = parse(asked)
        local w = wait_of(costs, look_ahead)
        if w and w <= look_ahead then
          reserve(costs, w)
          redis.call('HSET', KEYS[6], 'at:' .. id, now + w)
          redis.call('ZADD', KEYS[5], now + w + lease, id)
        else
          blocked = true
        end
      else
        -- A part being sent asks for nothing yet and keeps its place: nobody passes it.
        blocked = true
      end
      if blocked and ticket > me then
        break
      end
      if blocked and asked then
        for name, cost in pairs(parse(asked)) do
          for _, d in ipairs(dims) do
            if d.name == name then
              d.ahead = d.ahead + cost
            end
          end
        end
      end
    end
  end
end

if reserved then
  for _, d in ipairs(dims) do
    redis.call('HSET', KEYS[1], d.name .. ':level', tostring(d.level), d.name .. ':ts', tostring(now))
  end
  redis.call('PEXPIRE', KEYS[1], 86400000)
  redis.call('PEXPIRE', KEYS[7], 86400000)
  redis.call('PEXPIRE', KEYS[8], 86400000)
end

local function hold(asks, ms)
  if mine == 0 then
    mine = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  end
  local id = tostring(mine)
  redis.call('ZADD', KEYS[5], now + ms, id)
  redis.call('HDEL', KEYS[6], 'at:' .. id)
  if asks == '' then
    redis.call('HDEL', KEYS[6], id)
  else
    redis.call('HSET', KEYS[6], id, asks)
  end
  redis.call('PEXPIRE', KEYS[5], 86400000)
  redis.call('PEXPIRE', KEYS[6], 86400000)
end

if status == 1 then
  if ARGV[6] == '1' then
    -- Its place stays first in line for the next part, whose cost is not known yet.
    hold('', wait + SENDING)
  elseif mine > 0 then
    -- Its grant is picked up: the request is in flight now.
    forget(tostring(mine))
  else
    mine = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  end
  return {1, wait, mine, '', granted}
end

-- Its turn: when the bucket has refilled for it (first in line), or for everyone ahead and then it.
local turn = wait
if not first then
  turn = floor
  for _, d in ipairs(dims) do
    local c = mine_costs[d.name]
    if c then
      local u = math.ceil((d.ahead + math.min(c, d.cap) - d.level) / d.rate)
      if u > turn then
        turn = u
      end
    end
  end
end
if turn > tonumber(ARGV[2]) then
  leave()
  return {0, turn, 0, '', 0}
end
hold(table.concat(asked_text, ','), lease)
return {4, turn, mine, '', 0}
