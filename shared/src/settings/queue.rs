//! `[queue]`: the Redis job queues, their redelivery and their backoff.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{SettingsError, ensure};

/// Settings of the job queues.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    /// Prefix of every Redis key; give each deployment (or test) its own.
    pub key_prefix: String,
    /// Upper bound on how long the jobs of a killed worker wait before another replica runs them. Live workers
    /// refresh their claims every quarter of it; claims idle for half of it are taken over.
    #[serde(with = "humantime_serde")]
    pub reclaim_after: Duration,
    /// Attempts a job gets (runs that failed, panicked or never finished) before it goes to the dead letters.
    pub max_deliveries: u32,
    /// How long an idle worker's blocking read waits before it looks around (stale claims, shutdown).
    #[serde(with = "humantime_serde")]
    pub block_timeout: Duration,
    /// Backoff before the second attempt; it doubles per attempt, with jitter.
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    /// Longest backoff between two attempts.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Dead letters kept per queue; the oldest are dropped beyond it.
    pub dead_letter_max: u64,
}

impl QueueSettings {
    /// The delay before attempt `failed_attempt + 1`: `retry_base * 2^(failed_attempt - 1)`, capped at
    /// `retry_max`, of which a random half is kept ("equal jitter"), so retries of a burst spread out.
    pub fn backoff(&self, failed_attempt: u32) -> Duration {
        let exp = failed_attempt.saturating_sub(1).min(30);
        let full = self
            .retry_base
            .saturating_mul(1u32 << exp)
            .min(self.retry_max);
        let half = full / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        let prefix = &self.key_prefix;
        ensure(
            !prefix.is_empty() && prefix.len() <= 100 && !prefix.contains(['{', '}', ' ']),
            "queue.key_prefix",
            "must be 1 to 100 characters without spaces or braces",
        )?;
        ensure(
            (Duration::from_millis(200)..=Duration::from_secs(24 * 3600))
                .contains(&self.reclaim_after),
            "queue.reclaim_after",
            "must be between 200ms and 24h",
        )?;
        ensure(
            (1..=1000).contains(&self.max_deliveries),
            "queue.max_deliveries",
            "must be between 1 and 1000",
        )?;
        ensure(
            (Duration::from_millis(10)..=Duration::from_secs(60)).contains(&self.block_timeout),
            "queue.block_timeout",
            "must be between 10ms and 60s",
        )?;
        ensure(
            !self.retry_base.is_zero() && self.retry_base <= self.retry_max,
            "queue.retry_base",
            "must be above zero and at most queue.retry_max",
        )?;
        ensure(
            self.dead_letter_max > 0,
            "queue.dead_letter_max",
            "must be at least 1",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let q = QueueSettings {
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(10),
            ..Default::default()
        };
        for _ in 0..100 {
            let first = q.backoff(1);
            assert!(
                first >= Duration::from_millis(500) && first <= Duration::from_secs(1),
                "{first:?}"
            );
            let third = q.backoff(3);
            assert!(
                third >= Duration::from_secs(2) && third <= Duration::from_secs(4),
                "{third:?}"
            );
            assert!(q.backoff(30) <= Duration::from_secs(10));
        }
    }
}
