//! `[pipeline]`: limits of one document, and how the reconciler recovers stages that Redis lost.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{SettingsError, ensure};

/// Limits and recovery of the document pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// A stage untouched this long (running stages touch their row every third of it) is checked by the
    /// reconciler, which pushes its job again when it is nowhere in Redis (Redis down between commit and push).
    /// Pushes are deduplicated by job id, so a short value never duplicates work. Must exceed
    /// `pipeline.reconcile_interval`.
    #[serde(with = "humantime_serde")]
    pub reconcile_after: Duration,
    /// How often the reconciler looks (a Redis that lost its data is noticed within one interval).
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// Most pages a document may have.
    pub max_pages: usize,
    /// Most characters of text a document may yield.
    pub max_chars: usize,
    /// Longest time one parse (and one chunking) of a document may take. In a worker the local parsers run in
    /// a helper process that is killed at this deadline.
    #[serde(with = "humantime_serde")]
    pub parse_timeout: Duration,
    /// Address space a worker's parse helper process may use, in MiB (0: no bound); a parse that needs more
    /// fails its document instead of starving the worker.
    pub parse_memory_mb: u64,
    /// How long a stage waits before asking a provider that is out of quota again (documents wait, never fail).
    #[serde(with = "humantime_serde")]
    pub quota_wait: Duration,
}

impl PipelineSettings {
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        ensure(
            !self.quota_wait.is_zero() && self.quota_wait <= Duration::from_secs(3600),
            "pipeline.quota_wait",
            "must be between 1ms and 1h",
        )?;
        ensure(
            !self.reconcile_interval.is_zero(),
            "pipeline.reconcile_interval",
            "must be above zero",
        )?;
        ensure(
            self.reconcile_after > self.reconcile_interval,
            "pipeline.reconcile_after",
            "must exceed pipeline.reconcile_interval: the reconciler looks every reconcile_interval for \
             stages untouched for reconcile_after (running stages touch theirs every third of it)",
        )
    }
}
