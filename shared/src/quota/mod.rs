//! Quota-aware concurrency: one budget per (provider, model, API key) shared by the whole fleet through Redis, so
//! the sum of all replicas stays inside the provider's limits, uses nearly all of them, and backs off together.
//!
//! - **Budgets** are token buckets per dimension (requests and tokens per minute for embeddings, uploads per window
//!   for LlamaParse), refilled at 97.5 % of the provider's rate with a burst of 2 % of its limit, so no sliding
//!   window of the provider's length ever sees more than its limit. A call reserves its cost before it goes out
//!   (tokens counted with the tokenizer) in one atomic script; a reservation may put the bucket in debt, and the
//!   caller then waits its turn (the wait is counted) instead of failing. Calls reserve at most two seconds
//!   ahead of their turn (a replica killed while waiting takes little budget with it); further out they sleep and
//!   ask again. A wait longer than `quota.max_wait` defers the job to the queue instead of holding a worker slot.
//! - **Feedback**: the answer's usage corrects the reservation; `x-ratelimit-remaining-*` lowers the bucket to what
//!   the provider says remains; a 429 sets a fleet-wide cool-down (its Retry-After, else a second) that every
//!   replica honours; `insufficient_quota` pauses the provider fleet-wide, letting one probe call through every
//!   `pipeline.quota_wait` until one succeeds, or `producer quota resume <provider>`.
//! - **Concurrency** per process converges with AIMD: halved on a 429, grown by one per window of successes.
//! - **Cost**: a daily token budget per provider stops calls (jobs are deferred, never failed) until the next UTC
//!   day; tokens and their estimated cost are metrics.
//!
//! Redis trouble never stops the work: the limiter then lets calls through (logged), and the provider's own 429s
//! still slow the fleet down.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redis::{AsyncCommands, Script, aio::ConnectionManager};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::{
    providers::ProviderError,
    settings::{QuotaSettings, Settings},
};

/// Share of the provider's rate the buckets refill at.
const RATE_SHARE: f64 = 0.975;
/// How far ahead of its turn a call reserves its share.
const RESERVE_AHEAD: Duration = Duration::from_secs(2);
/// Share of the provider's limit a bucket holds at most (its burst).
const BURST_SHARE: f64 = 0.02;

static ACQUIRE: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("acquire.lua")));
static SETTLE: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("settle.lua")));
static COOLDOWN: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("cooldown.lua")));

/// One dimension of a budget: at most `limit` units per `window`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// The dimension's name (`requests`, `tokens`, `uploads`).
    pub name: &'static str,
    /// Units per window, as the provider counts them.
    pub limit: f64,
    /// The provider's window.
    pub window: Duration,
}

impl Limit {
    fn capacity(&self) -> f64 {
        (self.limit * BURST_SHARE).max(1.0)
    }

    /// 97.5 % of the provider's rate, and never so much that a window could hold more whole calls than the limit:
    /// at most `capacity + refill` calls fit in one window, so `floor(capacity + refill) <= limit`.
    fn rate_per_ms(&self) -> f64 {
        let per_window = (self.limit * RATE_SHARE)
            .min(self.limit + 0.99 - self.capacity())
            .max(0.5);
        per_window / self.window.as_millis().max(1) as f64
    }
}

/// The fleet's quota state in Redis.
#[derive(Clone)]
pub struct Quota {
    conn: ConnectionManager,
    prefix: String,
    settings: QuotaSettings,
    quota_wait: Duration,
}

