//! `make bench`: every benchmark scenario, one after the other, on the machine's real Postgres and Redis, with
//! release-built workers. Writes `tests/bench-results/<scenario>.json`, Markdown sections and PNG plots, then
//! `summary.md` with the targets on top. Not part of `make test`: timings on a shared machine are measured here,
//! as medians and percentiles with their spread, never asserted by tests.

use std::{path::PathBuf, time::Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tests::bench::{backlog, pipeline, quality, report, scale, search};

#[derive(Parser, Debug)]
#[command(about = "Runs the benchmark scenarios and writes tests/bench-results/")]
struct Args {
    /// Scenarios to run, comma-separated: queue, pipeline-instant, pipeline-realistic, search, scale, backlog,
    /// quality, or all.
    #[arg(long, default_value = "all", value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Where the results go.
    #[arg(long, default_value_os_t = default_out())]
    out: PathBuf,
    /// queue: runs of every configuration (round-robin, ours and BullMQ alternating).
    #[arg(long, default_value_t = 3)]
    queue_runs: usize,
    /// queue: jobs per run.
    #[arg(long, default_value_t = 20_000)]
    queue_jobs: usize,
    /// queue: seconds of the pickup-latency phase (1,000 jobs a second offered; `make bench-queue`: 10).
    #[arg(long, default_value_t = 3.0)]
    queue_latency_seconds: f64,
    /// pipeline-instant: documents uploaded.
    #[arg(long, default_value_t = 300)]
    instant_documents: usize,
    /// pipeline-realistic: documents offered at each rate (the window is documents / rate).
    #[arg(long, default_value_t = 40)]
    realistic_documents: usize,
    /// pipeline-realistic: the offered rates, documents a second.
    #[arg(long, default_value = "0.5,1,2", value_delimiter = ',')]
    realistic_rates: Vec<f64>,
    /// search: chunks stored, across the tenants (384 dimensions).
    #[arg(long, default_value_t = 1_000_000)]
    search_chunks: usize,
    /// search: tenants, of sizes from 10 chunks to 300,000 (or 30 % of the chunks, if fewer).
    #[arg(long, default_value_t = 1000)]
    search_tenants: usize,
    /// search: queries per tenant-size bucket (each run once in vector mode and once in hybrid mode).
    #[arg(long, default_value_t = 200)]
    search_queries: usize,
    /// scale: documents per run (`make bench-scale`: 240).
    #[arg(long, default_value_t = 120)]
    scale_documents: usize,
    /// scale: runs per process count (`make bench-scale`: 3).
    #[arg(long, default_value_t = 2)]
    scale_runs: usize,
    /// backlog: documents uploaded at once.
    #[arg(long, default_value_t = 1000)]
    backlog_documents: usize,
    /// backlog: words per document (24,000 make a full 64-chunk embed batch of 512-token chunks per document).
    #[arg(long, default_value_t = tests::bench::backlog::WORDS)]
    backlog_words: usize,
    /// backlog: LlamaParse uploads per 10 s, enforced by the fake and set as the fleet's quota (60: about 171 s
    /// of uploads for 1,000 documents).
    #[arg(long, default_value_t = 60)]
    backlog_uploads_per_10s: u64,
    /// backlog: OpenAI tokens a minute, enforced by the fake and set as the fleet's quota (binds below about
    /// 3,250 tokens a document times the upload rate).
    #[arg(long, default_value_t = 1_000_000)]
    backlog_tokens_per_minute: u64,
    /// backlog: parse jobs the parse worker runs at once (above uploads a second times about 8 s a job, so that
    /// the upload quota binds, not the slots).
    #[arg(long, default_value_t = 56)]
    backlog_parse_concurrency: usize,
    /// backlog: longest wait for every document to settle, seconds; past it, what finished is reported.
    #[arg(long, default_value_t = 900)]
    backlog_deadline_seconds: u64,
    /// quality: longest wait for the 56 pages of the evaluation set to be ready, seconds.
    #[arg(long, default_value_t = 1200)]
    quality_deadline_seconds: u64,
    /// quality: variants of `[search]` measured on the same chunks after the main run, separated by `;`, each
    /// `field=value,...` (candidates, rrf_k, vector_weight, keyword_weight, identifier_boost, text_config); ""
    /// for none. The main run takes `[search]`, `[chunking]` and `[embedding]` from the environment
    /// (`UPLOAD_PIPELINE__SEARCH__RRF_K`).
    #[arg(long, value_delimiter = ';', default_value = quality::SWEEP)]
    quality_sweep: Vec<String>,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

fn default_out() -> PathBuf {
    repo_root().join("tests/bench-results")
}

async fn run(name: &str, args: &Args) -> Result<()> {
    let out = args.out.clone();
    match name {
        "queue" => {
            let status = std::process::Command::new("bash")
                .arg(repo_root().join("tests/bench/queue.sh"))
                .env("RUNS", args.queue_runs.to_string())
                .env("N", args.queue_jobs.to_string())
                .env("LATENCY_SECONDS", args.queue_latency_seconds.to_string())
                .env("OUT", &out)
                .status()
                .context("running tests/bench/queue.sh")?;
            if !status.success() {
                bail!("tests/bench/queue.sh failed ({status})");
            }
            report::queue(&out)
        }
        "pipeline-instant" => {
            let r = pipeline::instant(args.instant_documents, 8).await?;
            report::instant(&out, &r)
        }
        "pipeline-realistic" => {
            let r = pipeline::realistic(&args.realistic_rates, args.realistic_documents, 7).await?;
            report::realistic(&out, &r)
        }
        "search" => {
            let r = search::run(search::Config {
                chunks: args.search_chunks,
                tenants: args.search_tenants,
                queries: args.search_queries,
            })
            .await?;
            report::search(&out, &r)
        }
        "scale" => {
            let s = scale::scale_out(args.scale_documents, args.scale_runs).await;
            let c = scale::capacity().await;
            report::scale(&out, &s, &c)
        }
        "backlog" => {
            let r = backlog::run(backlog::Config {
                documents: args.backlog_documents,
                words: args.backlog_words,
                uploads_per_window: args.backlog_uploads_per_10s,
                tokens_per_minute: args.backlog_tokens_per_minute,
                parse_concurrency: args.backlog_parse_concurrency,
                deadline_seconds: args.backlog_deadline_seconds,
            })
            .await?;
            report::backlog(&out, &r)
        }
        "quality" => {
            let r = quality::run(quality::Config {
                eval_dir: repo_root().join("tests/fixtures/eval"),
                model_dir: repo_root().join("models/all-MiniLM-L6-v2"),
                deadline: std::time::Duration::from_secs(args.quality_deadline_seconds),
                sweep: args.quality_sweep.clone(),
            })
            .await?;
            report::quality(&out, &r)
        }
        other => bail!(
            "unknown scenario {other:?}: expected one of {}",
            report::SCENARIOS.join(", ")
        ),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let names: Vec<String> = if args.scenarios.iter().any(|s| s == "all") {
        report::SCENARIOS.iter().map(|s| s.to_string()).collect()
    } else {
        args.scenarios.clone()
    };
    for n in &names {
        if !report::SCENARIOS.contains(&n.as_str()) {
            bail!(
                "unknown scenario {n:?}: expected one of {}, or all",
                report::SCENARIOS.join(", ")
            );
        }
    }
    tests::bench::plot::init_font()?;
    std::fs::create_dir_all(&args.out)?;
    // The workers measured are the release build beside this binary (`make bench` builds both).
    let worker = tests::worker_bin();
    if !worker.is_file() {
        bail!(
            "no worker binary at {}: build the workspace first (make bench does)",
            worker.display()
        );
    }
    let started = Instant::now();
    let args = std::sync::Arc::new(args);
    let mut failed = Vec::new();
    for name in &names {
        eprintln!("== {name}");
        let t = Instant::now();
        let (n, a) = (name.clone(), args.clone());
        // Each scenario in a task of its own: a panic in one (a broken invariant) is reported, and the rest run.
        match tokio::spawn(async move { run(&n, &a).await }).await {
            Ok(Ok(())) => eprintln!("== {name}: done in {:.0} s", t.elapsed().as_secs_f64()),
            Ok(Err(e)) => {
                eprintln!("== {name}: FAILED: {e:#}");
                failed.push(name.clone());
            }
            Err(e) => {
                eprintln!("== {name}: FAILED: {e}");
                failed.push(name.clone());
            }
        }
    }
    let header = format!(
        "Run {} UTC on {} ({} cores); release build; {} s in all. Scenarios: {}.",
        chrono::Utc::now().format("%Y-%m-%d %H:%M"),
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        started.elapsed().as_secs(),
        names.join(", ")
    );
    let met = report::summary(&args.out, &header)?;
    let summary = args.out.join("summary.md");
    println!("{}", std::fs::read_to_string(&summary)?);
    eprintln!("written: {}", summary.display());
    if !failed.is_empty() {
        bail!("scenarios failed: {}", failed.join(", "));
    }
    if !met {
        eprintln!("some targets were not met (see the table above)");
    }
    Ok(())
}
