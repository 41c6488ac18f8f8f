//! Quota-aware concurrency: one budget per (provider, model, API key) shared by the whole fleet through Redis, so
//! the sum of all replicas stays inside the provider's limits, uses nearly all of them, and backs off together.
//!
//! - **Budgets** are token buckets per dimension (requests and tokens per minute for embeddings, uploads per window
//!   for LlamaParse, requests per minute for a search's reranker), refilled at 97.5 % of the provider's rate with a
//!   burst of 2 % of its limit. A call reserves its cost before it goes out (tokens counted with the tokenizer) in
//!   one atomic script; a reservation may put the bucket in debt, and the caller then waits its turn (the wait is
//!   counted) instead of failing. A request larger than the burst goes when the bucket is full and leaves it in
//!   debt for the next caller to wait out. Every request also waits until the provider's sliding window has room
//!   for it, read from two logs of what was sent, per hundredth of the window: a request counts in every window while
//!   it is in flight and, when its answer is back (or it failed, or was dropped), is logged at that time. The
//!   provider counts a request from its arrival, between the two, so the log counts it at least as long as the
//!   provider does, and a request that went out late (a starved process, a slow connection) cannot push a window
//!   over the limit, as the bucket alone would let it. One in flight longer than its window plus its client's
//!   request timeout stops counting, so a replica killed mid-call holds no budget for longer; a grant never
//!   picked up goes back when its caller's ticket lapses (killed: within seconds) or at once (cancelled).
//! - **Order**: callers are served in the order they came. One that cannot reserve now takes a ticket, a place
//!   in a line kept in Redis, and reservations are made in ticket order only (each ask reserves for every waiting
//!   ticket whose turn has come, which picks its grant up when it next asks), so a large request is never starved
//!   by small ones. Reservations are made at most two seconds ahead of a request's turn (a replica killed while
//!   waiting takes little budget with it); callers renew their ticket each time they ask, and a killed replica's
//!   ticket lapses in two seconds. A wait longer than `quota.max_wait` defers the job to the queue instead of
//!   holding a worker slot.
//! - **Sizing**: [`Budget::largest_request`] is the largest request that, first in line, is granted within
//!   `quota.max_wait`, and at most a tenth of the limit (whole requests then fill nine tenths of any window);
//!   clients split bigger work evenly into parts of one [`Turn`], which keeps its place in line from part to part,
//!   so a call is not deferred half-way after paying for its first parts. Settings whose single request can never
//!   fit are refused at start-up.
//! - **Feedback**: the answer's usage corrects the reservation; `x-ratelimit-remaining-*` lowers the bucket to what
//!   the provider says remains; a 429 sets a fleet-wide cool-down (its Retry-After, else a second) that every
//!   replica honours; `insufficient_quota` (reason `quota`) and a refused key, 401/403 (reason `auth`), pause the
//!   provider fleet-wide, letting one probe call through every `pipeline.quota_wait` until one succeeds, or
//!   `producer quota resume <provider>`. Documents wait meanwhile; none fails for it.
//! - **Concurrency** per process converges with AIMD: halved on a 429, grown by one per window of successes.
//! - **Cost**: a daily token budget per provider stops calls (jobs are deferred, never failed) until the next UTC
//!   day; tokens and their estimated cost are metrics.
//!
//! Every key of a provider's budgets carries the provider as a hash tag (`<prefix>:quota:{openai}:…`), so the
//! scripts touch one Redis Cluster slot. Redis trouble never stops the work: the limiter then lets calls through
//! (logged), and the provider's own 429s still slow the fleet down.

mod aimd;
mod budget;
mod report;
mod sizing;

use std::time::Duration;

use redis::aio::ConnectionManager;
use sha2::{Digest, Sha256};

pub use budget::{Budget, Permit, Turn};
pub use report::BudgetState;
pub(crate) use sizing::oversized_request;

use crate::settings::{OpenAiQuota, QuotaSettings, Settings};

/// The Redis keys of one budget. All carry the provider's hash tag: one Redis Cluster slot holds them.
#[derive(Clone)]
struct Keys {
    /// Bucket levels per dimension and the ticket sequence (hash).
    bucket: String,
    /// The end of a fleet-wide cool-down, ms.
    cooldown: String,
    /// Tickets in line, scored by the end of their lease (sorted set).
    line: String,
    /// What each ticket in line asks for, and when a granted one may send (hash).
    asks: String,
    /// Units of answered requests per slot of the provider's window, per dimension (hash, a ring of slots).
    answered: String,
    /// Units of requests in flight per slot they were allowed to go in, per dimension (hash).
    flying: String,
    /// The provider's pause: `<reason>: <message>`.
    pause: String,
    /// The provider's probe lock.
    probe: String,
    /// The provider's spend, per UTC day (`<spent>:<day>`).
    spent: String,
}

