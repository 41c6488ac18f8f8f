//! `[quota]`: the fleet-wide provider budgets (see `upload_pipeline::quota`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{SettingsError, ensure};

/// The fleet-wide provider budgets (see `upload_pipeline::quota`); a limit of 0 is no limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSettings {
    /// Longest a call waits in-process for its budget; a longer wait defers the job to the queue instead.
    /// Embedding requests are sized so that one is granted within it; a single chunk that never could be
    /// (`chunking.max_tokens` against `quota.openai.tokens_per_minute`) is refused at start-up.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Embeddings (OpenAI-compatible).
    pub openai: OpenAiQuota,
    /// LlamaParse.
    pub llamaparse: LlamaParseQuota,
}

/// The embedding provider's limits (per model and key) and the fleet's daily budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiQuota {
    /// Requests per minute (OpenAI tier 1: 3,000).
    pub requests_per_minute: u64,
    /// Tokens per minute (OpenAI tier 1: 1,000,000).
    pub tokens_per_minute: u64,
    /// Tokens per UTC day for the whole fleet; past it, jobs wait for the next day.
    pub daily_tokens: u64,
    /// Price, for the cost metric (text-embedding-3-small: 0.02).
    pub usd_per_million_tokens: f64,
}

/// LlamaParse's limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaParseQuota {
    /// Uploads per `window` (LlamaCloud: 50 per 10 s per organisation).
    pub uploads: u64,
    /// The upload window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Pages per UTC day for the whole fleet; past it, parse jobs wait for the next day.
    pub pages_per_day: u64,
}

impl QuotaSettings {
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        ensure(
            self.max_wait <= Duration::from_secs(600),
            "quota.max_wait",
            "must be at most 10m",
        )?;
        ensure(
            !self.llamaparse.window.is_zero(),
            "quota.llamaparse.window",
            "must be above zero",
        )?;
        let usd = self.openai.usd_per_million_tokens;
        ensure(
            usd.is_finite() && usd >= 0.0,
            "quota.openai.usd_per_million_tokens",
            "must be a finite number, not negative",
        )
    }
}
