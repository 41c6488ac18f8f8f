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
    #[allow(missing_docs)]
    Filter {
        filter: String,
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

/// Installs the Prometheus recorder with each histogram's explicit buckets (never summaries), describes every
/// metric of the catalogue and creates, at zero, the series a process of `role` running `stages` with `providers`
/// (provider, operation) will report.
pub fn init_metrics(
    role: &'static str,
    stages: &[&str],
    providers: &[(&'static str, &'static str)],
) -> Result<PrometheusHandle, TelemetryError> {
    let mut builder = PrometheusBuilder::new();
    for m in crate::metrics::CATALOGUE
        .iter()
        .filter(|m| m.kind == crate::metrics::Kind::Histogram)
    {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(m.name.into()), m.buckets)
            .map_err(|e| TelemetryError::AlreadySet(e.to_string()))?;
    }
    let handle = builder
        .install_recorder()
        .map_err(|e| TelemetryError::AlreadySet(e.to_string()))?;
    crate::metrics::describe();
    crate::metrics::register_series(role, stages, providers);
    Ok(handle)
}
