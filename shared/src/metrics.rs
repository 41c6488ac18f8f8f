//! Every metric the fleet exports: names, help texts and histogram buckets, in one place.
//! Names follow `upload_pipeline_<subsystem>_<name>_<unit>`; labels come from small fixed sets.

/// Jobs finished, by queue and outcome (`success`, `retried`, `dead`, `released`).
pub const QUEUE_JOBS: &str = "upload_pipeline_queue_jobs_total";
/// Jobs pushed, by queue.
pub const QUEUE_PUSHED: &str = "upload_pipeline_queue_pushed_jobs_total";
/// Handler run time, by queue.
pub const QUEUE_JOB_DURATION: &str = "upload_pipeline_queue_job_duration_seconds";
/// Time from a job becoming runnable to its delivery, by queue.
pub const QUEUE_WAIT: &str = "upload_pipeline_queue_wait_seconds";
/// Jobs taken over from consumers that stopped answering, by queue.
pub const QUEUE_RECLAIMED: &str = "upload_pipeline_queue_reclaimed_jobs_total";
/// Claims a live consumer lost to another (it was stalled for longer than half of `reclaim_after`), by queue.
pub const QUEUE_CLAIMS_LOST: &str = "upload_pipeline_queue_claims_lost_total";
/// Failed Redis calls of the queue, by queue and operation; each was retried.
pub const QUEUE_REDIS_ERRORS: &str = "upload_pipeline_queue_redis_errors_total";
/// Jobs waiting for a worker, by queue (read from Redis at scrape time).
pub const QUEUE_PENDING: &str = "upload_pipeline_queue_pending_jobs";
/// Jobs delivered and not yet acknowledged, by queue.
pub const QUEUE_IN_FLIGHT: &str = "upload_pipeline_queue_in_flight_jobs";
/// Failed attempts waiting for their retry, by queue.
pub const QUEUE_DELAYED: &str = "upload_pipeline_queue_delayed_jobs";
/// Dead letters, by queue.
pub const QUEUE_DEAD: &str = "upload_pipeline_queue_dead_jobs";
/// Age of the oldest waiting job, by queue (0 when none waits).
pub const QUEUE_OLDEST_AGE: &str = "upload_pipeline_queue_oldest_pending_age_seconds";
/// Job slots busy in this worker process, by stage.
pub const WORKER_BUSY: &str = "upload_pipeline_worker_busy_slots";
/// Job slots of this worker process, by stage.
pub const WORKER_SLOTS: &str = "upload_pipeline_worker_slots";
/// Stage workers restarted after their backend failed, by stage.
pub const WORKER_RESTARTS: &str = "upload_pipeline_worker_restarts_total";
/// Seconds since a stage's worker loop last went round, by stage.
pub const WORKER_HEARTBEAT_AGE: &str = "upload_pipeline_worker_heartbeat_age_seconds";
/// Upload-to-queryable time of documents that became ready (a bucket boundary at the 90 s target).
pub const DOCUMENT_UPLOAD_TO_QUERYABLE: &str =
    "upload_pipeline_documents_upload_to_queryable_seconds";
/// Documents that became ready.
pub const DOCUMENTS_READY: &str = "upload_pipeline_documents_ready_total";
/// Documents that failed, by stage.
pub const DOCUMENTS_FAILED: &str = "upload_pipeline_documents_failed_total";
/// Documents accepted by the API, by outcome (`created`, `duplicate`, `replayed`).
pub const DOCUMENTS_UPLOADED: &str = "upload_pipeline_documents_uploaded_total";
/// Search latency through the API, embedding of the query included (a bucket boundary at the 3 s target).
pub const SEARCH_DURATION: &str = "upload_pipeline_search_duration_seconds";
/// Stage jobs pushed again by the reconciler, by stage.
pub const RECONCILER_REQUEUED: &str = "upload_pipeline_reconciler_requeued_jobs_total";
/// API responses, by route and status class.
pub const API_RESPONSES: &str = "upload_pipeline_api_responses_total";
/// Build information (`version`), always 1.
pub const BUILD_INFO: &str = "upload_pipeline_build_info";
/// Requests to external providers, by provider, operation and outcome (ok, rate_limited, quota, transient, permanent).
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
/// Tokens (embeddings) or pages (LlamaParse) the providers counted, by provider.
pub const QUOTA_USED: &str = "upload_pipeline_quota_used_units_total";
/// Estimated spend since the process started, by provider (a gauge: counters hold whole numbers).
pub const QUOTA_COST: &str = "upload_pipeline_quota_cost_dollars";
/// Cache lookups that found a result, by cache (parse, embedding).
pub const CACHE_HITS: &str = "upload_pipeline_cache_hits_total";
/// Cache lookups that found nothing, by cache (parse, embedding).
pub const CACHE_MISSES: &str = "upload_pipeline_cache_misses_total";

