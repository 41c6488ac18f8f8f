//! `fake-providers`: fake LlamaParse (v1, v2) and OpenAI embeddings on one port, with latency, rate limits and
//! injected faults, for the `mock` deploy profile, benchmarks and trying clients. See `tests::fake`.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::Parser;
use tests::fake::{FakeConfig, serve};

/// Serves fake provider APIs. The configuration (JSON, every field optional) can be replaced at run time with
/// `PUT /_fake/config`; `GET /_fake/stats` counts calls.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Where to listen.
    #[arg(long, env = "FAKE_PROVIDERS_LISTEN", default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
    /// A JSON configuration file (see `tests/src/fake.rs`: latency, rate limits, faults, keys).
    #[arg(long, env = "FAKE_PROVIDERS_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a valid configuration", path.display()))?
        }
        None => FakeConfig::default(),
    };
    serve(args.listen, config)
        .await
        .with_context(|| format!("cannot serve on {}", args.listen))
}
