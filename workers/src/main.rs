//! `worker`: runs the chosen pipeline stages until SIGTERM or SIGINT, then drains.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::Parser;
use upload_pipeline::{
    Settings, db,
    jobs::{self, Pipeline, Stage},
    providers,
    quota::Quota,
    runtime::Runtime,
    shutdown, telemetry,
};

/// Runs pipeline stages: fetches their jobs from Redis and processes them.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Stages this process runs, comma-separated: parse, chunk, embed (the document pipeline) and synthetic
    /// (simulated work for load tests).
    #[arg(long, value_delimiter = ',', default_value = "parse,chunk,embed")]
    stages: Vec<Stage>,
    /// Where to serve /healthz and /metrics (overrides worker.metrics_addr).
    #[arg(long, env = "METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// A TOML settings file (see deploy/config.example.toml).
    #[arg(long, env = "UPLOAD_PIPELINE_CONFIG")]
    config: Option<PathBuf>,
    /// Check the settings and the providers of the chosen stages (keys present, model files loadable), print
    /// what would run, and exit without connecting to anything: a pre-flight check for deploy files.
    #[arg(long)]
    check: bool,
    /// Internal: parse one document of this kind from stdin in a bounded helper process, print JSON, exit.
    #[arg(long, hide = true)]
    parse_one: Option<String>,
    /// Internal: the helper's page limit.
    #[arg(long, hide = true, default_value_t = 0)]
    parse_max_pages: usize,
    /// Internal: the helper's character limit.
    #[arg(long, hide = true, default_value_t = 0)]
    parse_max_chars: usize,
    /// Internal: the helper's address-space bound in MiB (0: none).
    #[arg(long, hide = true, default_value_t = 0)]
    parse_memory_mb: u64,
    /// Internal: chunk one document's parsed sections (JSON) from stdin in a bounded helper process, print JSON,
    /// exit.
    #[arg(long, hide = true)]
    chunk_one: bool,
    /// Internal: the chunk helper's most tokens per chunk.
    #[arg(long, hide = true, default_value_t = 0)]
    chunk_max_tokens: usize,
    /// Internal: the chunk helper's overlap in tokens.
    #[arg(long, hide = true, default_value_t = 0)]
    chunk_overlap_tokens: usize,
    /// Internal: the chunk helper's most chunks per document.
    #[arg(long, hide = true, default_value_t = 0)]
    chunk_max_chunks: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The parse and chunk helpers run before anything else starts (no runtime, no threads, no connections).
    if args.chunk_one {
        std::process::exit(upload_pipeline::helper::chunk_helper_main(
            upload_pipeline::helper::ChunkSizes {
                max_tokens: args.chunk_max_tokens,
                overlap_tokens: args.chunk_overlap_tokens,
                max_chunks: args.chunk_max_chunks,
            },
            args.parse_memory_mb,
        ));
    }
    if let Some(kind) = &args.parse_one {
        std::process::exit(providers::local::parse_helper_main(
            kind,
            args.parse_max_pages,
            args.parse_max_chars,
            args.parse_memory_mb,
        ));
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("Failed to start the async runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut settings = Settings::load(args.config.as_deref()).context("Failed to load settings")?;
    if let Some(addr) = args.metrics_addr {
        settings.worker.metrics_addr = addr;
    }
    telemetry::init_logging(&settings.log).context("Failed to start logging")?;
    let mut stages = args.stages;
    stages.sort();
    stages.dedup();
    let names: Vec<&str> = stages.iter().map(|s| s.as_str()).collect();
    if args.check {
        if stages.contains(&Stage::Parse) {
            providers::parser(&settings, None).context("The parse stage cannot start")?;
        }
        if stages.contains(&Stage::Embed) {
            providers::embedder(&settings, None).context("The embed stage cannot start")?;
        }
        println!(
            "stages {}: settings and providers ready (parser {:?}, embedder {:?}, concurrency {})",
            names.join(","),
            settings.parsing.parser,
            settings.embedding.embedder,
            stages
                .iter()
                .map(|s| s.concurrency(&settings.worker.concurrency).to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        return Ok(());
    }
    let operations = providers::operations(
        &settings,
        stages.contains(&Stage::Parse),
        stages.contains(&Stage::Embed),
    );
    let metrics = telemetry::init_metrics("worker", &names, &operations)
        .context("Failed to start metrics")?;
    let settings = Arc::new(settings);
    let runtime = Runtime::connect(settings.clone())
        .await
        .context("Failed to connect to Redis")?;
    // Local parsing and chunking happen in helper processes of this binary, bounded in time and memory.
    if stages.contains(&Stage::Parse) || stages.contains(&Stage::Chunk) {
        let exe = std::env::current_exe().context("Failed to find the worker executable")?;
        upload_pipeline::helper::register(exe);
    }
    let pipeline = if jobs::needs_pipeline(&stages) {
        let slots: usize = stages
            .iter()
            .map(|s| s.concurrency(&settings.worker.concurrency))
            .sum();
        let pool = db::connect(&settings, slots.clamp(2, 64) as u32)
            .await
            .context("Failed to connect to PostgreSQL")?;
        let quota = Quota::connect(&settings)
            .await
            .context("Failed to connect to Redis for the quota state")?;
        let embedder = providers::embedder(&settings, Some(&quota))
            .context("Failed to set up the embedder")?;
        // A process without the parse stage never parses: it needs no LlamaParse client (nor its key).
        let parser: Arc<dyn providers::Parser> = if stages.contains(&Stage::Parse) {
            providers::parser(&settings, Some(&quota)).context("Failed to set up the parser")?
        } else {
            Arc::new(providers::local::LocalParser::new(&settings.pipeline))
        };
        Some(
            Pipeline::new(pool, runtime.broker(), embedder, parser, settings.clone())
                .context("Failed to open the stage queues")?,
        )
    } else {
        None
    };
    let runtime = jobs::register(runtime, &stages, pipeline.as_ref())
        .context("Failed to register the stages")?;
    runtime
        .run(Some(metrics), shutdown::signal())
        .await
        .context("The worker failed")?;
    Ok(())
}
