//! The command line's grammar: every command, flag and value parser, as clap derives them.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use upload_pipeline::{
    jobs::Stage,
    retry::{self, FailureFilter},
    search::{Filter, SearchMode},
};
use uuid::Uuid;

/// Pushes work onto the upload-pipeline queues and operates them.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Args {
    /// A TOML settings file (see deploy/config.example.toml).
    #[arg(long, global = true, env = "UPLOAD_PIPELINE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// How CLI commands reach the API.
#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// The producer API.
    #[arg(
        long,
        env = "UPLOAD_PIPELINE_API",
        default_value = "http://127.0.0.1:8080"
    )]
    pub api: String,
    /// A bearer token.
    #[arg(long, env = "UPLOAD_PIPELINE_TOKEN", conflicts_with = "user")]
    pub token: Option<String>,
    /// Act as this user, with a token minted from the configured JWT secret (development).
    #[arg(long)]
    pub user: Option<Uuid>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serves the HTTP API and runs the reconciler (migrates first).
    Serve {
        /// Where to listen (overrides api.listen).
        #[arg(long, env = "LISTEN_ADDR")]
        listen: Option<SocketAddr>,
        /// Check the settings and build the providers the API needs (the query embedder), then exit without
        /// connecting to anything: a pre-flight check for deploy files.
        #[arg(long)]
        check: bool,
    },
    /// Creates the database if missing, applies the migrations and registers the embedding model's index.
    Migrate,
    /// Gives each tenant with more chunks of a model than `upload_pipeline.exact_search_chunks()` an HNSW index of
    /// its own and drops those of tenants under half that, once, as the database's owner (what `serve` does every
    /// `search.tenant_index_interval` when it holds the owner's credentials); prints what it did as JSON.
    TenantIndexes,
    /// Checks the settings (defaults, --config file, environment) and prints them as JSON, secrets hidden: what
    /// `serve` and the workers of the same environment will run with.
    Settings {
        /// The address `serve` would listen on (LISTEN_ADDR), checked like `serve` checks it.
        #[arg(long, env = "LISTEN_ADDR")]
        listen: Option<SocketAddr>,
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
    /// Searches your ready documents.
    Search {
        /// What to look for.
        query: String,
        /// How many results.
        #[arg(short, long, default_value_t = 5)]
        k: u32,
        /// hybrid (both lists fused by reciprocal rank), vector (by meaning) or keyword (by words: "a phrase",
        /// or, -word).
        #[arg(long, default_value = "hybrid", value_parser = search_mode)]
        mode: SearchMode,
        /// Only documents that pass this filter, OpenAI-style JSON: '{"type":"eq","key":"team","value":"ops"}',
        /// or {"type":"and","filters":[...]}; keys are metadata fields or filename, content_type, created_at,
        /// document_id.
        #[arg(long, value_parser = search_filter)]
        filter: Option<Filter>,
        /// Rerank the best hits with the server's reranker (search.rerank); without it or --no-rerank, the
        /// server's default (search.rerank.enabled).
        #[arg(long, conflicts_with = "no_rerank")]
        rerank: bool,
        /// Do not rerank, whatever the server's default.
        #[arg(long)]
        no_rerank: bool,
        /// Print the API's JSON answer instead of a list.
        #[arg(long)]
        json: bool,
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
        #[command(flatten)]
        batch: SyntheticArgs,
    },
}

/// Which failed documents `failures` and `retry` act on.
#[derive(Debug, clap::Args)]
pub struct FailureArgs {
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
    /// The library's filter for these flags.
    pub fn filter(&self) -> FailureFilter {
        FailureFilter {
            stage: self.stage,
            since: self.since,
            user: self.user,
        }
    }
}

/// The batch `synthetic` pushes, and how it waits for it.
#[derive(Debug, clap::Args)]
pub struct SyntheticArgs {
    /// The stage queue to push to.
    #[arg(long, default_value = "parse")]
    pub stage: Stage,
    /// How many jobs.
    #[arg(long, default_value_t = 1000)]
    pub jobs: u64,
    /// Simulated work per job, in ms.
    #[arg(long, default_value_t = 0)]
    pub work_ms: u64,
    /// Share of jobs (0-100) that fail their first attempt with a retryable error.
    #[arg(long, default_value_t = 0.0)]
    pub fail_percent: f64,
    /// Share of jobs (0-100) that fail permanently and end in the dead letters.
    #[arg(long, default_value_t = 0.0)]
    pub dead_percent: f64,
    /// Wait until the queue has drained, with a progress line.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
}

/// What `quota` does besides showing the budgets.
#[derive(Debug, Subcommand)]
pub enum QuotaAction {
    /// Ends a provider's fleet-wide pause after its quota was restored (`openai` or `llamaparse`).
    Resume {
        /// The provider.
        #[arg(value_parser = ["openai", "llamaparse"])]
        provider: String,
    },
}

/// What `dlq` does with a stage's dead letters.
#[derive(Debug, Subcommand)]
pub enum DlqAction {
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

/// A stage of the document pipeline (not `synthetic`, which has no documents).
fn pipeline_stage(s: &str) -> Result<Stage, String> {
    s.parse::<Stage>()
        .ok()
        .filter(|stage| Stage::PIPELINE.contains(stage))
        .ok_or_else(|| format!("unknown stage {s:?}: expected parse, chunk or embed"))
}

/// A search mode by its name on the wire.
fn search_mode(s: &str) -> Result<SearchMode, String> {
    [SearchMode::Hybrid, SearchMode::Vector, SearchMode::Keyword]
        .into_iter()
        .find(|mode| mode.as_str() == s)
        .ok_or_else(|| format!("unknown mode {s:?}: expected hybrid, vector or keyword"))
}

/// A search filter as JSON, checked as the API checks it (the message names the part at fault).
fn search_filter(s: &str) -> Result<Filter, String> {
    let value: serde_json::Value =
        serde_json::from_str(s).map_err(|e| format!("the filter is not JSON: {e}"))?;
    Filter::parse(&value).map_err(|e| e.to_string())
}

/// A duration such as `24h` or `90m`.
fn humantime_duration(s: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())
}
