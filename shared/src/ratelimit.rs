//! Per-user request limits shared by every producer replica through Redis: a token bucket per (limit, user)
//! refilled at the configured rate, holding at most the burst. A caller past it learns how long to wait; the
//! API answers 429 with that as `Retry-After`. When Redis cannot be asked the request goes through (logged):
//! the limit protects the fleet from one user's flood, never at the price of refusing everyone.

use std::time::Duration;

use redis::{Script, aio::ConnectionManager};
use uuid::Uuid;

static TAKE: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r"
-- KEYS[1] bucket hash  ARGV[1] capacity  ARGV[2] refill per ms  ARGV[3] cost
-- Returns 0 when taken, else the ms until the cost is available.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local level = tonumber(redis.call('HGET', KEYS[1], 'level') or cap)
local ts = tonumber(redis.call('HGET', KEYS[1], 'ts') or now)
level = math.min(cap, level + math.max(now - ts, 0) * rate)
if level < cost then
  return math.ceil((cost - level) / rate)
end
redis.call('HSET', KEYS[1], 'level', tostring(level - cost), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(cap / rate) + 1000)
return 0
",
    )
});

/// One limit: `per_minute` requests per user, `burst` at once.
#[derive(Clone)]
pub struct RateLimit {
    conn: ConnectionManager,
    prefix: String,
    per_minute: u32,
    burst: u32,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("prefix", &self.prefix)
            .field("per_minute", &self.per_minute)
            .field("burst", &self.burst)
            .finish()
    }
}

impl RateLimit {
    /// The limit `name` under the fleet's key prefix; `per_minute` 0 turns it off.
    pub fn new(
        conn: ConnectionManager,
        key_prefix: &str,
        name: &str,
        per_minute: u32,
        burst: u32,
    ) -> Self {
        Self {
            conn,
            prefix: format!("{key_prefix}:ratelimit:{name}"),
            per_minute,
            burst: burst.max(1),
        }
    }

    /// Takes one request of `user`'s budget: `Ok` to go on, or `Err(wait)` until the next one is allowed.
    pub async fn take(&self, user: Uuid) -> Result<(), Duration> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let rate_per_ms = f64::from(self.per_minute) / 60_000.0;
        let answer: Result<u64, _> = TAKE
            .key(format!("{}:{user}", self.prefix))
            .arg(self.burst)
            .arg(rate_per_ms)
            .arg(1)
            .invoke_async(&mut conn)
            .await;
        match answer {
            Ok(0) => Ok(()),
            Ok(wait_ms) => Err(Duration::from_millis(wait_ms)),
            Err(e) => {
                tracing::warn!(error = %e, limit = %self.prefix, "Rate limit state unreachable; letting the request through");
                Ok(())
            }
        }
    }
}
