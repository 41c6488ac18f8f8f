-- Reserves a request's cost from a fleet-wide budget of token buckets (one per dimension: requests, tokens,
-- uploads), serving callers in the order they came.
--
-- A request goes when its bucket holds its cost. A request larger than the bucket's burst goes when the bucket is
-- full and leaves it in debt, which whoever comes next waits out; such a request also waits until the provider's
-- sliding window has room for it, read from a log of what was sent per slot of the window (a ring of fields
-- `<name>:<slot mod ring>` = `<slot>:<units>`; smaller requests never need it: the bucket alone keeps any window
-- within the limit after them). A reservation is made at most ARGV[7] ms before the request may go; the caller
-- sleeps until then.
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
-- `name=cost,...`; `at:<ticket>` -> grant)  KEYS[7] sent log (hash, see above)
-- ARGV[1] longest wait the caller reserves at (ms)  ARGV[2] longest wait it stays in line for (ms)
-- ARGV[3] probe interval (ms)  ARGV[4] ticket lease (ms)  ARGV[5] the caller's ticket (0: none)
-- ARGV[6] 1: another part follows this request  ARGV[7] the look-ahead: longest wait anyone reserves at (ms)
-- ARGV[8] number of dimensions, then for each: name, capacity, refill per ms, cost, the provider's limit, its
-- window (ms)
-- Returns {status, wait_ms, ticket, pause reason}:
--   1 reserved: send after wait_ms; `ticket` is the caller's place for its next part
--   0 not reserved: the caller's turn is wait_ms away, beyond ARGV[2]; it left the line
--   4 in line with `ticket`: its turn comes in about wait_ms; ask again before the lease ends
--   2 paused (`reason`; the next probe in wait_ms)  3 paused (`reason`), and this caller is the probe
local SLOTS = 100
-- A request reaches the provider after the time it is logged at: a caller in line learns of a grant made for it
-- when it next asks, up to PICKUP ms later (ASK_EVERY in budget.rs), and then wakes, connects and writes it, late
-- on a busy machine. The provider's window counts it from its arrival, so the log keeps each request PICKUP ms
-- and LATE slots (2 % of the window) longer than the window: a request larger than the burst is admitted only
-- when the window has room even if earlier requests arrived that much late. With neither, CI saw 429s 4 to
-- 555 ms before the oldest request left the provider's window. (Requests within the burst are paced by the
-- bucket alone, at 97.5 % of the rate.)
local LATE = 2
local PICKUP = 500
local SENDING = 5000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mine = tonumber(ARGV[5])
local lease = tonumber(ARGV[4])
local look_ahead = tonumber(ARGV[7])

local function forget(id)
  redis.call('ZREM', KEYS[5], id)
  redis.call('HDEL', KEYS[6], id, 'at:' .. id)
end
local function leave()
  if mine > 0 then
    forget(tostring(mine))
  end
end

local reason = redis.call('GET', KEYS[3])
if reason then
  leave()
  if redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[3]) then
    return {3, 0, 0, reason}
  end
  return {2, math.max(redis.call('PTTL', KEYS[4]), 0), 0, reason}
end

-- Tickets whose holders stopped asking leave the line, with their grants.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now)) do
  forget(id)
end

local n = tonumber(ARGV[8])
local dims = {}
local mine_costs = {}
local asked_text = {}
for i = 0, n - 1 do
  local at = 9 + i * 6
  local name = ARGV[at]
  local cap = tonumber(ARGV[at + 1])
  local rate = tonumber(ARGV[at + 2])
  local level = tonumber(redis.call('HGET', KEYS[1], name .. ':level') or cap)
  local ts = tonumber(redis.call('HGET', KEYS[1], name .. ':ts') or now)
  level = math.min(cap, level + math.max(now - ts, 0) * rate)
  local window = tonumber(ARGV[at + 5])
  local slot = math.max(math.ceil(window / SLOTS), 1)
  local late = LATE + math.ceil(PICKUP / slot)
  dims[#dims + 1] = {
    name = name, cap = cap, rate = rate, level = level, limit = tonumber(ARGV[at + 4]), window = window,
    slot = slot, late = late, ring = SLOTS + math.ceil(look_ahead / slot) + late + 2, ahead = 0,
  }
  mine_costs[name] = tonumber(ARGV[at + 3])
  asked_text[#asked_text + 1] = name .. '=' .. ARGV[at + 3]
end

local floor = 0
local cool = tonumber(redis.call('GET', KEYS[2]) or '0')
if cool > now then
  floor = cool - now
end

-- The sent log of a dimension: {slot, units} of the slots that may still be in a window, oldest first.
local function sent(d)
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
  return log
end

-- The earliest time from `at` on when the window ending then has room for `cost` more.
local function room(d, cost, at)
  local log = sent(d)
  local from = math.floor((at - d.window) / d.slot) - d.late
  local total = 0
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

local function record(d, cost, at)
  local s = math.floor(at / d.slot)
  local field = d.name .. ':' .. (s % d.ring)
  local units = cost
  local v = redis.call('HGET', KEYS[7], field)
  if v then
    local old, u = string.match(v, '^(%-?%d+):(.+)$')
    if tonumber(old) == s then
      units = units + tonumber(u)
    end
  end
  redis.call('HSET', KEYS[7], field, s .. ':' .. units)
end

-- How long a request of `costs` waits from now: until each bucket holds what it needs (the whole burst, for a
-- request larger than it), and for one larger than the burst until the window has room.
local function wait_of(costs)
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
  local at = now + w
  for _, d in ipairs(dims) do
    local c = costs[d.name]
    if c and c > d.cap then
      at = math.max(at, room(d, c, now + w))
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

local function parse(asked)
  local costs = {}
  for name, cost in string.gmatch(asked, '([^=,]+)=([^,]+)') do
    costs[name] = tonumber(cost)
  end
  return costs
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
for _, ticket in ipairs(order) do
  if ticket == me then
    local grant = mine > 0 and redis.call('HGET', KEYS[6], 'at:' .. mine)
    if grant then
      status, wait = 1, math.max(tonumber(grant) - now, 0)
    elseif not blocked then
      first = true
      wait = wait_of(mine_costs)
      if wait <= tonumber(ARGV[1]) then
        reserve(mine_costs, wait)
        status = 1
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
        local w = wait_of(costs)
        if w <= look_ahead then
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
    leave()
  else
    mine = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  end
  return {1, wait, mine, ''}
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
  return {0, turn, 0, ''}
end
hold(table.concat(asked_text, ','), lease)
return {4, turn, mine, ''}
