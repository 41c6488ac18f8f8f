//! `[log]`: the format and filter of log lines.

use serde::{Deserialize, Serialize};

/// Log output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `text` for people, `json` for log pipelines (`LOG_FORMAT`).
    pub format: LogFormat,
    /// A tracing filter such as `info,upload_pipeline=debug` (`RUST_LOG`).
    pub filter: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}