/// Buckets of job run time and queue wait (seconds): sub-millisecond no-ops up to provider-bound minutes.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 3.0, 5.0, 10.0, 30.0, 60.0,
    90.0, 180.0, 600.0,
];

/// Registers help texts and units with the installed recorder.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        QUEUE_JOBS,
        "Jobs finished, by queue and outcome (success, retried, dead, released)."
    );
    describe_counter!(QUEUE_PUSHED, "Jobs pushed, by queue.");
    describe_histogram!(
        QUEUE_JOB_DURATION,
        Unit::Seconds,
        "Handler run time, by queue."
    );
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "Time from a job becoming runnable to its delivery, by queue."
    );
    describe_counter!(
        QUEUE_RECLAIMED,
        "Jobs taken over from consumers that stopped answering, by queue."
    );
    describe_counter!(
        QUEUE_CLAIMS_LOST,
        "Claims a live consumer lost to another consumer, by queue."
    );
    describe_counter!(
        QUEUE_REDIS_ERRORS,
        "Failed Redis calls of the queue (each retried), by queue and operation."
    );
    describe_gauge!(QUEUE_PENDING, "Jobs waiting for a worker, by queue.");
    describe_gauge!(
        QUEUE_IN_FLIGHT,
        "Jobs delivered and not yet acknowledged, by queue."
    );
    describe_gauge!(
        QUEUE_DELAYED,
        "Failed attempts waiting for their retry time, by queue."
    );
    describe_gauge!(QUEUE_DEAD, "Dead letters, by queue.");
    describe_gauge!(
        QUEUE_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest waiting job, by queue."
    );
    describe_gauge!(
        WORKER_BUSY,
        "Job slots busy in this worker process, by stage."
    );
    describe_gauge!(WORKER_SLOTS, "Job slots of this worker process, by stage.");
    describe_counter!(
        WORKER_RESTARTS,
        "Stage workers restarted after their backend failed, by stage."
    );
    describe_gauge!(
        WORKER_HEARTBEAT_AGE,
        Unit::Seconds,
        "Seconds since a stage's worker loop last went round."
    );
    describe_histogram!(
        DOCUMENT_UPLOAD_TO_QUERYABLE,
        Unit::Seconds,
        "Time from upload to a document being searchable."
    );
    describe_counter!(DOCUMENTS_READY, "Documents that became ready.");
    describe_counter!(DOCUMENTS_FAILED, "Documents that failed, by stage.");
    describe_counter!(
        DOCUMENTS_UPLOADED,
        "Documents accepted by the API, by outcome (created, duplicate, replayed)."
    );
    describe_histogram!(
        SEARCH_DURATION,
        Unit::Seconds,
        "Search latency through the API, query embedding included."
    );
    describe_counter!(
        RECONCILER_REQUEUED,
        "Stage jobs pushed again by the reconciler, by stage."
    );
    describe_counter!(API_RESPONSES, "API responses, by route and status class.");
    describe_gauge!(BUILD_INFO, "Build information; always 1.");
    describe_counter!(
        PROVIDER_REQUESTS,
        "Requests to external providers, by provider, operation and outcome."
    );
    describe_histogram!(
        PROVIDER_DURATION,
        Unit::Seconds,
        "Provider request time (a LlamaParse job from upload to result), by provider and operation."
    );
    describe_counter!(
        PROVIDER_EMBEDDED_INPUTS,
        "Texts sent for embedding, by provider."
    );
    describe_counter!(
        PROVIDER_TRUNCATED_INPUTS,
        "Texts cut to the provider's token limit before embedding, by provider."
    );
    describe_counter!(CACHE_HITS, "Cache lookups that found a result, by cache.");
    describe_histogram!(
        QUOTA_WAIT,
        Unit::Seconds,
        "Time calls waited for their share of the fleet's provider budget, by provider."
    );
    describe_counter!(
        QUOTA_DEFERRED,
        "Calls sent back to the queue because their budget wait was too long, by provider."
    );
    describe_counter!(
        QUOTA_COOLDOWNS,
        "Fleet-wide cool-downs set after a 429, by provider."
    );
    describe_counter!(
        QUOTA_USED,
        "Tokens (embeddings) or pages (LlamaParse) the providers counted, by provider."
    );
    describe_gauge!(
        QUOTA_COST,
        "Estimated provider spend in US dollars since the process started, by provider."
    );
    describe_counter!(CACHE_MISSES, "Cache lookups that found nothing, by cache.");
}

