//! `serve`: the HTTP API server, or with `--check` a pre-flight check of its settings and providers.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use upload_pipeline::{Settings, telemetry};

/// Serves the API until a shutdown signal, on `listen` when given instead of the configured address.
pub async fn run(
    mut settings: Settings,
    listen: Option<SocketAddr>,
    check: bool,
) -> anyhow::Result<()> {
    if let Some(listen) = listen {
        settings.api.listen = listen;
        settings.validate().context("Invalid settings")?;
    }
    if check {
        return preflight(&settings);
    }
    super::start_logging(&settings, "info")?;
    // The producer embeds search queries; its stage series are the pushes and the reconciler's requeues.
    let operations = upload_pipeline::providers::operations(&settings, false, true);
    let metrics = telemetry::init_metrics("producer", &["parse", "chunk", "embed"], &operations)
        .context("Failed to start metrics")?;
    let shutdown = async {
        let _ = upload_pipeline::shutdown::signal().await;
    };
    upload_pipeline::api::run_server(Arc::new(settings), Some(metrics), shutdown)
        .await
        .context("The producer failed")?;
    Ok(())
}

/// Builds the query embedder and the reranker without connecting to anything, and says the server is ready to start.
fn preflight(settings: &Settings) -> anyhow::Result<()> {
    upload_pipeline::providers::embedder(settings, None)
        .context("The query embedder cannot start")?;
    let reranker = upload_pipeline::providers::reranker(settings, None)
        .context("The reranker cannot start")?
        .map_or_else(
            || "none".to_owned(),
            |r| format!("{} {}", r.provider(), r.model()),
        );
    println!(
        "serve on {}: settings and providers ready (embedder {:?}, reranker {reranker})",
        settings.api.listen, settings.embedding.embedder
    );
    Ok(())
}
