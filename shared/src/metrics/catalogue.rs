//! The catalogue itself: one entry per metric, with its labels, help text, exporter and buckets, in the order of
//! `docs/metrics.md`. The names, label sets and buckets it uses are the constants of [`metrics`](super).

use super::*;

const fn entry(
    kind: Kind,
    name: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
    exporter: Exporter,
    buckets: &'static [f64],
) -> Metric {
    Metric {
        name,
        kind,
        labels,
        help,
        exporter,
        buckets,
    }
}

const fn counter(
    name: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
    exporter: Exporter,
) -> Metric {
    entry(Kind::Counter, name, labels, help, exporter, &[])
}

const fn gauge(
    name: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
    exporter: Exporter,
) -> Metric {
    entry(Kind::Gauge, name, labels, help, exporter, &[])
}

const fn histogram(
    name: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
    exporter: Exporter,
    buckets: &'static [f64],
) -> Metric {
    entry(Kind::Histogram, name, labels, help, exporter, buckets)
}

use Exporter::{Both, Producer, Worker};

/// Every metric, in the order of `docs/metrics.md`.
pub const CATALOGUE: &[Metric] = &[
    counter(
        QUEUE_JOBS,
        &["stage", "outcome"],
        "Jobs finished, by stage and outcome: success; failed (the handler recorded a permanent failure, e.g. an unparseable file); retried; deferred (waiting for provider budget, no attempt spent); dead (dead-lettered); released (handed back on shutdown).",
        Worker,
    ),
    counter(
        RECOVERY_FAILED_JOBS,
        &["stage", "resolution"],
        "Jobs with at least one failed attempt (an error or a crashed worker), by stage and how they ended: recovered (a later attempt succeeded), dead or failed.",
        Worker,
    ),
    counter(QUEUE_PUSHED, &["stage"], "Jobs pushed, by stage.", Both),
    histogram(
        QUEUE_JOB_DURATION,
        &["stage"],
        "Handler run time, by stage.",
        Worker,
        DURATION_BUCKETS,
    ),
    histogram(
        QUEUE_WAIT,
        &["stage"],
        "Time from a job becoming runnable to its delivery to a worker, by stage.",
        Worker,
        DURATION_BUCKETS,
    ),
    counter(
        QUEUE_RECLAIMED,
        &["stage"],
        "Jobs taken over from consumers that stopped answering, by stage.",
        Worker,
    ),
    counter(
        QUEUE_CLAIMS_LOST,
        &["stage"],
        "Claims a live consumer lost to another consumer, by stage.",
        Worker,
    ),
    counter(
        QUEUE_REDIS_ERRORS,
        &["stage", "op"],
        "Failed Redis calls of the queue (each retried), by stage and operation.",
        Worker,
    ),
    gauge(
        QUEUE_PENDING,
        &["stage"],
        "Jobs waiting for a worker, by stage (read from Redis at scrape time).",
        Both,
    ),
    gauge(
        QUEUE_IN_FLIGHT,
        &["stage"],
        "Jobs delivered and not yet acknowledged, by stage (read from Redis at scrape time).",
        Both,
    ),
    gauge(
        QUEUE_DELAYED,
        &["stage"],
        "Failed or deferred attempts waiting for their retry time, by stage (read from Redis at scrape time).",
        Both,
    ),
    gauge(
        QUEUE_DEAD,
        &["stage"],
        "Dead letters, by stage (read from Redis at scrape time).",
        Both,
    ),
    gauge(
        QUEUE_OLDEST_AGE,
        &["stage"],
        "Age of the oldest waiting job in seconds, by stage; 0 when none waits (read from Redis at scrape time).",
        Both,
    ),
    gauge(
        WORKER_BUSY,
        &["stage"],
        "Job slots busy in this worker process, by stage.",
        Worker,
    ),
    gauge(
        WORKER_SLOTS,
        &["stage"],
        "Job slots of this worker process, by stage.",
        Worker,
    ),
    counter(
        WORKER_RESTARTS,
        &["stage"],
        "Stage workers restarted after their backend failed, by stage.",
        Worker,
    ),
    gauge(
        WORKER_HEARTBEAT_AGE,
        &["stage"],
        "Seconds since a stage's worker loop last went round.",
        Worker,
    ),
    histogram(
        DOCUMENT_UPLOAD_TO_QUERYABLE,
        &[],
        "Time from upload to a document being searchable (bounds at 10 s and 90 s).",
        Worker,
        UPLOAD_TO_QUERYABLE_BUCKETS,
    ),
    counter(DOCUMENTS_READY, &[], "Documents that became ready.", Worker),
    counter(
        DOCUMENTS_FAILED,
        &["stage"],
        "Documents that failed, by the stage they failed at.",
        Worker,
    ),
    counter(
        DOCUMENTS_UPLOADED,
        &["outcome"],
        "Documents accepted by the API, by outcome (created, duplicate, replayed).",
        Producer,
    ),
    gauge(
        DOCUMENTS_STORED,
        &["status"],
        "Documents stored, by status (read from Postgres at scrape time).",
        Producer,
    ),
    histogram(
        SEARCH_DURATION,
        &["mode"],
        "Search latency through the API, query embedding and reranking included, by mode (hybrid, vector, keyword; bounds at 20 ms and 3 s).",
        Producer,
        SEARCH_BUCKETS,
    ),
    counter(
        SEARCH_RERANK_FAILURES,
        &["reason"],
        "Searches answered in fused order, unreranked, because the reranker failed, by reason (rate_limited: a 429; throttled: the fleet's budget or a cool-down was longer than search.rerank.max_wait; quota; unauthorized: a 401/403 or a pause for it; transient: a timeout, connection failure or 5xx; permanent: another 4xx or an invalid answer).",
        Producer,
    ),
    counter(
        SEARCH_TENANT_INDEX_CHANGES,
        &["outcome"],
        "Tenants' own HNSW indexes changed by the producer's maintenance passes, by outcome (built; dropped: the tenant fell under half of exact_search_chunks; failed: the statement failed, and the next pass tries again).",
        Producer,
    ),
    counter(
        RECONCILER_REQUEUED,
        &["stage"],
        "Stage jobs pushed again by the reconciler, by stage.",
        Producer,
    ),
    counter(
        API_RESPONSES,
        &["route", "status"],
        "API responses, by route and status class.",
        Producer,
    ),
    gauge(
        BUILD_INFO,
        &["version", "role"],
        "Build information; always 1.",
        Both,
    ),
    counter(
        PROVIDER_REQUESTS,
        &["provider", "operation", "outcome"],
        "Requests to external providers, by provider, operation and outcome (ok, rate_limited: a 429, quota, throttled, transient, permanent, too_large, unauthorized: a 401/403).",
        Both,
    ),
    histogram(
        PROVIDER_DURATION,
        &["provider", "operation"],
        "Provider request time (a LlamaParse job from upload to result), by provider and operation.",
        Both,
        PROVIDER_BUCKETS,
    ),
    counter(
        PROVIDER_EMBEDDED_INPUTS,
        &["provider"],
        "Texts sent for embedding, by provider.",
        Both,
    ),
    counter(
        PROVIDER_TRUNCATED_INPUTS,
        &["provider"],
        "Texts cut to the provider's token limit before embedding, by provider.",
        Both,
    ),
    histogram(
        QUOTA_WAIT,
        &["provider"],
        "Time calls waited for their share of the fleet's provider budget, by provider.",
        Worker,
        QUOTA_WAIT_BUCKETS,
    ),
    counter(
        QUOTA_DEFERRED,
        &["provider"],
        "Calls sent back to the queue because their budget wait was too long, by provider.",
        Worker,
    ),
    counter(
        QUOTA_COOLDOWNS,
        &["provider"],
        "Fleet-wide cool-downs set after a 429, by provider.",
        Worker,
    ),
    counter(
        QUOTA_PAUSES,
        &["provider", "reason"],
        "Fleet-wide pauses of a provider, by provider and reason (quota: out of quota or credit; auth: it refused our key).",
        Worker,
    ),
    gauge(
        QUOTA_PAUSED,
        &["provider", "reason"],
        "1 while the provider is paused fleet-wide for that reason (quota or auth), else 0 (read from Redis at scrape time).",
        Producer,
    ),
    counter(
        QUOTA_RESERVED,
        &["provider", "resource"],
        "Units reserved from the fleet's budget before calls, by provider and resource (requests, tokens, uploads).",
        Worker,
    ),
    gauge(
        QUOTA_LIMIT,
        &["provider", "resource"],
        "The provider's limit per window, as configured, by provider and resource.",
        Worker,
    ),
    gauge(
        QUOTA_WINDOW,
        &["provider", "resource"],
        "The window of that limit in seconds, by provider and resource.",
        Worker,
    ),
    gauge(
        QUOTA_REMAINING,
        &["provider", "resource"],
        "What the provider last said remains of a limit (x-ratelimit-remaining-*), by provider and resource.",
        Worker,
    ),
    counter(
        QUOTA_USED,
        &["provider"],
        "Tokens (embeddings) or pages (LlamaParse) the providers counted, by provider.",
        Worker,
    ),
    gauge(
        QUOTA_COST,
        &["provider"],
        "Estimated provider spend in US dollars since the process started, by provider.",
        Worker,
    ),
    counter(
        CACHE_HITS,
        &["cache"],
        "Cache lookups that found a result, by cache (parse, embedding).",
        Worker,
    ),
    counter(
        CACHE_MISSES,
        &["cache"],
        "Cache lookups that found nothing, by cache (parse, embedding).",
        Worker,
    ),
    counter(
        "upload_pipeline_process_cpu_seconds_total",
        &[],
        "CPU time of the process (user and system), in seconds.",
        Both,
    ),
    gauge(
        "upload_pipeline_process_resident_memory_bytes",
        &[],
        "Resident memory of the process.",
        Both,
    ),
    gauge(
        "upload_pipeline_process_virtual_memory_bytes",
        &[],
        "Virtual memory of the process.",
        Both,
    ),
    gauge(
        "upload_pipeline_process_open_fds",
        &[],
        "Open file descriptors of the process.",
        Both,
    ),
    gauge(
        "upload_pipeline_process_max_fds",
        &[],
        "The process's limit of open file descriptors.",
        Both,
    ),
    gauge(
        "upload_pipeline_process_start_time_seconds",
        &[],
        "Start time of the process since the Unix epoch, in seconds.",
        Both,
    ),
    gauge(
        "upload_pipeline_process_virtual_memory_max_bytes",
        &[],
        "The process's limit of virtual memory.",
        Both,
    ),
    gauge(
        "upload_pipeline_process_threads",
        &[],
        "Threads of the process.",
        Both,
    ),
];
