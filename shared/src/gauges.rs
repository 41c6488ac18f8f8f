//! The gauges read at scrape time: queue depths from Redis, documents by status from Postgres, provider pauses
//! from the quota, and this process's CPU and memory. It sits above [`queue`](crate::queue),
//! [`quota`](crate::quota) and [`db`](crate::db) so that [`metrics`](crate::metrics), which they all record
//! into, stays a catalogue that imports none of them. Each read is bounded to 2 s; a failed read is logged and
//! leaves the gauge at its previous value, so one slow dependency never fails a scrape.

use std::time::Duration;

use crate::{
    metrics::{
        DOCUMENT_STATUSES, DOCUMENTS_STORED, PROCESS_PREFIX, QUEUE_DEAD, QUEUE_DELAYED,
        QUEUE_IN_FLIGHT, QUEUE_OLDEST_AGE, QUEUE_PENDING, QUOTA_PAUSED,
    },
    queue::{QueueHandle, QueueStats},
    quota::{PauseReason, Quota},
};

const READ_TIMEOUT: Duration = Duration::from_secs(2);

static PROCESS: std::sync::LazyLock<metrics_process::Collector> =
    std::sync::LazyLock::new(|| metrics_process::Collector::new(PROCESS_PREFIX));

/// Reads this process's CPU, memory, file descriptors and threads into their metrics (call on every scrape).
pub fn collect_process() {
    PROCESS.collect();
}

/// Reads a queue's state from Redis and sets its gauges.
pub async fn refresh_queue_gauges(queue: &QueueHandle) {
    let name = queue.name();
    match tokio::time::timeout(READ_TIMEOUT, queue.stats()).await {
        Ok(Ok(stats)) => record_queue_stats(name, &stats),
        Ok(Err(e)) => {
            tracing::warn!(queue = name, error = %e, "Could not read queue state for /metrics")
        }
        Err(_) => tracing::warn!(queue = name, "Reading queue state for /metrics timed out"),
    }
}

fn record_queue_stats(queue: &str, stats: &QueueStats) {
    let q = queue.to_owned();
    metrics::gauge!(QUEUE_PENDING, "stage" => q.clone()).set(stats.pending as f64);
    metrics::gauge!(QUEUE_IN_FLIGHT, "stage" => q.clone()).set(stats.in_flight as f64);
    metrics::gauge!(QUEUE_DELAYED, "stage" => q.clone()).set(stats.delayed as f64);
    metrics::gauge!(QUEUE_DEAD, "stage" => q.clone()).set(stats.dead as f64);
    metrics::gauge!(QUEUE_OLDEST_AGE, "stage" => q)
        .set(stats.oldest_pending_age_ms.unwrap_or(0) as f64 / 1000.0);
}

/// Counts documents by status in Postgres and sets their gauges.
pub async fn refresh_document_gauges(pool: &sqlx::PgPool) {
    let query = sqlx::query_as::<_, (String, i64)>(
        "SELECT status, documents FROM upload_pipeline.document_status_counts()",
    )
    .fetch_all(pool);
    match tokio::time::timeout(READ_TIMEOUT, query).await {
        Ok(Ok(rows)) => {
            for &status in DOCUMENT_STATUSES {
                let n = rows
                    .iter()
                    .find(|(s, _)| s == status)
                    .map_or(0, |(_, n)| *n);
                metrics::gauge!(DOCUMENTS_STORED, "status" => status).set(n as f64);
            }
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "Could not count documents for /metrics"),
        Err(_) => tracing::warn!("Counting documents for /metrics timed out"),
    }
}

/// Reads whether and why each remote provider is paused fleet-wide and sets [`QUOTA_PAUSED`].
pub async fn refresh_quota_gauges(quota: &Quota) {
    for provider in ["openai", "llamaparse"] {
        match tokio::time::timeout(READ_TIMEOUT, quota.pause_reason(provider)).await {
            Ok(Ok(why)) => {
                for reason in PauseReason::ALL {
                    let on = why == Some(reason);
                    metrics::gauge!(QUOTA_PAUSED, "provider" => provider, "reason" => reason.as_str())
                        .set(if on { 1.0 } else { 0.0 });
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(provider, error = %e, "Could not read the quota pause for /metrics")
            }
            Err(_) => tracing::warn!(provider, "Reading the quota pause for /metrics timed out"),
        }
    }
}
