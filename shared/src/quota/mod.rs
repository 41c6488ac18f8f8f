//! Quota-aware concurrency: one budget per (provider, model, API key) shared by the whole fleet through Redis, so
//! the sum of all replicas stays inside the provider's limits, uses nearly all of them, and backs off together.
//!
//! - **Budgets** are token buckets per dimension (requests and tokens per minute for embeddings, uploads per window
//!   for LlamaParse, requests per minute for a search's reranker), refilled at 97.5 % of the provider's rate with a
//!   burst of 2 % of its limit, so no sliding window of the provider's length ever sees more than its limit. A call
//!   reserves its cost before it goes out (tokens counted with the tokenizer) in one atomic script; a reservation
//!   may put the bucket in debt, and the caller then waits its turn (the wait is counted) instead of failing. A
//!   request larger than the burst goes when the bucket is full, leaves it in debt for the next caller to wait out,
//!   and also waits until the provider's window has room for it (a log of what was sent per hundredth of the
//!   window), since the bucket alone would let a window see the limit plus that request.
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

use std::time::Duration;

use redis::{AsyncCommands, aio::ConnectionManager};
use sha2::{Digest, Sha256};

pub use budget::{Budget, Permit, Turn};

use crate::settings::{EmbedderKind, OpenAiQuota, QuotaSettings, Settings};

/// The Redis keys of one budget. All carry the provider's hash tag: one Redis Cluster slot holds them.
struct Keys {
    /// Bucket levels per dimension and the ticket sequence (hash).
    bucket: String,
    /// The end of a fleet-wide cool-down, ms.
    cooldown: String,
    /// Tickets in line, scored by the end of their lease (sorted set).
    line: String,
    /// What each ticket in line asks for, and when a granted one may send (hash).
    asks: String,
    /// Units sent per slot of the provider's window, per dimension (hash).
    sent: String,
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

/// Checks that the smallest embeddings request the settings can make, one chunk, fits the OpenAI token budget:
/// first in line, it must be granted within `quota.max_wait`, or its document would be deferred for ever. `None`
/// when it fits; else the field to name and a reason that says what to change (start-up validation refuses the
/// settings with it).
pub(crate) fn oversized_request(settings: &Settings) -> Option<(&'static str, String)> {
    if settings.embedding.embedder != EmbedderKind::Openai {
        return None;
    }
    let tokens = openai_limits(&settings.quota.openai)
        .into_iter()
        .find(|l| l.name == "tokens")?;
    let max_wait = settings.quota.max_wait;
    // Longer chunks are cut to the model's input limit before they are sent.
    let (chunk, per_input) = (
        settings.chunking.max_tokens,
        settings.embedding.openai.max_input_tokens,
    );
    let (field, cost) = if chunk <= per_input {
        ("chunking.max_tokens", chunk as f64)
    } else {
        ("embedding.openai.max_input_tokens", per_input as f64)
    };
    let largest = tokens.largest_request(max_wait);
    if cost <= largest {
        return None;
    }
    let fits_with =
        |limit: f64, wait: Duration| Limit { limit, ..tokens }.largest_request(wait) >= cost;
    let fitting = largest.floor();
    let mut changes = vec![format!("lower {field} to {fitting} or less")];
    if let Some(w) = (1..=600u64)
        .map(Duration::from_secs)
        .find(|w| fits_with(tokens.limit, *w))
    {
        changes.push(format!("raise quota.max_wait to {w:?}"));
    }
    // The smallest whole limit that fits: double until it does, then halve the gap.
    let (mut low, mut high) = (tokens.limit, tokens.limit.max(1.0) * 2.0);
    while !fits_with(high, max_wait) {
        low = high;
        high *= 2.0;
    }
    while high - low > 1.0 {
        let mid = ((low + high) / 2.0).floor();
        if fits_with(mid, max_wait) {
            high = mid;
        } else {
            low = mid;
        }
    }
    changes.push(format!(
        "raise quota.openai.tokens_per_minute to {high} if the key's limit is that high"
    ));
    Some((
        field,
        format!(
            "one chunk of {cost} tokens is one embeddings request, and at quota.openai.tokens_per_minute = {} a \
             request granted within quota.max_wait ({max_wait:?}) may cost at most {fitting} tokens: its documents \
             would be deferred for ever. Change one: {}",
            tokens.limit,
            changes.join("; or "),
        ),
    ))
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
                sent: format!("{bucket}:sent"),
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

    /// The budgets of the settings' providers, for `producer quota`: bucket levels, callers in line, cool-downs,
    /// pauses and today's spend.
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
            // The costs of the callers in line (their count shows on the line itself) and the log of what was sent.
            if key.ends_with(":asks") || key.ends_with(":sent") {
                continue;
            }
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
                "zset" => {
                    let waiting: u64 = conn.zcard(&key).await?;
                    format!("{waiting} in line")
                }
                "string" => conn.get::<_, String>(&key).await?,
                other => other.to_owned(),
            };
            let ttl_ms: i64 = conn.pttl(&key).await?;
            out.push(BudgetState {
                key: key
                    .trim_start_matches(&format!("{}:", self.prefix))
                    .replace(['{', '}'], ""),
                value,
                ttl_ms,
            });
        }
        Ok(out)
    }

    /// Whether `provider` is paused fleet-wide, for quota or for a refused key.
    pub async fn is_paused(&self, provider: &str) -> Result<bool, redis::RedisError> {
        Ok(self.pause_reason(provider).await?.is_some())
    }

    /// Why `provider` is paused fleet-wide, if it is.
    pub async fn pause_reason(
        &self,
        provider: &str,
    ) -> Result<Option<PauseReason>, redis::RedisError> {
        let mut conn = self.conn.clone();
        let value: Option<String> = conn
            .get(format!("{}:pause", self.provider_base(provider)))
            .await?;
        Ok(value.as_deref().map(PauseReason::of))
    }

    /// Ends a provider's pause (`producer quota resume <provider>`); true if it was paused.
    pub async fn resume(&self, provider: &str) -> Result<bool, redis::RedisError> {
        let mut conn = self.conn.clone();
        let base = self.provider_base(provider);
        let removed: i64 = conn
            .del(&[format!("{base}:pause"), format!("{base}:probe")])
            .await?;
        Ok(removed > 0)
    }
}