impl std::fmt::Debug for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quota")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Quota {
    /// Connects to the fleet's Redis (`redis_url`), under `queue.key_prefix`.
    pub async fn connect(settings: &Settings) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(settings.redis_url.expose())?;
        let conn = ConnectionManager::new(client).await?;
        Ok(Self::with_connection(conn, settings))
    }

    /// The fleet's quota state over an existing Redis connection.
    pub fn with_connection(conn: ConnectionManager, settings: &Settings) -> Self {
        Self {
            conn,
            prefix: format!("{}:quota", settings.queue.key_prefix),
            settings: settings.quota.clone(),
            quota_wait: settings.pipeline.quota_wait,
        }
    }

    /// The budget of `provider`'s `model` under `api_key` (hashed; keys never reach Redis), with these limits and
    /// a per-process concurrency ceiling of `concurrency`.
    pub fn budget(
        &self,
        provider: &'static str,
        model: &str,
        api_key: &str,
        limits: Vec<Limit>,
        concurrency: usize,
    ) -> Budget {
        let key_hash = hex::encode(&Sha256::digest(api_key.as_bytes())[..6]);
        // LlamaParse counts pages and has no price setting; embeddings count tokens at the configured price.
        let (daily_units, usd_per_million) = match provider {
            "llamaparse" => (self.settings.llamaparse.pages_per_day, 0.0),
            _ => (
                self.settings.openai.daily_tokens,
                self.settings.openai.usd_per_million_tokens,
            ),
        };
        let base = format!("{}:{provider}", self.prefix);
        for l in &limits {
            let labels = [("provider", provider), ("resource", l.name)];
            metrics::gauge!(crate::metrics::QUOTA_LIMIT, &labels).set(l.limit);
            metrics::gauge!(crate::metrics::QUOTA_WINDOW, &labels).set(l.window.as_secs_f64());
            metrics::counter!(crate::metrics::QUOTA_RESERVED, &labels).absolute(0);
        }
        Budget {
            inner: Arc::new(BudgetInner {
                conn: self.conn.clone(),
                provider,
                bucket: format!("{base}:{model}:{key_hash}"),
                pause: format!("{base}:pause"),
                probe: format!("{base}:probe"),
                spent: format!("{base}:spent"),
                limits,
                max_wait: self.settings.max_wait,
                probe_every: self.quota_wait,
                daily_units,
                usd_per_million,
                aimd: Aimd::new(concurrency),
            }),
        }
    }

    /// The budgets of the settings' providers, for `producer quota`.
    pub async fn report(&self) -> Result<Vec<BudgetState>, redis::RedisError> {
        let mut conn = self.conn.clone();
        let mut keys: Vec<String> = Vec::new();
        let mut iter: redis::AsyncIter<'_, String> =
            conn.scan_match(format!("{}:*", self.prefix)).await?;
        while let Some(key) = futures::StreamExt::next(&mut iter).await {
            keys.push(key?);
        }
        drop(iter);
        keys.sort();
        let mut out = Vec::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await?;
            let value = match kind.as_str() {
                "hash" => {
                    let fields: Vec<(String, String)> = conn.hgetall(&key).await?;
                    fields
                        .into_iter()
                        .filter(|(f, _)| f.ends_with(":level"))
                        .map(|(f, v)| format!("{}={v}", f.trim_end_matches(":level")))
                        .collect::<Vec<_>>()
                        .join(" ")
                }
                "string" => conn.get::<_, String>(&key).await?,
                other => other.to_owned(),
            };
            let ttl_ms: i64 = conn.pttl(&key).await?;
            out.push(BudgetState {
                key: key
                    .trim_start_matches(&format!("{}:", self.prefix))
                    .to_owned(),
                value,
                ttl_ms,
            });
        }
        Ok(out)
    }

    /// Whether `provider` is paused fleet-wide for quota.
    pub async fn is_paused(&self, provider: &str) -> Result<bool, redis::RedisError> {
        let mut conn = self.conn.clone();
        conn.exists(format!("{}:{provider}:pause", self.prefix))
            .await
    }

    /// Ends a provider's pause (`producer quota resume <provider>`); true if it was paused.
    pub async fn resume(&self, provider: &str) -> Result<bool, redis::RedisError> {
        let mut conn = self.conn.clone();
        let removed: i64 = conn
            .del(&[
                format!("{}:{provider}:pause", self.prefix),
                format!("{}:{provider}:probe", self.prefix),
            ])
            .await?;
        Ok(removed > 0)
    }
}

/// One entry of `producer quota`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetState {
    /// The key below the quota prefix: `<provider>:<model>:<key hash>` (bucket levels), `…:cooldown`,
    /// `<provider>:pause`, `<provider>:spent:<day>`.
    pub key: String,
    /// Levels, the cool-down's end, the pause reason or the day's spend.
    pub value: String,
    /// Time to live in ms (-1: none).
    pub ttl_ms: i64,
}

/// A budget shared by the fleet; cheap to clone.
#[derive(Clone)]
pub struct Budget {
    inner: Arc<BudgetInner>,
}

