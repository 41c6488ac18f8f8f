//! One budget shared by the fleet: reservations served in order, settled by the answers; cool-downs and pauses.

mod flight;
mod line;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use redis::{AsyncCommands, Script, aio::ConnectionManager};

use super::{Keys, Limit, PauseReason, WINDOW_SHARE, aimd::Aimd};
use crate::providers::ProviderError;

pub use flight::Permit;
pub use line::Turn;

/// Answers of `acquire.lua`.
const DEFERRED: i64 = 0;
const RESERVED: i64 = 1;
const PAUSED: i64 = 2;
const PROBE: i64 = 3;
const IN_LINE: i64 = 4;

static SETTLE: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("../settle.lua")));
static COOLDOWN: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("../cooldown.lua")));
static PAUSE: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("../pause.lua")));

fn millis(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// What [`Budget::new`] builds a budget from.
pub(super) struct BudgetParts {
    pub(super) conn: ConnectionManager,
    pub(super) provider: &'static str,
    pub(super) keys: Keys,
    pub(super) limits: Vec<Limit>,
    pub(super) max_wait: Duration,
    pub(super) probe_every: Duration,
    pub(super) daily_units: u64,
    pub(super) usd_per_million: f64,
    pub(super) concurrency: usize,
}

/// A budget shared by the fleet; cheap to clone.
#[derive(Clone)]
pub struct Budget {
    inner: Arc<BudgetInner>,
}

#[derive(Clone)]
struct BudgetInner {
    conn: ConnectionManager,
    provider: &'static str,
    keys: Keys,
    limits: Vec<Limit>,
    max_wait: Duration,
    probe_every: Duration,
    /// Tokens (embeddings) or pages (LlamaParse) per UTC day; 0 is no cap.
    daily_units: u64,
    usd_per_million: f64,
    aimd: Arc<Aimd>,
    /// How long a request may be in flight: until then it counts in every window of the provider.
    request_timeout: Duration,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("bucket", &self.inner.keys.bucket)
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

impl Budget {
    pub(super) fn new(parts: BudgetParts) -> Self {
        Self {
            inner: Arc::new(BudgetInner {
                conn: parts.conn,
                provider: parts.provider,
                keys: parts.keys,
                limits: parts.limits,
                max_wait: parts.max_wait,
                probe_every: parts.probe_every,
                daily_units: parts.daily_units,
                usd_per_million: parts.usd_per_million,
                aimd: Aimd::new(parts.concurrency),
                request_timeout: super::REQUEST_TIMEOUT,
            }),
        }
    }
    /// Reserves `costs` (dimension name, units) for one call: waits its turn for the fleet's budget and for this
    /// process's concurrency, or fails with a deferral when the wait would exceed `quota.max_wait`, the provider
    /// is paused, or today's budget is spent.
    pub async fn acquire(&self, costs: &[(&'static str, f64)]) -> Result<Permit, ProviderError> {
        self.turn().acquire(costs, false).await
    }

    /// The largest cost, in `dimension`'s units, one request should have: what first in line is granted within
    /// `quota.max_wait` ([`Limit::largest_request`]), and at most a tenth of the limit, so that whole requests
    /// fill at least nine tenths of any window of the provider. Larger work goes as several requests of one
    /// [`Turn`]. `None` when the budget does not limit `dimension`.
    pub fn largest_request(&self, dimension: &str) -> Option<f64> {
        let b = &*self.inner;
        b.limits.iter().find(|l| l.name == dimension).map(|l| {
            l.largest_request(b.max_wait)
                .min(l.limit * WINDOW_SHARE)
                .max(1.0)
        })
    }

    /// Settles a call that got an answer: corrects each dimension by what it really cost (`actual`, by name;
    /// absent dimensions cost what was reserved), lowers buckets to the provider's `remaining` counts, grows
    /// the process's concurrency, ends a pause the call probed, and adds `spent` to today's budget.
    pub async fn settle(
        &self,
        mut permit: Permit,
        actual: &[(&'static str, f64)],
        remaining: &[(&'static str, f64)],
        spent: u64,
    ) {
        permit.end_flight(Some(actual)).await;
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
                .key(&b.keys.bucket)
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
        if let Some(reason) = permit.probe {
            let r: Result<i64, _> = conn.del(&[&b.keys.pause, &b.keys.probe]).await;
            if r.is_ok() {
                match reason {
                    PauseReason::Quota => tracing::info!(
                        provider = b.provider,
                        "The probe succeeded: the provider's quota is back, the pause is over"
                    ),
                    PauseReason::Auth => tracing::info!(
                        provider = b.provider,
                        "The probe succeeded: the provider accepts our key again, the pause is over"
                    ),
                }
            }
        }
    }

    /// How long a request of this budget may be in flight (its client's request timeout; 60 s when not said):
    /// until then it counts in every window of the provider.
    pub fn with_request_timeout(self, timeout: Duration) -> Self {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        inner.request_timeout = timeout;
        Self {
            inner: Arc::new(inner),
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
            let key = format!("{}:{}", b.keys.spent, chrono::Utc::now().format("%Y-%m-%d"));
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

    /// Settles a call by how it ended: a 429 cools the fleet down, running out of quota or a refused key pauses
    /// the provider, anything else only gives the slot back.
    pub async fn settle_error(&self, mut permit: Permit, error: &ProviderError) {
        permit.end_flight(Some(&[])).await;
        match error {
            ProviderError::RateLimited { retry_after, .. } => self.cool_down(*retry_after).await,
            ProviderError::QuotaExhausted { message, .. } => {
                self.pause(PauseReason::Quota, message).await
            }
            ProviderError::Unauthorized { message, .. } => {
                self.pause(PauseReason::Auth, message).await
            }
            _ => {}
        }
    }

    /// The provider answered 429: every replica waits `retry_after` (one second when it did not say), and this
    /// process halves its concurrency.
    pub async fn cool_down(&self, retry_after: Option<Duration>) {
        let b = &*self.inner;
        b.aimd.back_off();
        let ms = millis(retry_after.unwrap_or(Duration::from_secs(1))).max(1);
        metrics::counter!(crate::metrics::QUOTA_COOLDOWNS, "provider" => b.provider).increment(1);
        let mut conn = b.conn.clone();
        let r: Result<i64, _> = COOLDOWN
            .key(&b.keys.cooldown)
            .arg(ms)
            .invoke_async(&mut conn)
            .await;
        if let Err(e) = r {
            tracing::warn!(provider = b.provider, error = %e, "Could not share a cool-down with the fleet");
        }
    }

    /// Pauses the provider fleet-wide until a probe call succeeds or an operator resumes it: it ran out of quota or
    /// credit (`Quota`), or refused our key (`Auth`). Its documents wait meanwhile. A pause already in force for
    /// the same reason (a probe that failed) only restarts the probe interval.
    pub async fn pause(&self, reason: PauseReason, message: &str) {
        let b = &*self.inner;
        let mut conn = b.conn.clone();
        let r: Result<i64, _> = PAUSE
            .key(&b.keys.pause)
            .key(&b.keys.probe)
            .arg(format!("{}: {message}", reason.as_str()))
            .arg(reason.as_str())
            .arg(millis(b.probe_every).max(1))
            .invoke_async(&mut conn)
            .await;
        if let Ok(0) = r {
            tracing::warn!(
                provider = b.provider,
                reason = reason.as_str(),
                %message,
                "The probe call failed: the provider stays paused fleet-wide"
            );
            return;
        }
        metrics::counter!(crate::metrics::QUOTA_PAUSES, "provider" => b.provider, "reason" => reason.as_str())
            .increment(1);
        if let Err(e) = &r {
            tracing::warn!(provider = b.provider, error = %e, "Could not pause the provider fleet-wide");
        }
        match reason {
            PauseReason::Quota => tracing::error!(
                provider = b.provider,
                %message,
                "Out of quota: the provider is paused fleet-wide; its documents wait"
            ),
            PauseReason::Auth => tracing::error!(
                provider = b.provider,
                %message,
                probe_every_s = b.probe_every.as_secs_f64(),
                "The provider refused our API key: it is paused fleet-wide and its documents wait. Fix the key; a \
                 probe call tests it every pipeline.quota_wait, or `producer quota resume <provider>` ends the pause"
            ),
        }
    }

    /// The error of a call refused because the provider is paused for `reason`.
    fn paused(&self, reason: PauseReason) -> ProviderError {
        let b = &*self.inner;
        let resume = format!(
            "a probe call every {:.1} s tests it; `producer quota resume {}` ends it",
            b.probe_every.as_secs_f64(),
            b.provider
        );
        match reason {
            PauseReason::Quota => ProviderError::QuotaExhausted {
                provider: b.provider,
                message: format!(
                    "the provider is paused fleet-wide after running out of quota ({resume})"
                ),
            },
            PauseReason::Auth => ProviderError::Unauthorized {
                provider: b.provider,
                message: format!(
                    "the provider is paused fleet-wide after refusing our key ({resume})"
                ),
            },
        }
    }

    async fn spent_today(&self) -> u64 {
        let b = &*self.inner;
        let key = format!("{}:{}", b.keys.spent, chrono::Utc::now().format("%Y-%m-%d"));
        let mut conn = b.conn.clone();
        conn.get::<_, Option<u64>>(&key)
            .await
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// Refuses the call when today's budget is spent (a cap of 0 is none).
    async fn check_daily_budget(&self) -> Result<(), ProviderError> {
        let b = &*self.inner;
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
        Ok(())
    }

    /// What `acquire.lua`'s final answer means for the call: reserved (after sleeping until it may go), a probe
    /// of a pause (with its reason), or an error (paused, or deferred by the line).
    async fn answer(
        &self,
        status: i64,
        wait_ms: i64,
        reason: &str,
        started: Instant,
    ) -> Result<Option<PauseReason>, ProviderError> {
        let b = &*self.inner;
        match status {
            RESERVED => {
                if wait_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(wait_ms as u64)).await;
                }
                crate::metrics::quota_waited(b.provider, started.elapsed());
                Ok(None)
            }
            PROBE => {
                let reason = PauseReason::of(reason);
                tracing::info!(
                    provider = b.provider,
                    reason = reason.as_str(),
                    "The provider is paused fleet-wide; this call probes whether it is back"
                );
                Ok(Some(reason))
            }
            PAUSED => Err(self.paused(PauseReason::of(reason))),
            _ => {
                debug_assert_eq!(status, DEFERRED);
                metrics::counter!(crate::metrics::QUOTA_DEFERRED, "provider" => b.provider)
                    .increment(1);
                Err(ProviderError::Throttled {
                    provider: b.provider,
                    retry_after: Duration::from_millis(wait_ms.max(1) as u64),
                })
            }
        }
    }

    /// This process's current concurrency limit.
    pub fn concurrency(&self) -> usize {
        self.inner.aimd.limit()
    }
}

/// The budget's limits that `costs` names, each with its cost, in the budget's order.
fn dimensions<'a>(limits: &'a [Limit], costs: &[(&'static str, f64)]) -> Vec<(&'a Limit, f64)> {
    limits
        .iter()
        .filter_map(|l| {
            costs
                .iter()
                .find(|(n, _)| *n == l.name)
                .map(|(_, c)| (l, *c))
        })
        .collect()
}
