//! Every metric the fleet exports, in one catalogue: names, kinds, labels, help texts and histogram buckets.
//! Names follow `upload_pipeline_<subsystem>_<name>_<unit>`; labels come from small fixed sets. `docs/metrics.md` is
//! generated from [`CATALOGUE`] (a test keeps it in step), and the dashboards and alert rules may name only
//! metrics listed here (another test checks that).
//!
//! It imports nothing from the modules that record into it: the gauges read from Redis or Postgres at scrape
//! time are set by [`gauges`](crate::gauges).

mod catalogue;
mod markdown;
mod record;

pub use catalogue::CATALOGUE;
pub use markdown::catalogue_markdown;
pub use record::{
    cache_lookups, describe, document_failed, document_ready, provider_request, quota_spent,
    quota_waited, register_rerank, register_series,
};

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (`_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution in explicit buckets (`_bucket`, `_sum`, `_count`).
    Histogram,
}

impl Kind {
    /// The Prometheus type name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Which processes export a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exporter {
    /// The producer (API, reconciler, fleet-wide state read at scrape time).
    Producer,
    #[allow(missing_docs)]
    Worker,
    /// The producer and the workers.
    Both,
}

impl Exporter {
    /// How `docs/metrics.md` names it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Exporter::Producer => "producer",
            Exporter::Worker => "worker",
            Exporter::Both => "producer, worker",
        }
    }
}

/// One entry of the catalogue.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Full name, `upload_pipeline_…`.
    pub name: &'static str,
    #[allow(missing_docs)]
    pub kind: Kind,
    /// Label names, each from a small fixed set of values.
    pub labels: &'static [&'static str],
    /// The help text served on `/metrics`.
    pub help: &'static str,
    /// Which processes export it.
    pub exporter: Exporter,
    /// Histogram bucket bounds (empty for counters and gauges).
    pub buckets: &'static [f64],
}

/// Outcomes of [`QUEUE_JOBS`].
pub const JOB_OUTCOMES: &[&str] = &[
    "success", "failed", "retried", "deferred", "dead", "released",
];
/// Resolutions of [`RECOVERY_FAILED_JOBS`].
pub const RECOVERY_RESOLUTIONS: &[&str] = &["recovered", "dead", "failed"];
/// Outcomes of [`PROVIDER_REQUESTS`].
pub const PROVIDER_OUTCOMES: &[&str] = &[
    "ok",
    "rate_limited",
    "quota",
    "throttled",
    "transient",
    "permanent",
    "too_large",
    "unauthorized",
];
/// Why a provider is paused, for [`QUOTA_PAUSES`] and [`QUOTA_PAUSED`]: out of quota or credit, or a refused key.
pub const PAUSE_REASONS: &[&str] = &["quota", "auth"];
/// Operations of [`QUEUE_REDIS_ERRORS`].
pub const REDIS_OPS: &[&str] = &["ack", "connect", "promote", "read", "reclaim", "refresh"];
/// Document statuses of [`DOCUMENTS_STORED`].
pub const DOCUMENT_STATUSES: &[&str] = &[
    "queued",
    "parsing",
    "chunking",
    "embedding",
    "ready",
    "failed",
];

/// Buckets of job run time and queue wait (seconds): sub-millisecond no-ops up to provider-bound minutes.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 3.0, 5.0, 10.0, 30.0, 60.0,
    90.0, 180.0, 600.0,
];
/// Buckets of upload-to-queryable time: the 90 s target of the spec and 10 s, ours, are bounds.
pub const UPLOAD_TO_QUERYABLE_BUCKETS: &[f64] = &[
    0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0,
    300.0, 600.0, 1800.0,
];
/// Buckets of search latency: the 3 s target of the spec and 20 ms, ours, are bounds.
pub const SEARCH_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0,
    10.0,
];
/// Buckets of provider calls: embeddings in tens of milliseconds up to LlamaParse jobs of minutes.
pub const PROVIDER_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
];
/// Buckets of quota waits: none, the reservation look-ahead (2 s), up to `quota.max_wait`.
pub const QUOTA_WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Jobs finished, by stage and outcome ([`JOB_OUTCOMES`]).
pub const QUEUE_JOBS: &str = "upload_pipeline_queue_jobs_total";
/// Jobs with at least one failed attempt, by stage and how they ended ([`RECOVERY_RESOLUTIONS`]).
pub const RECOVERY_FAILED_JOBS: &str = "upload_pipeline_recovery_failed_jobs_total";
/// Jobs pushed, by stage.
pub const QUEUE_PUSHED: &str = "upload_pipeline_queue_pushed_jobs_total";
/// Handler run time, by stage.
pub const QUEUE_JOB_DURATION: &str = "upload_pipeline_queue_job_duration_seconds";
/// Time from a job becoming runnable to its delivery, by stage.
pub const QUEUE_WAIT: &str = "upload_pipeline_queue_wait_seconds";
/// Jobs taken over from consumers that stopped answering, by stage.
pub const QUEUE_RECLAIMED: &str = "upload_pipeline_queue_reclaimed_jobs_total";
/// Claims a live consumer lost to another (it was stalled for longer than half of `reclaim_after`), by stage.
pub const QUEUE_CLAIMS_LOST: &str = "upload_pipeline_queue_claims_lost_total";
/// Failed Redis calls of the queue, by stage and operation; each was retried.
pub const QUEUE_REDIS_ERRORS: &str = "upload_pipeline_queue_redis_errors_total";
/// Jobs waiting for a worker, by stage (read from Redis at scrape time).
pub const QUEUE_PENDING: &str = "upload_pipeline_queue_pending_jobs";
/// Jobs delivered and not yet acknowledged, by stage.
pub const QUEUE_IN_FLIGHT: &str = "upload_pipeline_queue_in_flight_jobs";
/// Failed attempts waiting for their retry, by stage.
pub const QUEUE_DELAYED: &str = "upload_pipeline_queue_delayed_jobs";
/// Dead letters, by stage.
pub const QUEUE_DEAD: &str = "upload_pipeline_queue_dead_jobs";
/// Age of the oldest waiting job, by stage (0 when none waits).
pub const QUEUE_OLDEST_AGE: &str = "upload_pipeline_queue_oldest_pending_age_seconds";
/// Job slots busy in this worker process, by stage.
pub const WORKER_BUSY: &str = "upload_pipeline_worker_busy_slots";
/// Job slots of this worker process, by stage.
pub const WORKER_SLOTS: &str = "upload_pipeline_worker_slots";
/// Stage workers restarted after their backend failed, by stage.
pub const WORKER_RESTARTS: &str = "upload_pipeline_worker_restarts_total";
/// Seconds since a stage's worker loop last went round, by stage.
pub const WORKER_HEARTBEAT_AGE: &str = "upload_pipeline_worker_heartbeat_age_seconds";
/// Upload-to-queryable time of documents that became ready.
pub const DOCUMENT_UPLOAD_TO_QUERYABLE: &str =
    "upload_pipeline_documents_upload_to_queryable_seconds";
/// Documents that became ready.
pub const DOCUMENTS_READY: &str = "upload_pipeline_documents_ready_total";
/// Documents that failed, by stage.
pub const DOCUMENTS_FAILED: &str = "upload_pipeline_documents_failed_total";
/// Documents accepted by the API, by outcome (`created`, `duplicate`, `replayed`).
pub const DOCUMENTS_UPLOADED: &str = "upload_pipeline_documents_uploaded_total";
/// Documents stored, by status (read from Postgres at scrape time).
pub const DOCUMENTS_STORED: &str = "upload_pipeline_documents_stored_documents";
/// Search latency through the API, embedding of the query (and reranking) included, by mode.
pub const SEARCH_DURATION: &str = "upload_pipeline_search_duration_seconds";
/// Searches that asked for reranking and were answered in fused order because the reranker failed, by reason
/// (an outcome of [`PROVIDER_OUTCOMES`] other than `ok` and `too_large`).
pub const SEARCH_RERANK_FAILURES: &str = "upload_pipeline_search_rerank_failures_total";
/// Tenants' own HNSW indexes changed by the maintenance passes, by outcome (`built`, `dropped`, `failed`).
pub const SEARCH_TENANT_INDEX_CHANGES: &str = "upload_pipeline_search_tenant_index_changes_total";
/// Stage jobs pushed again by the reconciler, by stage.
pub const RECONCILER_REQUEUED: &str = "upload_pipeline_reconciler_requeued_jobs_total";
/// API responses, by route and status class.
pub const API_RESPONSES: &str = "upload_pipeline_api_responses_total";
/// Build information (`version`), always 1.
pub const BUILD_INFO: &str = "upload_pipeline_build_info";
/// Requests to external providers, by provider, operation and outcome ([`PROVIDER_OUTCOMES`]).
pub const PROVIDER_REQUESTS: &str = "upload_pipeline_provider_requests_total";
/// Duration of one provider request (a LlamaParse job: upload to result), by provider and operation.
pub const PROVIDER_DURATION: &str = "upload_pipeline_provider_request_duration_seconds";
/// Inputs sent for embedding, by provider.
pub const PROVIDER_EMBEDDED_INPUTS: &str = "upload_pipeline_provider_embedded_inputs_total";
/// Inputs cut to the provider's token limit, by provider.
pub const PROVIDER_TRUNCATED_INPUTS: &str = "upload_pipeline_provider_truncated_inputs_total";
/// Time calls waited for their share of the fleet's provider budget, by provider.
pub const QUOTA_WAIT: &str = "upload_pipeline_quota_wait_seconds";
/// Calls sent back to the queue because their budget wait would exceed `quota.max_wait`, by provider.
pub const QUOTA_DEFERRED: &str = "upload_pipeline_quota_deferred_calls_total";
/// Fleet-wide cool-downs set after a 429, by provider.
pub const QUOTA_COOLDOWNS: &str = "upload_pipeline_quota_cooldowns_total";
/// Fleet-wide pauses of a provider, by provider and reason ([`PAUSE_REASONS`]).
pub const QUOTA_PAUSES: &str = "upload_pipeline_quota_pauses_total";
/// 1 while a provider is paused fleet-wide for a reason (read from Redis at scrape time), by provider and reason.
pub const QUOTA_PAUSED: &str = "upload_pipeline_quota_paused_providers";
/// Units reserved from the fleet's budget before calls, by provider and resource (requests, tokens, uploads).
pub const QUOTA_RESERVED: &str = "upload_pipeline_quota_reserved_units_total";
/// The provider's limit per window, by provider and resource.
pub const QUOTA_LIMIT: &str = "upload_pipeline_quota_limit_units";
/// The window of a limit, by provider and resource.
pub const QUOTA_WINDOW: &str = "upload_pipeline_quota_window_seconds";
/// What the provider last said remains of a limit (`x-ratelimit-remaining-*`), by provider and resource.
pub const QUOTA_REMAINING: &str = "upload_pipeline_quota_remaining_units";
/// Tokens (embeddings) or pages (LlamaParse) the providers counted, by provider.
pub const QUOTA_USED: &str = "upload_pipeline_quota_used_units_total";
/// Estimated spend since the process started, by provider (a gauge: counters hold whole numbers).
pub const QUOTA_COST: &str = "upload_pipeline_quota_cost_dollars";
/// Cache lookups that found a result, by cache (parse, embedding).
pub const CACHE_HITS: &str = "upload_pipeline_cache_hits_total";
/// Cache lookups that found nothing, by cache (parse, embedding).
pub const CACHE_MISSES: &str = "upload_pipeline_cache_misses_total";
/// Prefix of the process metrics (CPU, memory, file descriptors, threads) collected on every scrape.
pub const PROCESS_PREFIX: &str = "upload_pipeline_";

/// The catalogue entry of `name` (a series name: `_bucket`, `_sum` and `_count` resolve to their histogram).
pub fn lookup(name: &str) -> Option<&'static Metric> {
    CATALOGUE.iter().find(|m| m.name == name).or_else(|| {
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            CATALOGUE
                .iter()
                .find(|m| m.name == base && m.kind == Kind::Histogram)
        })
    })
}
