//! Recording: the series every process creates at zero, and the helpers that record one event on several
//! series at once. Names, labels and help texts come from the catalogue in [`metrics`](super).

use super::*;

/// Registers help texts with the installed recorder.
pub fn describe() {
    for m in CATALOGUE {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

/// Creates every labelled series a process of `role` (`producer` or `worker`) running `stages` will report, at
/// zero, so rates and ratios exist before the first event and alerts see a 0, not an absent series.
pub fn register_series(
    role: &'static str,
    stages: &[&str],
    providers: &[(&'static str, &'static str)],
) {
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "role" => role).set(1.0);
    for &stage in stages {
        let s = stage.to_owned();
        if role == "worker" {
            for &outcome in JOB_OUTCOMES {
                metrics::counter!(QUEUE_JOBS, "stage" => s.clone(), "outcome" => outcome)
                    .absolute(0);
            }
            for &resolution in RECOVERY_RESOLUTIONS {
                metrics::counter!(RECOVERY_FAILED_JOBS, "stage" => s.clone(), "resolution" => resolution).absolute(0);
            }
            metrics::counter!(QUEUE_RECLAIMED, "stage" => s.clone()).absolute(0);
            metrics::counter!(QUEUE_CLAIMS_LOST, "stage" => s.clone()).absolute(0);
            for &op in REDIS_OPS {
                metrics::counter!(QUEUE_REDIS_ERRORS, "stage" => s.clone(), "op" => op).absolute(0);
            }
            metrics::counter!(WORKER_RESTARTS, "stage" => s.clone()).absolute(0);
            if stage != "synthetic" {
                metrics::counter!(DOCUMENTS_FAILED, "stage" => s.clone()).absolute(0);
            }
        } else {
            metrics::counter!(RECONCILER_REQUEUED, "stage" => s.clone()).absolute(0);
        }
        metrics::counter!(QUEUE_PUSHED, "stage" => s).absolute(0);
    }
    if role == "worker" && stages.contains(&"embed") {
        metrics::counter!(DOCUMENTS_READY).absolute(0);
    }
    if role == "producer" {
        for outcome in ["created", "duplicate", "replayed"] {
            metrics::counter!(DOCUMENTS_UPLOADED, "outcome" => outcome).absolute(0);
        }
        for outcome in ["built", "dropped", "failed"] {
            metrics::counter!(SEARCH_TENANT_INDEX_CHANGES, "outcome" => outcome).absolute(0);
        }
    }
    for &(provider, operation) in providers {
        for &outcome in PROVIDER_OUTCOMES {
            metrics::counter!(PROVIDER_REQUESTS, "provider" => provider, "operation" => operation, "outcome" => outcome)
                .absolute(0);
        }
        if operation == "embed" {
            metrics::counter!(PROVIDER_EMBEDDED_INPUTS, "provider" => provider).absolute(0);
            metrics::counter!(PROVIDER_TRUNCATED_INPUTS, "provider" => provider).absolute(0);
        }
        if role == "worker" && matches!(provider, "openai" | "llamaparse") {
            for name in [QUOTA_DEFERRED, QUOTA_COOLDOWNS, QUOTA_USED] {
                metrics::counter!(name, "provider" => provider).absolute(0);
            }
            for &reason in PAUSE_REASONS {
                metrics::counter!(QUOTA_PAUSES, "provider" => provider, "reason" => reason)
                    .absolute(0);
            }
        }
    }
}

/// Creates, at zero, the series of a search reranker of `provider`: its requests by outcome, and the searches its
/// failures left unreranked by reason.
pub fn register_rerank(provider: &'static str) {
    for &outcome in PROVIDER_OUTCOMES {
        metrics::counter!(PROVIDER_REQUESTS, "provider" => provider, "operation" => "rerank", "outcome" => outcome)
            .absolute(0);
        if !matches!(outcome, "ok" | "too_large") {
            metrics::counter!(SEARCH_RERANK_FAILURES, "reason" => outcome).absolute(0);
        }
    }
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
