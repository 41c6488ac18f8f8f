//! `[worker]`: a worker process's endpoint, shutdown drain and per-stage concurrency.

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

use super::{SettingsError, ensure};

/// Settings of worker processes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Where `/healthz` and `/metrics` are served.
    pub metrics_addr: SocketAddr,
    /// How long in-flight jobs may take to finish after SIGTERM before the worker gives them back and exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Jobs one process runs at once, per stage.
    pub concurrency: StageConcurrency,
}

/// Per-stage concurrency of one worker process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConcurrency {
    /// Parse jobs at once (CPU- or provider-bound).
    pub parse: usize,
    /// Chunk jobs at once (CPU-bound).
    pub chunk: usize,
    /// Embed jobs at once (provider- or model-bound).
    pub embed: usize,
    /// Synthetic jobs at once (load tests).
    pub synthetic: usize,
}

impl WorkerSettings {
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        ensure(
            self.shutdown_grace <= Duration::from_secs(3600),
            "worker.shutdown_grace",
            "must be at most 1h",
        )?;
        let c = &self.concurrency;
        for (field, n) in [
            ("worker.concurrency.parse", c.parse),
            ("worker.concurrency.chunk", c.chunk),
            ("worker.concurrency.embed", c.embed),
            ("worker.concurrency.synthetic", c.synthetic),
        ] {
            ensure(
                (1..=10_000).contains(&n),
                field,
                "must be between 1 and 10000",
            )?;
        }
        Ok(())
    }
}