struct BudgetInner {
    conn: ConnectionManager,
    provider: &'static str,
    bucket: String,
    pause: String,
    probe: String,
    spent: String,
    limits: Vec<Limit>,
    max_wait: Duration,
    probe_every: Duration,
    /// Tokens (embeddings) or pages (LlamaParse) per UTC day; 0 is no cap.
    daily_units: u64,
    usd_per_million: f64,
    aimd: Arc<Aimd>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("bucket", &self.inner.bucket)
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

/// A reservation: hold it while the call runs, then give it to [`Budget::settle`].
#[derive(Debug)]
pub struct Permit {
    costs: Vec<(&'static str, f64)>,
    probe: bool,
    _slot: Slot,
}

impl Budget {
    /// Reserves `costs` (dimension name, units) before a call: waits for the fleet's budget and this process's
    /// concurrency, or fails with a deferral when the wait would exceed `quota.max_wait`, the provider is paused,
    /// or today's budget is spent.
    pub async fn acquire(&self, costs: &[(&'static str, f64)]) -> Result<Permit, ProviderError> {
        let b = &*self.inner;
        let started = Instant::now();
        let slot = b.aimd.acquire().await;
        if b.daily_units > 0 {
            let spent = self.spent_today().await;
            if spent >= b.daily_units {
                return Err(ProviderError::QuotaExhausted {
                    provider: b.provider,
                    message: format!(
                        "today's budget of {} is spent ({spent}); calls resume at 00:00 UTC",
                        b.daily_units
                    ),
                });
            }
        }
        let dims: Vec<(&Limit, f64)> = b
            .limits
            .iter()
            .filter_map(|l| {
                costs
                    .iter()
                    .find(|(n, _)| *n == l.name)
                    .map(|(_, c)| (l, *c))
            })
            .collect();
        let mut conn = b.conn.clone();
        // Reserve at most RESERVE_AHEAD before the call can go: a replica killed while it waits then takes at most
        // that much of the fleet's budget with it. Longer waits sleep unreserved and ask again.
        let (status, wait_ms) = loop {
            let left = b.max_wait.saturating_sub(started.elapsed());
            let mut invocation = ACQUIRE.prepare_invoke();
            invocation
                .key(&b.bucket)
                .key(format!("{}:cooldown", b.bucket))
                .key(&b.pause)
                .key(&b.probe)
                .arg(left.min(RESERVE_AHEAD).as_millis() as u64)
                .arg(b.probe_every.as_millis().max(1) as u64)
                .arg(dims.len());
            for (limit, cost) in &dims {
                invocation
                    .arg(limit.name)
                    .arg(limit.capacity())
                    .arg(limit.rate_per_ms())
                    .arg(*cost);
            }
            let answer: Result<(i64, i64), _> = invocation.invoke_async(&mut conn).await;
            match answer {
                Ok((0, wait_ms)) if Duration::from_millis(wait_ms as u64) <= left => {
                    let early = Duration::from_millis(wait_ms as u64).saturating_sub(RESERVE_AHEAD);
                    tokio::time::sleep(early.max(Duration::from_millis(20))).await;
                }
                Ok(a) => break a,
                Err(e) => {
                    tracing::warn!(provider = b.provider, error = %e, "The fleet's quota state is unreachable; calling without it");
                    break (1, 0);
                }
            }
        };
        if matches!(status, 1 | 3) {
            for (limit, cost) in &dims {
                metrics::counter!(crate::metrics::QUOTA_RESERVED, "provider" => b.provider, "resource" => limit.name)
                    .increment(cost.ceil() as u64);
            }
        }
        let permit = |probe| Permit {
            costs: costs.to_vec(),
            probe,
            _slot: slot,
        };
        match status {
            1 => {
                if wait_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(wait_ms as u64)).await;
                }
                crate::metrics::quota_waited(b.provider, started.elapsed());
                Ok(permit(false))
            }
            3 => {
                tracing::info!(
                    provider = b.provider,
                    "The provider is paused for quota; this call probes whether it is back"
                );
                Ok(permit(true))
            }
            2 => Err(ProviderError::QuotaExhausted {
                provider: b.provider,
                message: "the provider is paused fleet-wide after running out of quota (`producer quota resume` ends it)".into(),
            }),
            _ => {
                metrics::counter!(crate::metrics::QUOTA_DEFERRED, "provider" => b.provider)
                    .increment(1);
                Err(ProviderError::Throttled {
                    provider: b.provider,
                    retry_after: Duration::from_millis(wait_ms.max(1) as u64),
                })
            }
        }
    }

