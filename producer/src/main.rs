//! `producer`: pushes work onto the pipeline's queues and operates them (state, failures and retries, dead
//! letters).

use std::{
    io::IsTerminal,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use upload_pipeline::{
    Settings,
    auth::Auth,
    client::Client,
    jobs::{
        Stage,
        synthetic::{FailMode, Misbehave, SyntheticJob},
    },
    queue::{Broker, QueueStats},
    retry::{self, FailureFilter},
    telemetry,
};
use uuid::Uuid;

/// Pushes work onto the upload-pipeline queues and operates them.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// A TOML settings file (see deploy/config.example.toml).
    #[arg(long, global = true, env = "UPLOAD_PIPELINE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// How CLI commands reach the API.
#[derive(Debug, clap::Args)]
struct ApiArgs {
    /// The producer API.
    #[arg(
        long,
        env = "UPLOAD_PIPELINE_API",
        default_value = "http://127.0.0.1:8080"
    )]
    api: String,
    /// A bearer token.
    #[arg(long, env = "UPLOAD_PIPELINE_TOKEN", conflicts_with = "user")]
    token: Option<String>,
    /// Act as this user, with a token minted from the configured JWT secret (development).
    #[arg(long)]
    user: Option<Uuid>,
}

impl ApiArgs {
    fn client(&self, settings: &Settings) -> anyhow::Result<Client> {
        let token = match (&self.token, self.user) {
            (Some(t), _) => t.clone(),
            (None, Some(user)) => Auth::hs256(settings.api.jwt_secret.expose()).issue(
                user,
                Duration::from_secs(3600),
                false,
            ),
            (None, None) => bail!("give --token (or UPLOAD_PIPELINE_TOKEN) or --user"),
        };
        Ok(Client::new(&self.api, &token)?)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serves the HTTP API and runs the reconciler (migrates first).
    Serve {
        /// Where to listen (overrides api.listen).
        #[arg(long, env = "LISTEN_ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// Check the settings and build the providers the API needs (the query embedder), then exit without
        /// connecting to anything: a pre-flight check for deploy files.
        #[arg(long)]
        check: bool,
    },
    /// Creates the database if missing, applies the migrations and registers the embedding model's index.
    Migrate,
    /// Checks the settings (defaults, --config file, environment) and prints them as JSON, secrets hidden: what
    /// `serve` and the workers of the same environment will run with.
    Settings {
        /// The address `serve` would listen on (LISTEN_ADDR), checked like `serve` checks it.
        #[arg(long, env = "LISTEN_ADDR")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Prints the API's OpenAPI 3.1 document (the one served at /openapi.json).
    Openapi,
    /// Prints a bearer token for a user, signed with the configured JWT secret.
    Token {
        /// The user's UUID.
        #[arg(long)]
        user: Uuid,
        /// How long it is valid.
        #[arg(long, default_value = "24h", value_parser = humantime_duration)]
        ttl: Duration,
        /// Operator rights.
        #[arg(long)]
        admin: bool,
    },
    /// Uploads files, or every file under folders, and with --wait follows them until ready.
    Upload {
        /// Files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Wait until every document is ready or failed.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Shows a document's status.
    Status {
        /// The document id.
        id: Uuid,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Searches your documents.
    Search {
        /// What to look for.
        query: String,
        /// How many results.
        #[arg(short, long, default_value_t = 5)]
        k: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Shows each stage queue: pending, in flight, delayed, dead, oldest pending age.
    Queues {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Lists failed documents of every user: counts by the stage that gave up and its reason, then the newest.
    Failures {
        #[command(flatten)]
        filter: FailureArgs,
        /// List at most this many documents (the counts cover every match).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Queues failed documents again from the stage that gave up, each under its owner's identity, keeping what
    /// the earlier stages produced; prints how many were re-queued per stage.
    Retry {
        /// Only documents in this status (failed documents are the ones a retry re-runs).
        #[arg(long, default_value = "failed", value_parser = ["failed"])]
        status: String,
        #[command(flatten)]
        filter: FailureArgs,
    },
    /// Lists, replays or purges a stage's dead letters.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Shows the fleet's provider budgets (bucket levels, cool-downs, pauses, today's spend), or resumes a provider
    /// paused for quota.
    Quota {
        #[command(subcommand)]
        action: Option<QuotaAction>,
    },
    /// Pushes a batch of synthetic jobs (simulated work) and, with --wait, follows them to the end.
    Synthetic {
        /// The stage queue to push to.
        #[arg(long, default_value = "parse")]
        stage: Stage,
        /// How many jobs.
        #[arg(long, default_value_t = 1000)]
        jobs: u64,
        /// Simulated work per job, in ms.
        #[arg(long, default_value_t = 0)]
        work_ms: u64,
        /// Share of jobs (0-100) that fail their first attempt with a retryable error.
        #[arg(long, default_value_t = 0.0)]
        fail_percent: f64,
        /// Share of jobs (0-100) that fail permanently and end in the dead letters.
        #[arg(long, default_value_t = 0.0)]
        dead_percent: f64,
        /// Wait until the queue has drained, with a progress line.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
}

/// Which failed documents `failures` and `retry` act on.
#[derive(Debug, clap::Args)]
struct FailureArgs {
    /// Only documents that failed at this stage: parse, chunk or embed.
    #[arg(long, value_parser = pipeline_stage)]
    stage: Option<Stage>,
    /// Only documents that failed since: an RFC 3339 time (2026-11-30T08:00:00Z) or a duration before now (2h).
    #[arg(long, value_parser = retry::parse_since)]
    since: Option<retry::Timestamp>,
    /// Only this user's documents.
    #[arg(long)]
    user: Option<Uuid>,
}

impl FailureArgs {
    fn filter(&self) -> FailureFilter {
        FailureFilter {
            stage: self.stage,
            since: self.since,
            user: self.user,
        }
    }
}

/// A stage of the document pipeline (not `synthetic`, which has no documents).
fn pipeline_stage(s: &str) -> Result<Stage, String> {
    s.parse::<Stage>()
        .ok()
        .filter(|stage| Stage::PIPELINE.contains(stage))
        .ok_or_else(|| format!("unknown stage {s:?}: expected parse, chunk or embed"))
}

#[derive(Debug, Subcommand)]
enum QuotaAction {
    /// Ends a provider's fleet-wide pause after its quota was restored (`openai` or `llamaparse`).
    Resume {
        /// The provider.
        #[arg(value_parser = ["openai", "llamaparse"])]
        provider: String,
    },
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// Lists dead letters, newest first.
    List {
        /// The stage.
        #[arg(long)]
        stage: Stage,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Puts dead letters back on the queue with fresh attempts: the given ids, or all.
    Replay {
        /// The stage.
        #[arg(long)]
        stage: Stage,
        /// Dead-letter entry ids (from `dlq list`); all when none is given.
        ids: Vec<String>,
    },
    /// Deletes dead letters: the given ids, or all.
    Purge {
        /// The stage.
        #[arg(long)]
        stage: Stage,
        /// Dead-letter entry ids (from `dlq list`); all when none is given.
        ids: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut settings = Settings::load(args.config.as_deref()).context("Failed to load settings")?;
    if let Command::Settings { listen } = &args.command {
        if let Some(listen) = listen {
            settings.api.listen = *listen;
            settings.validate().context("Invalid settings")?;
        }
        println!("{}", serde_json::to_string_pretty(&settings.redacted())?);
        return Ok(());
    }
    // The CLI talks to people on stdout; keep the logs to warnings unless asked otherwise.
    if std::env::var_os("RUST_LOG").is_none() {
        settings.log.filter = "warn".into();
    }
    match args.command {
        Command::Serve { listen, check } => {
            if let Some(listen) = listen {
                settings.api.listen = listen;
                settings.validate().context("Invalid settings")?;
            }
            if check {
                upload_pipeline::providers::embedder(&settings, None)
                    .context("The query embedder cannot start")?;
                println!(
                    "serve on {}: settings and providers ready (embedder {:?})",
                    settings.api.listen, settings.embedding.embedder
                );
                return Ok(());
            }
            if std::env::var_os("RUST_LOG").is_none() {
                settings.log.filter = "info".into();
            }
            // Logging is set up below for the other commands; the server wants info level.
            return serve(settings).await;
        }
        Command::Migrate => {
            telemetry::init_logging(&settings.log).context("Failed to start logging")?;
            upload_pipeline::db::migrate(&settings)
                .await
                .context("Failed to migrate")?;
            println!(
                "database migrated; embedding model {} ({} dimensions) registered",
                settings.embedding.model, settings.embedding.dimensions
            );
            return Ok(());
        }
        Command::Openapi => {
            print!("{}", upload_pipeline::api::openapi_json());
            return Ok(());
        }
        Command::Token { user, ttl, admin } => {
            println!(
                "{}",
                Auth::hs256(settings.api.jwt_secret.expose()).issue(user, ttl, admin)
            );
            return Ok(());
        }
        Command::Upload { paths, wait, api } => {
            telemetry::init_logging(&settings.log).context("Failed to start logging")?;
            return upload(&api.client(&settings)?, &paths, wait).await;
        }
        Command::Status { id, api } => {
            let doc = api
                .client(&settings)?
                .status(id)
                .await
                .context("Failed to get the status")?;
            println!("{}", serde_json::to_string_pretty(&doc)?);
            return Ok(());
        }
        Command::Search { query, k, api } => {
            let found = api
                .client(&settings)?
                .search(&query, k)
                .await
                .context("Search failed")?;
            let n = found.results.len();
            println!(
                "{n} result{} in {:.1} ms ({})",
                if n == 1 { "" } else { "s" },
                found.took_ms,
                found.embedding_model
            );
            for (i, hit) in found.results.iter().enumerate() {
                let page = hit
                    .metadata
                    .get("page")
                    .map(|p| format!(" p.{p}"))
                    .unwrap_or_default();
                let text: String = hit.content.split_whitespace().collect::<Vec<_>>().join(" ");
                let text: String = text.chars().take(220).collect();
                println!(
                    "{:>2}. {:.3}  {}{page} #{}\n    {text}",
                    i + 1,
                    hit.score,
                    hit.filename,
                    hit.chunk_index
                );
            }
            return Ok(());
        }
        Command::Failures {
            filter,
            limit,
            json,
        } => {
            telemetry::init_logging(&settings.log).context("Failed to start logging")?;
            return failures(&settings, &filter.filter(), limit, json).await;
        }
        _ => {}
    }
    telemetry::init_logging(&settings.log).context("Failed to start logging")?;
    let broker = Broker::connect(settings.redis_url.expose(), settings.queue.clone())
        .await
        .context("Failed to connect to Redis")?;
    match args.command {
        Command::Serve { .. }
        | Command::Openapi
        | Command::Migrate
        | Command::Settings { .. }
        | Command::Token { .. }
        | Command::Upload { .. }
        | Command::Status { .. }
        | Command::Search { .. }
        | Command::Failures { .. } => {
            unreachable!("handled above")
        }
        Command::Retry { status, filter } => {
            retry_failed(settings, &broker, &status, &filter.filter()).await
        }
        Command::Queues { json } => queues(&broker, json).await,
        Command::Dlq { action } => dlq(&broker, action).await,
        Command::Quota { action } => quota(&settings, action).await,
        Command::Synthetic {
            stage,
            jobs,
            work_ms,
            fail_percent,
            dead_percent,
            wait,
            timeout_secs,
        } => {
            if !(0.0..=100.0).contains(&fail_percent) || !(0.0..=100.0).contains(&dead_percent) {
                bail!("--fail-percent and --dead-percent must be between 0 and 100");
            }
            let spec = Batch {
                stage,
                jobs,
                work_ms,
                fail_percent,
                dead_percent,
            };
            synthetic(
                &broker,
                spec,
                wait.then_some(Duration::from_secs(timeout_secs)),
            )
            .await
        }
    }
}

async fn queues(broker: &Broker, json: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for stage in Stage::ALL {
        let stats = broker
            .handle(stage.as_str())?
            .stats()
            .await
            .with_context(|| format!("Failed to read queue {stage}"))?;
        rows.push((stage, stats));
    }
    if json {
        let map: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|(s, st)| {
                (
                    s.to_string(),
                    serde_json::to_value(st).expect("stats serialise"),
                )
            })
            .collect();
        println!("{}", serde_json::Value::Object(map));
        return Ok(());
    }
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10}",
        "queue", "pending", "in_flight", "delayed", "dead", "oldest_age", "consumers"
    );
    for (stage, s) in rows {
        let age = s
            .oldest_pending_age_ms
            .map_or("-".to_owned(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
        println!(
            "{stage:<8} {:>10} {:>10} {:>10} {:>10} {age:>12} {:>10}",
            s.pending, s.in_flight, s.delayed, s.dead, s.consumers
        );
    }
    Ok(())
}

/// One line of at most `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= max {
        return line;
    }
    let mut cut: String = line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

async fn failures(
    settings: &Settings,
    filter: &FailureFilter,
    limit: u32,
    json: bool,
) -> anyhow::Result<()> {
    let pool = upload_pipeline::db::connect(settings, 2)
        .await
        .context("Failed to connect to Postgres")?;
    let counts = retry::failure_counts(&pool, filter)
        .await
        .context("Failed to count the failures (has `producer migrate` run since the upgrade?)")?;
    let documents = retry::failures(&pool, filter, limit)
        .await
        .context("Failed to list the failures")?;
    pool.close().await;
    if json {
        println!(
            "{}",
            serde_json::json!({ "counts": counts, "documents": documents })
        );
        return Ok(());
    }
    if counts.is_empty() {
        println!("no failed document matches");
        return Ok(());
    }
    let total: i64 = counts.iter().map(|c| c.documents).sum();
    println!("{total} failed documents by stage and reason:");
    println!("{:<6} {:>9}  reason", "stage", "documents");
    for c in &counts {
        println!(
            "{:<6} {:>9}  {}",
            c.stage,
            c.documents,
            one_line(c.reason.as_deref().unwrap_or("-"), 200)
        );
    }
    println!("\nthe newest {} of them:", documents.len());
    for d in &documents {
        println!(
            "{}  {}  user {}  {:<5}  {}",
            d.failed_at.format("%Y-%m-%dT%H:%M:%SZ"),
            d.document_id,
            d.user_id,
            d.stage,
            one_line(d.error.as_deref().unwrap_or("-"), 160)
        );
    }
    Ok(())
}

async fn retry_failed(
    settings: Settings,
    broker: &Broker,
    status: &str,
    filter: &FailureFilter,
) -> anyhow::Result<()> {
    let pool = upload_pipeline::db::connect(&settings, 4)
        .await
        .context("Failed to connect to Postgres")?;
    let pipeline = retry::operator_pipeline(pool, broker, Arc::new(settings))
        .context("Failed to open the stage queues")?;
    let report = retry::retry_failed(&pipeline, filter)
        .await
        .context("Failed to list the failures (has `producer migrate` run since the upgrade?)")?;
    pipeline.pool.close().await;
    println!(
        "re-queued {} {status} document{}",
        report.total(),
        if report.total() == 1 { "" } else { "s" }
    );
    for (stage, n) in &report.requeued {
        println!("  {:<6} {n}", stage.as_str());
    }
    if report.skipped > 0 {
        println!(
            "skipped {} that were no longer {status} (retried or deleted meanwhile)",
            report.skipped
        );
    }
    for (id, e) in &report.errors {
        eprintln!("could not retry {id}: {e}");
    }
    if !report.errors.is_empty() {
        bail!(
            "{} matching documents could not be retried",
            report.errors.len()
        );
    }
    Ok(())
}

async fn dlq(broker: &Broker, action: DlqAction) -> anyhow::Result<()> {
    match action {
        DlqAction::List { stage, limit } => {
            let letters = broker
                .handle(stage.as_str())?
                .dead_letters(limit)
                .await
                .context("Failed to list dead letters")?;
            if letters.is_empty() {
                println!("no dead letters in {stage}");
            }
            for d in letters {
                println!(
                    "{}  job {}  attempts {}  {}\n    payload {}",
                    d.entry_id, d.job_id, d.attempts, d.error, d.payload
                );
            }
        }
        DlqAction::Replay { stage, ids } => {
            let n = broker
                .handle(stage.as_str())?
                .replay_dead(&ids)
                .await
                .context("Failed to replay dead letters")?;
            println!("replayed {n} dead letters of {stage}");
            if !ids.is_empty() && n < ids.len() as u64 {
                bail!(
                    "{} of the given ids were not dead letters of {stage}",
                    ids.len() as u64 - n
                );
            }
        }
        DlqAction::Purge { stage, ids } => {
            let n = broker
                .handle(stage.as_str())?
                .purge_dead(&ids)
                .await
                .context("Failed to purge dead letters")?;
            println!("purged {n} dead letters of {stage}");
        }
    }
    Ok(())
}

struct Batch {
    stage: Stage,
    jobs: u64,
    work_ms: u64,
    fail_percent: f64,
    dead_percent: f64,
}

async fn synthetic(broker: &Broker, spec: Batch, wait: Option<Duration>) -> anyhow::Result<()> {
    let queue = broker.queue::<SyntheticJob>(spec.stage.as_str())?;
    let before = queue.stats().await.context("Failed to read the queue")?;
    // Deterministic spread of the injected failures over the batch.
    let every = |percent: f64| {
        if percent > 0.0 {
            (100.0 / percent).round().max(1.0) as u64
        } else {
            0
        }
    };
    let (fail_every, dead_every) = (every(spec.fail_percent), every(spec.dead_percent));
    let jobs: Vec<SyntheticJob> = (0..spec.jobs)
        .map(|seq| {
            let fail = if dead_every > 0 && seq % dead_every == dead_every - 1 {
                Some(Misbehave {
                    mode: FailMode::Permanent,
                    attempts: None,
                    retry_after_ms: None,
                })
            } else if fail_every > 0 && seq % fail_every == 0 {
                Some(Misbehave {
                    mode: FailMode::Error,
                    attempts: Some(1),
                    retry_after_ms: None,
                })
            } else {
                None
            };
            SyntheticJob {
                seq,
                work_ms: spec.work_ms,
                fail,
                record: false,
            }
        })
        .collect();
    let started = Instant::now();
    queue
        .push_many(&jobs)
        .await
        .context("Failed to push the jobs")?;
    println!(
        "pushed {} synthetic jobs to {} in {:.0} ms",
        spec.jobs,
        spec.stage,
        started.elapsed().as_secs_f64() * 1000.0
    );
    let Some(timeout) = wait else { return Ok(()) };

    let bar = ProgressBar::new(spec.jobs);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} jobs settled  {msg}",
        )
        .expect("valid template"),
    );
    // Without a terminal (CI, logs) the bar is hidden; print a line a second instead.
    let plain = !std::io::stderr().is_terminal();
    let mut last_line = Instant::now();
    let backlog = |s: &QueueStats| s.pending + s.in_flight + s.delayed;
    let start_backlog = backlog(&before);
    loop {
        let now = queue.stats().await.context("Failed to read the queue")?;
        let left = backlog(&now).saturating_sub(start_backlog);
        let dead = now.dead.saturating_sub(before.dead);
        bar.set_position(spec.jobs.saturating_sub(left));
        let rate = (spec.jobs - left) as f64 / started.elapsed().as_secs_f64().max(1e-3);
        let msg = format!(
            "{rate:.0} jobs/s, {} in flight, {} waiting to retry, {dead} dead",
            now.in_flight, now.delayed
        );
        if plain && last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
            println!("  {}/{} jobs settled  {msg}", spec.jobs - left, spec.jobs);
        }
        bar.set_message(msg);
        if left == 0 {
            bar.finish();
            println!(
                "settled {} jobs in {:.2} s ({:.0} jobs/s): {} succeeded, {dead} dead (see `producer dlq list --stage {}`)",
                spec.jobs,
                started.elapsed().as_secs_f64(),
                spec.jobs as f64 / started.elapsed().as_secs_f64(),
                spec.jobs - dead,
                spec.stage
            );
            return Ok(());
        }
        if started.elapsed() > timeout {
            bar.abandon();
            bail!(
                "{left} jobs still unsettled after {} s: are workers running for stage {}?",
                timeout.as_secs(),
                spec.stage
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    telemetry::init_logging(&settings.log).context("Failed to start logging")?;
    // The producer embeds search queries; its stage series are the pushes and the reconciler's requeues.
    let operations = upload_pipeline::providers::operations(&settings, false, true);
    let metrics = telemetry::init_metrics("producer", &["parse", "chunk", "embed"], &operations)
        .context("Failed to start metrics")?;
    let shutdown = async {
        let _ = upload_pipeline::shutdown::signal().await;
    };
    upload_pipeline::api::run_server(std::sync::Arc::new(settings), Some(metrics), shutdown)
        .await
        .context("The producer failed")?;
    Ok(())
}

fn collect_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("Failed to read folder {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            out.extend(collect_files(&entries)?);
        } else if path.is_file() {
            out.push(path.clone());
        } else {
            bail!("{} is neither a file nor a folder", path.display());
        }
    }
    Ok(out)
}

async fn upload(client: &Client, paths: &[PathBuf], wait: bool) -> anyhow::Result<()> {
    let files = collect_files(paths)?;
    let mut ids = Vec::new();
    let mut refused = 0;
    for file in &files {
        match client.upload_file(file, None).await {
            Ok(up) => {
                println!(
                    "{}  {}{}",
                    up.document_id,
                    file.display(),
                    if up.duplicate {
                        "  (duplicate of an earlier upload)"
                    } else {
                        ""
                    }
                );
                ids.push((up.document_id, file.display().to_string()));
            }
            Err(e) => {
                refused += 1;
                eprintln!("refused {}: {e}", file.display());
            }
        }
    }
    if wait && !ids.is_empty() {
        let bar = ProgressBar::new(ids.len() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} documents settled  {msg}",
            )
            .expect("template"),
        );
        let started = Instant::now();
        loop {
            let mut settled = 0;
            let mut failed = Vec::new();
            for (id, name) in &ids {
                let doc = client.status(*id).await.context("Failed to get a status")?;
                match doc.status.as_str() {
                    "ready" => settled += 1,
                    "failed" => {
                        settled += 1;
                        failed.push(format!("{name}: {}", doc.error.unwrap_or_default()));
                    }
                    _ => {}
                }
            }
            bar.set_position(settled);
            if settled == ids.len() as u64 {
                bar.finish_and_clear();
                println!(
                    "{} documents settled in {:.1} s: {} ready, {} failed",
                    ids.len(),
                    started.elapsed().as_secs_f64(),
                    ids.len() - failed.len(),
                    failed.len()
                );
                for f in &failed {
                    println!("  failed: {f}");
                }
                break;
            }
            if started.elapsed() > Duration::from_secs(600) {
                bail!("documents still not settled after 10 minutes: are workers running?");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    if refused > 0 {
        bail!("{refused} of {} files were refused", files.len());
    }
    Ok(())
}

async fn quota(settings: &Settings, action: Option<QuotaAction>) -> anyhow::Result<()> {
    let quota = upload_pipeline::quota::Quota::connect(settings)
        .await
        .context("Failed to connect to Redis")?;
    match action {
        Some(QuotaAction::Resume { provider }) => {
            if quota.resume(&provider).await? {
                println!("{provider} resumed: its stage calls it again");
            } else {
                println!("{provider} was not paused");
            }
        }
        None => {
            let q = &settings.quota;
            println!(
                "limits: openai {} requests/min, {} tokens/min, {} tokens/day; llamaparse {} uploads per {:?}, {} pages/day (0: none)",
                q.openai.requests_per_minute,
                q.openai.tokens_per_minute,
                q.openai.daily_tokens,
                q.llamaparse.uploads,
                q.llamaparse.window,
                q.llamaparse.pages_per_day
            );
            let states = quota.report().await?;
            if states.is_empty() {
                println!("no budget in use yet");
            }
            for s in states {
                let ttl = if s.ttl_ms >= 0 {
                    format!("  (expires in {:.1} s)", s.ttl_ms as f64 / 1000.0)
                } else {
                    String::new()
                };
                println!("{:<60} {}{ttl}", s.key, s.value);
            }
        }
    }
    Ok(())
}