/// One entry of `producer quota`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetState {
    /// The key below the quota prefix, without its hash tag's braces: `<provider>:<model>:<key hash>` (bucket
    /// levels), `…:line` (callers waiting in line), `…:cooldown`, `<provider>:pause`, `<provider>:probe`,
    /// `<provider>:spent:<day>`.
    pub key: String,
    /// Levels, the number in line, the cool-down's end, the pause's reason and message, or the day's spend.
    pub value: String,
    /// Time to live in ms (-1: none).
    pub ttl_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `acquire.lua`'s PICKUP covers a grant picked up as late as a caller in line asks.
    #[test]
    fn the_sent_log_allows_for_a_grant_picked_up_late() {
        let pickup = include_str!("acquire.lua")
            .lines()
            .find_map(|l| l.strip_prefix("local PICKUP = "))
            .and_then(|v| v.trim().parse::<u128>().ok())
            .expect("acquire.lua sets PICKUP");
        assert!(
            pickup >= budget::ASK_EVERY.as_millis(),
            "PICKUP {pickup} ms < ASK_EVERY"
        );
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
    fn settings_whose_single_chunk_never_fits_the_token_budget_name_the_fields_to_change() {
        let mut s = Settings::default();
        s.embedding.embedder = EmbedderKind::Openai;
        s.quota.openai.tokens_per_minute = 40_000;
        s.chunking.max_tokens = 512;
        assert_eq!(oversized_request(&s), None);
        // A 5 s wait at 40,000 a minute grants 800 + 975 tokens at most.
        s.quota.max_wait = Duration::from_secs(5);
        s.chunking.max_tokens = 4_096;
        let (field, reason) = oversized_request(&s).expect("refused");
        assert_eq!(field, "chunking.max_tokens");
        for named in ["quota.max_wait", "quota.openai.tokens_per_minute", "1775"] {
            assert!(reason.contains(named), "{named}: {reason}");
        }
        // The advice holds: each change alone makes it fit.
        let mut fixed = s.clone();
        fixed.chunking.max_tokens = 1_775;
        assert_eq!(oversized_request(&fixed), None);
        let mut fixed = s.clone();
        fixed.quota.max_wait = Duration::from_secs(13);
        assert_eq!(oversized_request(&fixed), None, "{reason}");
        assert!(reason.contains("raise quota.max_wait to 13s"), "{reason}");
        let mut fixed = s.clone();
        fixed.quota.openai.tokens_per_minute = 92_305;
        assert_eq!(oversized_request(&fixed), None, "{reason}");
        assert!(reason.contains("tokens_per_minute to 92305 "), "{reason}");
        // Inputs are cut to the model's limit first: then that limit is the one to lower.
        s.embedding.openai.max_input_tokens = 2_048;
        assert_eq!(
            oversized_request(&s).map(|(f, _)| f),
            Some("embedding.openai.max_input_tokens")
        );
        // Another embedder, or no token limit: nothing to check.
        s.quota.openai.tokens_per_minute = 0;
        assert_eq!(oversized_request(&s), None);
        s.quota.openai.tokens_per_minute = 40_000;
        s.embedding.embedder = EmbedderKind::Hashing;
        assert_eq!(oversized_request(&s), None);
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
