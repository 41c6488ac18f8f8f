//! The untyped [`QueueHandle`] and the Redis keys of one queue: pushing encoded jobs, the live set, the
//! consumer group and releasing a stopped consumer's jobs.

use std::sync::Arc;

use redis::aio::ConnectionManager;

use super::{BATCH, GROUP, QueueError, broker::Broker, now_ms, scripts};

/// The Redis keys of one queue.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pub stream: String,
    pub delayed: String,
    pub dead: String,
    pub live: String,
    pub again: String,
}

impl Keys {
    pub(super) fn new(prefix: &str, name: &str) -> Self {
        let base = format!("{prefix}:{{{name}}}");
        Self {
            stream: format!("{base}:stream"),
            delayed: format!("{base}:delayed"),
            dead: format!("{base}:dead"),
            live: format!("{base}:live"),
            again: format!("{base}:again"),
        }
    }
}

struct HandleInner {
    name: Arc<str>,
    keys: Keys,
    broker: Broker,
}

/// An untyped handle on one queue: its state, dead letters and consumers.
#[derive(Clone)]
pub struct QueueHandle {
    inner: Arc<HandleInner>,
}

impl std::fmt::Debug for QueueHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueHandle")
            .field("name", &self.inner.name)
            .field("stream", &self.inner.keys.stream)
            .finish()
    }
}

impl QueueHandle {
    pub(super) fn new(name: &str, keys: Keys, broker: Broker) -> Self {
        Self {
            inner: Arc::new(HandleInner {
                name: Arc::from(name),
                keys,
                broker,
            }),
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub(crate) fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    pub(crate) fn broker(&self) -> &Broker {
        &self.inner.broker
    }

    pub(crate) fn shared_name(&self) -> Arc<str> {
        self.inner.name.clone()
    }

    pub(super) fn conn(&self) -> ConnectionManager {
        self.inner.broker.connection()
    }

    /// Creates the consumer group (and the stream) if missing; harmless when they exist.
    pub async fn ensure_group(&self) -> Result<(), QueueError> {
        let res: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.inner.keys.stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn())
            .await;
        match res {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => Ok(other?),
        }
    }

    /// Pushes (job id, JSON payload) pairs in script calls of at most [`BATCH`]. Ids that are live are not added;
    /// with `again`, they are marked to run once more after their live copy. Returns the ids that were added.
    pub(super) async fn push_jobs(
        &self,
        jobs: &[(String, String)],
        again: bool,
    ) -> Result<Vec<String>, QueueError> {
        let mut conn = self.conn();
        let now = now_ms();
        let mut added = Vec::new();
        for chunk in jobs.chunks(BATCH) {
            let mut inv = scripts::PUSH.prepare_invoke();
            inv.key(&self.inner.keys.stream)
                .key(&self.inner.keys.live)
                .key(&self.inner.keys.again)
                .arg(now)
                .arg(if again { "again" } else { "once" });
            for (id, payload) in chunk {
                inv.arg(id).arg(payload);
            }
            let ids: Vec<String> = inv.invoke_async(&mut conn).await?;
            added.extend(ids);
        }
        metrics::counter!(crate::metrics::QUEUE_PUSHED, "stage" => self.inner.name.to_string())
            .increment(added.len() as u64);
        Ok(added)
    }

    /// Which of `job_ids` are live (waiting, in flight or delayed), in order.
    pub async fn live(&self, job_ids: &[String]) -> Result<Vec<bool>, QueueError> {
        let mut conn = self.conn();
        let mut out = Vec::with_capacity(job_ids.len());
        for chunk in job_ids.chunks(BATCH) {
            let flags: Vec<i64> = scripts::LIVE
                .key(&self.inner.keys.live)
                .arg(chunk)
                .invoke_async(&mut conn)
                .await?;
            out.extend(flags.into_iter().map(|f| f == 1));
        }
        Ok(out)
    }

    /// Gives everything `consumer` still holds back to the queue at once and removes the consumer.
    /// Used after a worker stops, so its unfinished jobs need not wait for `reclaim_after`.
    pub async fn release_consumer(&self, consumer: &str) -> Result<u64, QueueError> {
        let n: u64 = scripts::RELEASE
            .key(&self.inner.keys.stream)
            .arg(GROUP)
            .arg(consumer)
            .invoke_async(&mut self.conn())
            .await?;
        if n > 0 {
            metrics::counter!(crate::metrics::QUEUE_JOBS, "stage" => self.inner.name.to_string(), "outcome" => "released")
                .increment(n);
        }
        Ok(n)
    }
}