/// Share of the provider's rate the buckets refill at.
const RATE_SHARE: f64 = 0.975;
/// How far ahead of its turn a call reserves its share.
const RESERVE_AHEAD: Duration = Duration::from_secs(2);
/// Share of the provider's limit a bucket holds at most (its burst).
const BURST_SHARE: f64 = 0.02;
/// Share of what refills within `quota.max_wait` (beyond the look-ahead) one request may need: the rest is the
/// margin for the debt the request before it left.
const SIZING_SHARE: f64 = 0.5;
/// Share of the provider's limit one request should need at most: whole requests then fill at least the rest
/// of any window (a sliding window holding the limit less one request).
const WINDOW_SHARE: f64 = 0.1;
/// Slots of the logs of what was sent per window of the provider.
const SLOTS: u64 = 100;
/// Slots past the window the answered log still counts a request for: a margin for the millisecond truncation of
/// Redis time and the slots' rounding (the log already counts an answer until at least the window after it).
const LATE_SLOTS: u64 = 1;
/// How long a request may be in flight, counted in every window, when its client does not say
/// ([`Budget::with_request_timeout`]).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// One dimension of a budget: at most `limit` units per `window`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// The dimension's name (`requests`, `tokens`, `uploads`).
    pub name: &'static str,
    /// Units per window, as the provider counts them.
    pub limit: f64,
    #[allow(missing_docs)]
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

    /// The length of one slot of the logs of what was sent, ms: a hundredth of the window.
    fn slot_ms(&self) -> u64 {
        (self.window.as_millis() as u64).div_ceil(SLOTS).max(1)
    }

    /// The answered log's ring of slots: the window, the slots past it still counted, the look-ahead and a spare.
    fn ring(&self) -> u64 {
        SLOTS + (RESERVE_AHEAD.as_millis() as u64).div_ceil(self.slot_ms()) + LATE_SLOTS + 2
    }

    /// The largest cost one request may have so that, first in line, it is granted within `max_wait` however
    /// deep the request before it (no larger) left the bucket in debt: the burst, plus half of what refills in
    /// `max_wait` beyond the two-second look-ahead, and never more than the limit. First in line, a request waits
    /// at most the previous one's cost over the rate plus the look-ahead, which stays within `max_wait` when
    /// `max_wait` is at least twice the burst's refill time plus the look-ahead (4.5 s for a one-minute window).
    pub fn largest_request(&self, max_wait: Duration) -> f64 {
        let refill = max_wait.saturating_sub(RESERVE_AHEAD).as_millis() as f64 * self.rate_per_ms();
        (self.capacity() + refill * SIZING_SHARE).min(self.limit)
    }
}

/// The limits of an OpenAI-compatible embeddings budget: `requests` and `tokens` per minute, those set above 0.
pub fn openai_limits(quota: &OpenAiQuota) -> Vec<Limit> {
    [
        ("requests", quota.requests_per_minute),
        ("tokens", quota.tokens_per_minute),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .map(|(name, n)| Limit {
        name,
        limit: n as f64,
        window: Duration::from_secs(60),
    })
    .collect()
}

/// The limit of a reranker's budget: `requests_per_minute` (none at 0).
pub fn rerank_limits(requests_per_minute: u64) -> Vec<Limit> {
    (requests_per_minute > 0)
        .then(|| Limit {
            name: "requests",
            limit: requests_per_minute as f64,
            window: Duration::from_secs(60),
        })
        .into_iter()
        .collect()
}

/// Why a provider is paused fleet-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseReason {
    /// It ran out of quota or credit (OpenAI `insufficient_quota`, LlamaParse 402).
    Quota,
    /// It refused our key (401/403): revoked, rotated, or of another region or project.
    Auth,
}

impl PauseReason {
    /// Every reason, in the order of [`crate::metrics::PAUSE_REASONS`].
    pub const ALL: [PauseReason; 2] = [PauseReason::Quota, PauseReason::Auth];

