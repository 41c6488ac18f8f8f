//! [`QueueStats`]: the state of one queue (waiting, in flight, delayed, dead, oldest wait, consumers), read in
//! one atomic script.

use super::{GROUP, QueueError, handle::QueueHandle, scripts};

/// The state of a queue, read in one atomic script (cheap enough for every scrape).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    /// Jobs waiting for a worker.
    pub pending: u64,
    /// Jobs delivered to a worker and not yet acknowledged.
    pub in_flight: u64,
    /// Failed attempts waiting for their retry time.
    pub delayed: u64,
    /// Dead letters.
    pub dead: u64,
    /// Age of the oldest waiting job, in ms (`None` when nothing waits).
    pub oldest_pending_age_ms: Option<u64>,
    /// Consumers known to the group (including ones not yet cleaned up after a crash).
    pub consumers: u64,
}

impl QueueHandle {
    /// Reads the queue's state.
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        let k = self.keys();
        let v: Vec<i64> = scripts::STATS
            .key(&k.stream)
            .key(&k.delayed)
            .key(&k.dead)
            .arg(GROUP)
            .invoke_async(&mut self.conn())
            .await?;
        let get = |i: usize| v.get(i).copied().unwrap_or(0).max(0) as u64;
        Ok(QueueStats {
            pending: get(0),
            in_flight: get(1),
            delayed: get(2),
            dead: get(3),
            oldest_pending_age_ms: v.get(4).and_then(|&a| u64::try_from(a).ok()),
            consumers: get(5),
        })
    }
}
