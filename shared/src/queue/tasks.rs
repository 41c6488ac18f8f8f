//! A consumer's background tasks: the acker (batched acknowledgements), the refresher (keeps claims fresh) and
//! the promoter (moves due retries into the stream), and the backoff they and the fetch loop use on Redis errors.

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use redis::aio::ConnectionManager;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use super::{BATCH, GROUP, consumer::Shared, now_ms, scripts};
use crate::metrics as m;

/// A message to the acker.
pub(super) enum AckMsg {
    /// Entry id, job id, and who waits for the acknowledgement to be written.
    Ack(String, String, oneshot::Sender<()>),
    /// Answers once everything sent before it is written.
    Flush(oneshot::Sender<()>),
}

/// Starts the acker, the refresher and the promoter of a new consumer. The acker holds the consumer until its
/// channel closes; the others end when the consumer is gone.
pub(super) fn spawn(
    shared: &Arc<Shared>,
    acks: mpsc::UnboundedReceiver<AckMsg>,
) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(run_acker(shared.clone(), acks)),
        tokio::spawn(run_refresher(Arc::downgrade(shared))),
        tokio::spawn(run_promoter(Arc::downgrade(shared))),
    ]
}

/// Writes acknowledgements in batches: whatever finished while the previous batch was in flight goes in the next
/// one (`XACK` with many ids, then `XDEL`), so a busy worker spends a fraction of a Redis call per job.
async fn run_acker(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<AckMsg>) {
    let mut conn = shared.queue.broker().connection();
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(msg) => batch.push(msg),
                Err(_) => break,
            }
        }
        let acks: Vec<(&str, &str)> = batch
            .iter()
            .filter_map(|m| match m {
                AckMsg::Ack(id, job, _) => Some((id.as_str(), job.as_str())),
                AckMsg::Flush(_) => None,
            })
            .collect();
        if !acks.is_empty() {
            write_acks(&shared, &mut conn, &acks).await;
            let mut owned = shared.claims.owned();
            for (id, _) in &acks {
                owned.remove(*id);
            }
        }
        for msg in batch.drain(..) {
            let (AckMsg::Ack(_, _, done) | AckMsg::Flush(done)) = msg;
            let _ = done.send(());
        }
    }
}

/// Runs the ack script on (entry id, job id) pairs, retrying Redis failures until it succeeds.
async fn write_acks(shared: &Shared, conn: &mut ConnectionManager, acks: &[(&str, &str)]) {
    let keys = shared.queue.keys();
    let mut backoff = Backoff::new();
    loop {
        let mut inv = scripts::ACK.prepare_invoke();
        inv.key(&keys.stream)
            .key(&keys.live)
            .key(&keys.again)
            .arg(GROUP)
            .arg(&shared.name)
            .arg(now_ms());
        for (id, job) in acks {
            inv.arg(*id).arg(*job);
        }
        let res: redis::RedisResult<i64> = inv.invoke_async(conn).await;
        match res.map(drop) {
            Ok(()) => break,
            // The group (or the whole stream) is gone after a Redis restart: nothing left to acknowledge.
            Err(e) if e.code() == Some("NOGROUP") => break,
            Err(e) => {
                shared.redis_error("ack", &e);
                backoff.wait().await;
            }
        }
    }
}

/// Keeps the claims of the jobs this consumer holds fresh, so no other consumer takes them over while they run.
async fn run_refresher(shared: Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let interval = s.refresh_interval();
        let ids: Vec<String> = s.claims.owned().keys().cloned().collect();
        let started = now_ms();
        let mut all_refreshed = true;
        let mut conn = s.queue.broker().connection();
        for chunk in ids.chunks(BATCH) {
            let res: redis::RedisResult<Vec<String>> = scripts::REFRESH
                .key(&s.queue.keys().stream)
                .arg(GROUP)
                .arg(&s.name)
                .arg(chunk)
                .invoke_async(&mut conn)
                .await;
            match res {
                Ok(lost) => mark_lost(&s, lost),
                Err(e) => {
                    all_refreshed = false;
                    s.redis_error("refresh", &e);
                }
            }
        }
        if all_refreshed {
            s.claims.refreshed(started);
        } else if s.claims_lapsed() {
            tracing::warn!(queue = s.queue.name(), consumer = %s.name, "Could not refresh the claims for half of reclaim_after: another consumer may take the running jobs over, so they stop before their next paid call");
        }
        s.beat();
        drop(s);
        tokio::time::sleep(interval).await;
    }
}

/// Marks the claims the refresh script found owned by another consumer as lost, so their handlers stop.
fn mark_lost(s: &Shared, lost: Vec<String>) {
    let mut owned = s.claims.owned();
    for id in lost {
        // Acknowledged since the snapshot: not lost, just done.
        if let Some(claim) = owned.remove(&id) {
            claim.lose();
            tracing::warn!(queue = s.queue.name(), consumer = %s.name, entry_id = %id, "Lost the claim on a running job to another consumer");
            metrics::counter!(m::QUEUE_CLAIMS_LOST, &s.labels()).increment(1);
        }
    }
}

/// Moves retries that are due from the delayed set into the stream.
async fn run_promoter(shared: Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let res: redis::RedisResult<(u64, i64)> = scripts::PROMOTE
            .key(&s.queue.keys().delayed)
            .key(&s.queue.keys().stream)
            .arg(BATCH)
            .invoke_async(&mut s.queue.broker().connection())
            .await;
        let pause = match res {
            Ok((moved, _)) if moved as usize >= BATCH => Duration::ZERO,
            Ok((_, wait_ms)) if wait_ms >= 0 => Duration::from_millis(wait_ms as u64)
                .clamp(Duration::from_millis(5), Duration::from_secs(1)),
            Ok(_) => Duration::from_secs(1),
            Err(e) => {
                s.redis_error("promote", &e);
                Duration::from_secs(1)
            }
        };
        drop(s);
        tokio::time::sleep(pause).await;
    }
}

/// Exponential backoff for Redis failures: 50 ms doubling to 5 s.
pub(super) struct Backoff(Duration);

impl Backoff {
    pub(super) fn new() -> Self {
        Self(Duration::from_millis(50))
    }

    pub(super) fn reset(&mut self) {
        self.0 = Duration::from_millis(50);
    }

    pub(super) async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
    }
}