    /// Settles a call that got an answer: corrects each dimension by what it really cost (`actual`, by name;
    /// absent dimensions cost what was reserved), lowers buckets to the provider's `remaining` counts, grows
    /// the process's concurrency, ends a pause the call probed, and adds `spent` to today's budget.
    pub async fn settle(
        &self,
        permit: Permit,
        actual: &[(&'static str, f64)],
        remaining: &[(&'static str, f64)],
        spent: u64,
    ) {
        let b = &*self.inner;
        b.aimd.success();
        let mut conn = b.conn.clone();
        for limit in &b.limits {
            let reserved = permit
                .costs
                .iter()
                .find(|(n, _)| *n == limit.name)
                .map_or(0.0, |(_, c)| *c);
            let used = actual
                .iter()
                .find(|(n, _)| *n == limit.name)
                .map_or(reserved, |(_, c)| *c);
            let left = remaining
                .iter()
                .find(|(n, _)| *n == limit.name)
                .map_or(-1.0, |(_, r)| *r);
            if left >= 0.0 {
                metrics::gauge!(crate::metrics::QUOTA_REMAINING, "provider" => b.provider, "resource" => limit.name)
                    .set(left);
            }
            if (reserved - used).abs() < f64::EPSILON && left < 0.0 {
                continue;
            }
            let r: Result<i64, _> = SETTLE
                .key(&b.bucket)
                .arg(limit.name)
                .arg(limit.capacity())
                .arg(limit.rate_per_ms())
                .arg(reserved - used)
                .arg(left)
                .invoke_async(&mut conn)
                .await;
            if let Err(e) = r {
                tracing::debug!(provider = b.provider, error = %e, "Could not settle a reservation");
            }
        }
        self.add_spent(spent).await;
        if permit.probe {
            let r: Result<i64, _> = conn.del(&[&b.pause, &b.probe]).await;
            if r.is_ok() {
                tracing::info!(
                    provider = b.provider,
                    "The probe succeeded: the provider's quota is back, the pause is over"
                );
            }
        }
    }

    /// Counts `units` (tokens, pages) against today's budget and the usage and cost metrics.
    pub async fn add_spent(&self, units: u64) {
        let b = &*self.inner;
        if units == 0 {
            return;
        }
        crate::metrics::quota_spent(b.provider, units, b.usd_per_million);
        if b.daily_units > 0 {
            let key = format!("{}:{}", b.spent, chrono::Utc::now().format("%Y-%m-%d"));
            let mut conn = b.conn.clone();
            let r: Result<(), _> = redis::pipe()
                .incr(&key, units)
                .ignore()
                .expire(&key, 2 * 86_400)
                .ignore()
                .query_async(&mut conn)
                .await;
            if let Err(e) = r {
                tracing::debug!(provider = b.provider, error = %e, "Could not count today's spend");
            }
        }
    }

    /// Settles a call by how it ended: a 429 cools the fleet down, running out of quota pauses the provider,
    /// anything else only gives the slot back.
    pub async fn settle_error(&self, permit: Permit, error: &ProviderError) {
        match error {
            ProviderError::RateLimited { retry_after, .. } => self.cool_down(*retry_after).await,
            ProviderError::QuotaExhausted { message, .. } => self.pause(message).await,
            _ => {}
        }
        drop(permit);
    }

    /// The provider answered 429: every replica waits `retry_after` (one second when it did not say), and this
    /// process halves its concurrency.
    pub async fn cool_down(&self, retry_after: Option<Duration>) {
        let b = &*self.inner;
        b.aimd.back_off();
        let ms = retry_after
            .unwrap_or(Duration::from_secs(1))
            .as_millis()
            .max(1) as u64;
        metrics::counter!(crate::metrics::QUOTA_COOLDOWNS, "provider" => b.provider).increment(1);
        let mut conn = b.conn.clone();
        let r: Result<i64, _> = COOLDOWN
            .key(format!("{}:cooldown", b.bucket))
            .arg(ms)
            .invoke_async(&mut conn)
            .await;
        if let Err(e) = r {
            tracing::warn!(provider = b.provider, error = %e, "Could not share a cool-down with the fleet");
        }
    }

    /// The provider is out of quota or credit: pause it fleet-wide until a probe succeeds or an operator resumes.
    pub async fn pause(&self, reason: &str) {
        let b = &*self.inner;
        let mut conn = b.conn.clone();
        // The probe lock starts now, so the next probe comes one interval later.
        let r: Result<(), _> = redis::pipe()
            .set(&b.pause, reason)
            .ignore()
            .pset_ex(&b.probe, 1, b.probe_every.as_millis().max(1) as u64)
            .ignore()
            .query_async(&mut conn)
            .await;
        metrics::counter!(crate::metrics::QUOTA_PAUSES, "provider" => b.provider).increment(1);
        match r {
            Ok(()) => {
                tracing::error!(provider = b.provider, %reason, "Out of quota: the provider is paused fleet-wide; its documents wait")
            }
            Err(e) => {
                tracing::warn!(provider = b.provider, error = %e, "Could not pause the provider")
            }
        }
    }

    async fn spent_today(&self) -> u64 {
        let b = &*self.inner;
        let key = format!("{}:{}", b.spent, chrono::Utc::now().format("%Y-%m-%d"));
        let mut conn = b.conn.clone();
        conn.get::<_, Option<u64>>(&key)
            .await
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// This process's current concurrency limit.
    pub fn concurrency(&self) -> usize {
        self.inner.aimd.limit()
    }
}

/// Additive-increase, multiplicative-decrease concurrency for one process: halved on a 429, grown by one per
/// `limit` successes, between 1 and the ceiling.
#[derive(Debug)]
struct Aimd {
    state: Mutex<AimdState>,
    freed: Notify,
    ceiling: f64,
}

#[derive(Debug)]
struct AimdState {
    limit: f64,
    in_flight: usize,
}

/// A slot of the process's concurrency, given back on drop.
#[derive(Debug)]
struct Slot(Arc<Aimd>);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        s.in_flight = s.in_flight.saturating_sub(1);
        drop(s);
        self.0.freed.notify_one();
    }
}

impl Aimd {
    fn new(ceiling: usize) -> Arc<Self> {
        let ceiling = ceiling.max(1) as f64;
        Arc::new(Self {
            state: Mutex::new(AimdState {
                limit: ceiling,
                in_flight: 0,
            }),
            freed: Notify::new(),
            ceiling,
        })
    }

    fn limit(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).limit as usize
    }

    async fn acquire(self: &Arc<Self>) -> Slot {
        loop {
            let notified = self.freed.notified();
            {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if (s.in_flight as f64) < s.limit.floor().max(1.0) {
                    s.in_flight += 1;
                    return Slot(self.clone());
                }
            }
            notified.await;
        }
    }

    fn success(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.limit = (s.limit + 1.0 / s.limit.max(1.0)).min(self.ceiling);
        drop(s);
        self.freed.notify_one();
    }

    fn back_off(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.limit = (s.limit / 2.0).max(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_never_let_a_provider_window_see_more_than_its_limit() {
        let l = Limit {
            name: "requests",
            limit: 600.0,
            window: Duration::from_secs(60),
        };
        // Burst plus refill over one window stays under the limit.
        let most = l.capacity() + l.rate_per_ms() * 60_000.0;
        assert!(most <= 600.0, "{most}");
        assert!(most >= 0.99 * 600.0, "{most}");
        let small = Limit {
            name: "uploads",
            limit: 10.0,
            window: Duration::from_secs(10),
        };
        let most = small.capacity() + small.rate_per_ms() * 10_000.0;
        assert!(most.floor() <= 10.0 && most >= 10.0, "{most}");
    }

    #[tokio::test]
    async fn aimd_halves_on_429_and_grows_back_one_per_window() {
        let a = Aimd::new(16);
        assert_eq!(a.limit(), 16);
        a.back_off();
        a.back_off();
        assert_eq!(a.limit(), 4);
        // One per window of successes: from 4, five successes reach 5.
        for _ in 0..5 {
            a.success();
        }
        assert_eq!(a.limit(), 5);
        for _ in 0..10 {
            a.back_off();
        }
        assert_eq!(a.limit(), 1, "never below one");
        // Slots: the second waits until the first is dropped.
        let first = a.acquire().await;
        let waiting = {
            let a = a.clone();
            tokio::spawn(async move { a.acquire().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(first);
        let _second = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("freed")
            .unwrap();
    }
}
