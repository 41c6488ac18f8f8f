//! The `producer` command line: its grammar in [`args`], and one module per group of commands that does their work
//! and prints the outcome.

mod args;
pub mod documents;
pub mod failures;
mod output;
pub mod queue;
pub mod quota;
pub mod serve;
pub mod setup;
pub mod synthetic;

use anyhow::Context;
use upload_pipeline::{Settings, queue::Broker, telemetry};

pub use args::{Args, Command};

/// The log filter of commands that talk to people on stdout, unless `RUST_LOG` asks otherwise.
const QUIET: &str = "warn";

/// Starts logging to stderr with `default_filter` in place of the configured filter, unless `RUST_LOG` is set.
fn start_logging(settings: &Settings, default_filter: &str) -> anyhow::Result<()> {
    let mut log = settings.log.clone();
    if std::env::var_os("RUST_LOG").is_none() {
        log.filter = default_filter.into();
    }
    telemetry::init_logging(&log).context("Failed to start logging")
}

/// Connects to the stage queues in Redis.
async fn connect_broker(settings: &Settings) -> anyhow::Result<Broker> {
    Broker::connect(settings.redis_url.expose(), settings.queue.clone())
        .await
        .context("Failed to connect to Redis")
}
