//! f. Pickup: a job pushed to an idle queue starts in under 50 ms at the 99th percentile, because an idle worker
//! waits in a blocking read that Redis answers on push (its block timeout here is 5 s: polling could not do it).
//! It runs alone (see `measured`), so no other test's load shares the machine while it measures.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tests::{settings, unique_prefix};
use tokio::sync::mpsc;
use upload_pipeline::{
    queue::{Delivery, JobError, Queue},
    runtime::Runtime,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_a_job_pushed_to_an_idle_queue_starts_within_50_ms_p99() {
    let _turn = super::alone().await;
    let mut s = settings(&unique_prefix("pickup"), &tests::redis_url());
    let _keys = tests::RedisKeys::of(&s);
    s.queue.block_timeout = Duration::from_secs(5);
    s.worker.metrics_addr = "127.0.0.1:0".parse().unwrap();
    let (started_tx, mut started) = mpsc::unbounded_channel::<(u64, Instant)>();
    let runtime = Runtime::connect(Arc::new(s.clone()))
        .await
        .unwrap()
        .stage("pickup", 4, move |seq: u64, _: Delivery| {
            let tx = started_tx.clone();
            async move {
                let _ = tx.send((seq, Instant::now()));
                Ok::<(), JobError>(())
            }
        })
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let fleet = tokio::spawn(runtime.run(None, async move {
        let _ = stop_rx.await;
        Ok(())
    }));
    let queue: Queue<u64> = tests::broker(&s).await.queue("pickup").unwrap();
    // Warm up connections and scripts, then measure 200 pushes to an idle queue.
    let mut lat = Vec::with_capacity(200);
    for seq in 0..220u64 {
        // Let the worker go back to its blocking read.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let pushed = Instant::now();
        queue.push(&seq).await.unwrap();
        let (got, at) = tokio::time::timeout(Duration::from_secs(10), started.recv())
            .await
            .expect("job started")
            .unwrap();
        assert_eq!(got, seq);
        if seq >= 20 {
            lat.push(at.duration_since(pushed));
        }
    }
    lat.sort();
    let p50 = lat[lat.len() / 2];
    let p99 = lat[(lat.len() * 99).div_ceil(100) - 1];
    eprintln!(
        "pickup over {} jobs: p50 {:?}, p99 {:?}, max {:?}",
        lat.len(),
        p50,
        p99,
        lat[lat.len() - 1]
    );
    assert!(
        p99 < Duration::from_millis(50),
        "pickup p99 {p99:?} is not under 50 ms"
    );
    stop_tx.send(()).unwrap();
    fleet.await.unwrap().unwrap();
}
