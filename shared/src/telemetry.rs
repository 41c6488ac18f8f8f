//! Logging (tracing) and the Prometheus recorder.

use std::io::IsTerminal;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::settings::{LogFormat, LogSettings};

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter does not parse.
    #[error("invalid log filter {filter:?}: {source}")]
    Filter {
        /// The filter given.
        filter: String,
        /// The parser's complaint.
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber or recorder was installed already.
    #[error("telemetry is already initialised: {0}")]
    AlreadySet(String),
}

/// Installs the global tracing subscriber: text or JSON lines on stderr, filtered by `settings.filter`.
/// Text is coloured only when stderr is a terminal, so log files stay plain.
pub fn init_logging(settings: &LogSettings) -> Result<(), TelemetryError> {
    let filter = EnvFilter::try_new(&settings.filter).map_err(|source| TelemetryError::Filter {
        filter: settings.filter.clone(),
        source,
    })?;
    let registry = tracing_subscriber::registry().with(filter);
    let res = match settings.format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init(),
    };
    res.map_err(|e| TelemetryError::AlreadySet(e.to_string()))
}

/// Installs the Prometheus recorder with explicit histogram buckets (never summaries) and describes every metric.
pub fn init_metrics() -> Result<PrometheusHandle, TelemetryError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            crate::metrics::DURATION_BUCKETS,
        )
        .map_err(|e| TelemetryError::AlreadySet(e.to_string()))?
        .install_recorder()
        .map_err(|e| TelemetryError::AlreadySet(e.to_string()))?;
    crate::metrics::describe();
    metrics::gauge!(crate::metrics::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}
