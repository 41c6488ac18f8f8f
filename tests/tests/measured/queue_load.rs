//! Bursts and memory: 100,000 jobs at once. Each runs alone (see `measured`), so its load disturbs no
//! timing-sensitive test.

use std::time::Duration;

use tests::{RedisServer, WorkerProcess, broker, settings, unique_prefix, wait_for_stats};
use upload_pipeline::{jobs::synthetic::SyntheticJob, queue::Queue};

const JOBS: u64 = 100_000;

fn no_ops() -> Vec<SyntheticJob> {
    (0..JOBS)
        .map(|seq| SyntheticJob {
            seq,
            ..Default::default()
        })
        .collect()
}

/// c. A burst of 100,000 jobs pushed at once is processed completely by two workers, with no worker error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_burst_of_100k_jobs_is_processed_completely_without_worker_errors() {
    let _one = super::alone().await;
    let mut s = settings(&unique_prefix("burst"), &tests::redis_url());
    let _keys = tests::RedisKeys::of(&s);
    s.worker.concurrency.synthetic = 50;
    let queue: Queue<SyntheticJob> = broker(&s).await.queue("synthetic").unwrap();
    let mut workers = [
        WorkerProcess::start(&s, "synthetic"),
        WorkerProcess::start(&s, "synthetic"),
    ];
    for w in &mut workers {
        w.wait_healthy().await;
    }
    queue.push_many(&no_ops()).await.unwrap();

    let stats = wait_for_stats(
        &queue,
        "the burst to drain",
        Duration::from_secs(300),
        |st| st.pending + st.in_flight + st.delayed == 0,
    )
    .await;
    assert_eq!(stats.dead, 0, "{stats:?}");
    let mut done = 0.0;
    for w in &workers {
        let succeeded = w
            .metric("upload_pipeline_queue_jobs_total", &["outcome=\"success\""])
            .await;
        assert!(succeeded > 0.0, "both workers took part");
        done += succeeded;
        assert_eq!(
            w.metric("upload_pipeline_queue_jobs_total", &["outcome=\"retried\""])
                .await,
            0.0
        );
        assert_eq!(
            w.metric("upload_pipeline_queue_redis_errors_total", &[])
                .await,
            0.0
        );
        let logs = w.logs();
        assert!(
            !logs.contains("ERROR") && !logs.contains("WorkerError"),
            "worker errors:\n{logs}"
        );
    }
    assert_eq!(done, JOBS as f64, "every job succeeded exactly once");
}

/// e. Bounded memory: after 100,000 completed jobs Redis holds within a few MB of what it held before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_redis_memory_returns_to_its_baseline_after_100k_completed_jobs() {
    let _one = super::alone().await;
    let redis = RedisServer::start().await;
    let mut s = settings(&unique_prefix("memory"), &redis.url());
    s.worker.concurrency.synthetic = 50;
    let queue: Queue<SyntheticJob> = broker(&s).await.queue("synthetic").unwrap();
    let mut worker = WorkerProcess::start(&s, "synthetic");
    worker.wait_healthy().await;
    let baseline = redis.used_memory().await;

    queue.push_many(&no_ops()).await.unwrap();
    let peak = redis.used_memory().await;
    wait_for_stats(
        &queue,
        "the jobs to complete",
        Duration::from_secs(300),
        |st| st.pending + st.in_flight + st.delayed == 0,
    )
    .await;
    assert_eq!(
        worker
            .metric("upload_pipeline_queue_jobs_total", &["outcome=\"success\""])
            .await,
        JOBS as f64
    );
    let after = redis.used_memory().await;
    let mb = |b: u64| b as f64 / 1_048_576.0;
    eprintln!(
        "Redis used_memory: baseline {:.2} MB, with 100k queued {:.2} MB, after {:.2} MB",
        mb(baseline),
        mb(peak),
        mb(after)
    );
    assert!(
        peak > baseline + 5 * 1_048_576,
        "the queued jobs took memory ({:.2} MB)",
        mb(peak)
    );
    assert!(
        after <= baseline + 2 * 1_048_576,
        "memory back within 2 MB of the baseline: {:.2} MB -> {:.2} MB",
        mb(baseline),
        mb(after)
    );
}
