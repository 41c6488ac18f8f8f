//! Dead letters of one queue: listing them as [`DeadLetter`]s, replaying them onto the queue and purging them.

use super::{
    BATCH, QueueError, entry_time_ms,
    envelope::{field, lenient_number},
    handle::QueueHandle,
    scripts,
};

/// One dead letter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    /// Entry id in the dead-letter stream (its time part is when the job died).
    pub entry_id: String,
    /// The job id.
    pub job_id: String,
    /// The job's JSON payload, as pushed.
    pub payload: String,
    /// Attempts the job used.
    pub attempts: u32,
    /// Why it died.
    pub error: String,
    /// When it died, ms since the epoch.
    pub died_at_ms: u64,
}

impl DeadLetter {
    /// Reads a dead-letter entry; missing fields read as empty (or 0), so even a malformed one can be listed.
    fn from_entry(e: redis::streams::StreamId) -> Self {
        let text = |name: &str| e.get::<String>(name).unwrap_or_default();
        Self {
            died_at_ms: entry_time_ms(&e.id),
            job_id: text(field::JOB_ID),
            payload: text(field::PAYLOAD),
            attempts: lenient_number(Some(&text(field::ATTEMPTS))),
            error: text(field::ERROR),
            entry_id: e.id,
        }
    }
}

impl QueueHandle {
    /// Lists up to `limit` dead letters, newest first.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(&self.keys().dead)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut self.conn())
            .await?;
        Ok(reply.ids.into_iter().map(DeadLetter::from_entry).collect())
    }

    /// Puts dead letters back on the queue with a fresh attempt count: the given entry ids, or all of them when
    /// `ids` is empty. Returns how many were moved.
    pub async fn replay_dead(&self, ids: &[String]) -> Result<u64, QueueError> {
        let k = self.keys();
        let mut conn = self.conn();
        let mut moved = 0u64;
        if ids.is_empty() {
            loop {
                let n: u64 = scripts::REPLAY
                    .key(&k.dead)
                    .key(&k.stream)
                    .key(&k.live)
                    .arg(BATCH)
                    .invoke_async(&mut conn)
                    .await?;
                moved += n;
                if n < BATCH as u64 {
                    break;
                }
            }
        } else {
            for chunk in ids.chunks(BATCH) {
                let n: u64 = scripts::REPLAY
                    .key(&k.dead)
                    .key(&k.stream)
                    .key(&k.live)
                    .arg(BATCH)
                    .arg(chunk)
                    .invoke_async(&mut conn)
                    .await?;
                moved += n;
            }
        }
        Ok(moved)
    }

    /// Deletes dead letters: the given entry ids, or all of them when `ids` is empty. Returns how many went.
    pub async fn purge_dead(&self, ids: &[String]) -> Result<u64, QueueError> {
        let mut conn = self.conn();
        let dead = &self.keys().dead;
        if ids.is_empty() {
            let (n, _): (u64, ()) = redis::pipe()
                .xlen(dead)
                .del(dead)
                .query_async(&mut conn)
                .await?;
            return Ok(n);
        }
        let mut removed = 0;
        for chunk in ids.chunks(BATCH) {
            let n: u64 = redis::cmd("XDEL")
                .arg(dead)
                .arg(chunk)
                .query_async(&mut conn)
                .await?;
            removed += n;
        }
        Ok(removed)
    }
}