/// Reads a queue's state from Redis (at scrape time, within 2 s) and sets its gauges; a failure is logged and
/// leaves the previous values.
pub async fn refresh_queue_gauges(queue: &crate::queue::QueueHandle) {
    let name = queue.name();
    match tokio::time::timeout(std::time::Duration::from_secs(2), queue.stats()).await {
        Ok(Ok(stats)) => record_queue_stats(name, &stats),
        Ok(Err(e)) => {
            tracing::warn!(queue = name, error = %e, "Could not read queue state for /metrics")
        }
        Err(_) => tracing::warn!(queue = name, "Reading queue state for /metrics timed out"),
    }
}

fn record_queue_stats(queue: &str, stats: &crate::queue::QueueStats) {
    let q = queue.to_owned();
    metrics::gauge!(QUEUE_PENDING, "queue" => q.clone()).set(stats.pending as f64);
    metrics::gauge!(QUEUE_IN_FLIGHT, "queue" => q.clone()).set(stats.in_flight as f64);
    metrics::gauge!(QUEUE_DELAYED, "queue" => q.clone()).set(stats.delayed as f64);
    metrics::gauge!(QUEUE_DEAD, "queue" => q.clone()).set(stats.dead as f64);
    metrics::gauge!(QUEUE_OLDEST_AGE, "queue" => q)
        .set(stats.oldest_pending_age_ms.unwrap_or(0) as f64 / 1000.0);
}

/// Records a document that became ready `seconds` after its upload.
pub fn document_ready(seconds: f64) {
    metrics::histogram!(DOCUMENT_UPLOAD_TO_QUERYABLE).record(seconds);
    metrics::counter!(DOCUMENTS_READY).increment(1);
}

/// Records a document that failed at `stage`.
pub fn document_failed(stage: &str) {
    metrics::counter!(DOCUMENTS_FAILED, "stage" => stage.to_owned()).increment(1);
}

/// Records one provider request and how it ended.
pub fn provider_request(
    provider: &'static str,
    operation: &'static str,
    outcome: &'static str,
    seconds: f64,
) {
    metrics::counter!(PROVIDER_REQUESTS, "provider" => provider, "operation" => operation, "outcome" => outcome)
        .increment(1);
    metrics::histogram!(PROVIDER_DURATION, "provider" => provider, "operation" => operation)
        .record(seconds);
}

/// Records `hits` and `misses` of `cache`.
pub fn cache_lookups(cache: &'static str, hits: u64, misses: u64) {
    metrics::counter!(CACHE_HITS, "cache" => cache).increment(hits);
    metrics::counter!(CACHE_MISSES, "cache" => cache).increment(misses);
}

/// Records a call's wait for its budget.
pub fn quota_waited(provider: &'static str, waited: std::time::Duration) {
    metrics::histogram!(QUOTA_WAIT, "provider" => provider).record(waited.as_secs_f64());
}

/// Records units a provider counted, and their estimated cost.
pub fn quota_spent(provider: &'static str, units: u64, usd_per_million: f64) {
    metrics::counter!(QUOTA_USED, "provider" => provider).increment(units);
    if usd_per_million > 0.0 {
        metrics::gauge!(QUOTA_COST, "provider" => provider)
            .increment(units as f64 * usd_per_million / 1e6);
    }
}