    /// Its metric label, and the first word of the pause key's value.
    pub const fn as_str(self) -> &'static str {
        match self {
            PauseReason::Quota => "quota",
            PauseReason::Auth => "auth",
        }
    }

    /// The reason a pause key's value (`<reason>: <message>`) names; any other value is a quota pause.
    fn of(value: &str) -> Self {
        if value.starts_with("auth:") {
            PauseReason::Auth
        } else {
            PauseReason::Quota
        }
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

    /// Where `provider`'s keys start: its name is their hash tag.
    fn provider_base(&self, provider: &str) -> String {
        format!("{}:{{{provider}}}", self.prefix)
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
        let max_wait = self.settings.max_wait;
        self.budget_waiting(provider, model, api_key, limits, concurrency, max_wait)
    }

    /// Like [`Quota::budget`], but a call waits at most `max_wait` for its share (or a cool-down) instead of
    /// `quota.max_wait` before it is refused as [`ProviderError::Throttled`](crate::providers::ProviderError):
    /// for calls someone is waiting on, such as a search's reranking.
    pub fn budget_waiting(
        &self,
        provider: &'static str,
        model: &str,
        api_key: &str,
        limits: Vec<Limit>,
        concurrency: usize,
        max_wait: Duration,
    ) -> Budget {
        let key_hash = hex::encode(&Sha256::digest(api_key.as_bytes())[..6]);
        // LlamaParse counts pages and has no price setting; embeddings count tokens at the configured price; other
        // providers (rerankers) have no daily cap.
        let (daily_units, usd_per_million) = match provider {
            "llamaparse" => (self.settings.llamaparse.pages_per_day, 0.0),
            "openai" => (
                self.settings.openai.daily_tokens,
                self.settings.openai.usd_per_million_tokens,
            ),
            _ => (0, 0.0),
        };
        for l in &limits {
            let labels = [("provider", provider), ("resource", l.name)];
            metrics::gauge!(crate::metrics::QUOTA_LIMIT, &labels).set(l.limit);
            metrics::gauge!(crate::metrics::QUOTA_WINDOW, &labels).set(l.window.as_secs_f64());
            metrics::counter!(crate::metrics::QUOTA_RESERVED, &labels).absolute(0);
        }
        let base = self.provider_base(provider);
        let bucket = format!("{base}:{model}:{key_hash}");
        Budget::new(budget::BudgetParts {
            conn: self.conn.clone(),
            provider,
            keys: Keys {
                cooldown: format!("{bucket}:cooldown"),
                line: format!("{bucket}:line"),
                asks: format!("{bucket}:asks"),
                answered: format!("{bucket}:answered"),
                flying: format!("{bucket}:flying"),
                bucket,
                pause: format!("{base}:pause"),
                probe: format!("{base}:probe"),
                spent: format!("{base}:spent"),
            },
            limits,
            max_wait,
            probe_every: self.quota_wait,
            daily_units,
            usd_per_million,
            concurrency,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answered_log_ring_holds_every_slot_a_window_and_the_look_ahead_can_touch() {
        for (ms, slot) in [
            (60_000u64, 600u64),
            (10_000, 100),
            (1_000, 10),
            (50, 1),
            (7, 1),
        ] {
            let l = Limit {
                name: "requests",
                limit: 10.0,
                window: Duration::from_millis(ms),
            };
            assert_eq!(l.slot_ms(), slot);
            // acquire.lua reads slots from (now - window) / slot - LATE_SLOTS to now + the look-ahead: no two of
            // them may share a field of the ring.
            let reach = (ms + RESERVE_AHEAD.as_millis() as u64).div_ceil(slot) + LATE_SLOTS + 1;
            assert!(l.ring() >= reach, "{ms} ms: ring {} < {reach}", l.ring());
        }
    }

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

    #[test]
    fn the_largest_request_first_in_line_is_granted_within_max_wait() {
        // A free-tier key: 40,000 tokens a minute, the default 30 s wait.
        let tokens = Limit {
            name: "tokens",
            limit: 40_000.0,
            window: Duration::from_secs(60),
        };
        let max_wait = Duration::from_secs(30);
        let largest = tokens.largest_request(max_wait);
        // 800 of burst and half of 28 s of refill at 650 a second.
        assert!((largest - 9_900.0).abs() < 1.0, "{largest}");
        // First in line after a request as large, in debt by the look-ahead too: still within max_wait.
        let rate = tokens.rate_per_ms();
        let worst_wait_ms = largest / rate + RESERVE_AHEAD.as_millis() as f64;
        assert!(
            worst_wait_ms <= max_wait.as_millis() as f64,
            "{worst_wait_ms}"
        );
        // Below the look-ahead only the burst is left; one request always fits.
        let requests = Limit {
            name: "requests",
            limit: 3.0,
            window: Duration::from_secs(60),
        };
        assert!(requests.largest_request(Duration::from_millis(200)) >= 1.0);
        // Never more than the limit, however long the wait.
        assert_eq!(tokens.largest_request(Duration::from_secs(600)), 40_000.0);
    }

    #[test]
    fn openai_limits_leave_out_the_dimensions_set_to_zero() {
        let mut q = OpenAiQuota::default();
        let names: Vec<_> = openai_limits(&q).iter().map(|l| l.name).collect();
        assert_eq!(names, ["requests", "tokens"]);
        q.requests_per_minute = 0;
        let names: Vec<_> = openai_limits(&q).iter().map(|l| l.name).collect();
        assert_eq!(names, ["tokens"]);
    }

    #[test]
    fn pause_reasons_are_read_back_from_the_pause_value_and_match_the_metric_labels() {
        assert_eq!(PauseReason::of("auth: HTTP 401"), PauseReason::Auth);
        assert_eq!(
            PauseReason::of("quota: insufficient_quota"),
            PauseReason::Quota
        );
        assert_eq!(PauseReason::of("insufficient_quota"), PauseReason::Quota);
        let labels: Vec<&str> = PauseReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels, crate::metrics::PAUSE_REASONS);
    }
}
