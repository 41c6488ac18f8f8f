//! The fetch loop of a consumer: takes over stale entries of dead consumers, blocks on the stream for new ones,
//! and turns what it read into apalis tasks, dead-lettering entries that must not run.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use apalis_core::task::{Task, builder::TaskBuilder, task_id::TaskId};
use redis::{
    AsyncCommands, FromRedisValue,
    aio::MultiplexedConnection,
    streams::{StreamReadOptions, StreamReadReply},
};
use serde::de::DeserializeOwned;

use super::{
    Claim, Delivery, GROUP,
    backend::is_suspect,
    consumer::Shared,
    delivery::{RawPayload, SUSPECT_DELIVERIES, Suspect},
    entry_time_ms,
    envelope::{Envelope, Malformed},
    now_ms, scripts,
    tasks::Backoff,
};
use crate::metrics as m;

/// The fetch loop's state in a consumer: its dedicated reader connection and when it last reclaimed.
pub(super) struct Fetcher {
    /// Held by the fetch loop for as long as it runs, so a consumer reads with one connection at a time.
    reader: tokio::sync::Mutex<Reader>,
    /// Redis client id of the reader's connection (-1 before it connects), for `CLIENT UNBLOCK`.
    reader_id: AtomicI64,
    /// When the fetch loop last looked for stale claims, ms since the epoch.
    last_reclaim_ms: AtomicU64,
}

impl Fetcher {
    pub(super) fn new(client: redis::Client) -> Self {
        Self {
            reader: tokio::sync::Mutex::new(Reader { client, conn: None }),
            reader_id: AtomicI64::new(-1),
            last_reclaim_ms: AtomicU64::new(0),
        }
    }
}

/// The dedicated connection a consumer blocks on (a blocked `XREADGROUP` holds its connection).
struct Reader {
    client: redis::Client,
    conn: Option<MultiplexedConnection>,
}

impl Reader {
    async fn connection(
        &mut self,
        id: &AtomicI64,
    ) -> redis::RedisResult<&mut MultiplexedConnection> {
        if self.conn.is_none() {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                // A blocking read answers after its block timeout at the latest; the margin covers a busy server.
                .set_response_timeout(None);
            let mut conn = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            let client_id: i64 = redis::cmd("CLIENT")
                .arg("ID")
                .query_async(&mut conn)
                .await?;
            id.store(client_id, Ordering::Release);
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connection just set"))
    }
}

/// An entry as read from Redis, its envelope parsed once.
struct StreamEntry {
    id: String,
    envelope: Result<Envelope, Malformed>,
    /// How often the group delivered this entry, this delivery included.
    deliveries: u64,
}

impl StreamEntry {
    fn new(id: String, fields: HashMap<String, String>, deliveries: u64) -> Self {
        Self {
            id,
            envelope: Envelope::from_fields(fields),
            deliveries,
        }
    }
}

impl Shared {
    /// Fetches up to `count` jobs: claims stale entries of dead consumers first (when due), then blocks on the
    /// stream. Redis failures are logged, counted and retried with backoff; they never end the worker.
    pub(super) async fn fetch<T: DeserializeOwned + Send + Sync + 'static>(
        self: Arc<Self>,
        count: usize,
    ) -> Vec<Task<T>> {
        let mut reader = self.fetcher.reader.lock().await;
        let mut backoff = Backoff::new();
        let block = self
            .settings()
            .block_timeout
            .min(self.refresh_interval())
            .max(Duration::from_millis(10));
        loop {
            if self.life.is_closing() {
                return Vec::new();
            }
            self.beat();
            if self.reclaim_due() {
                match self.reclaim(count).await {
                    Ok(entries) => {
                        let tasks = self.accept_reclaimed(entries).await;
                        if !tasks.is_empty() {
                            return tasks;
                        }
                    }
                    Err(e) => {
                        self.redis_error("reclaim", &e);
                        backoff.wait().await;
                        continue;
                    }
                }
            }
            if let Some(tasks) = self.read_new(&mut reader, count, block, &mut backoff).await {
                return tasks;
            }
        }
    }

    /// Wakes the reader if it is blocked in `XREADGROUP`, so shutdown need not wait for the block timeout.
    pub(super) async fn unblock_reader(&self) {
        let id = self.fetcher.reader_id.load(Ordering::Acquire);
        if id >= 0 {
            let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                .arg("UNBLOCK")
                .arg(id)
                .query_async(&mut self.queue.broker().connection())
                .await;
        }
    }

    /// Whether a refresh interval passed since the last look for stale claims; if so, this look starts now.
    fn reclaim_due(&self) -> bool {
        let now = now_ms();
        let last = &self.fetcher.last_reclaim_ms;
        if now.saturating_sub(last.load(Ordering::Relaxed))
            < self.refresh_interval().as_millis() as u64
        {
            return false;
        }
        last.store(now, Ordering::Relaxed);
        true
    }

    /// Counts and accepts entries taken over from a consumer that stopped answering.
    async fn accept_reclaimed<T: DeserializeOwned + Send + Sync + 'static>(
        &self,
        entries: Vec<StreamEntry>,
    ) -> Vec<Task<T>> {
        if entries.is_empty() {
            return Vec::new();
        }
        metrics::counter!(m::QUEUE_RECLAIMED, &self.labels()).increment(entries.len() as u64);
        tracing::info!(queue = self.queue.name(), consumer = %self.name, count = entries.len(), "Took over stale jobs of a consumer that stopped answering");
        self.accept(entries).await
    }

    /// One blocking `XREADGROUP` for new entries. `Some` ends the fetch with these tasks (none when closing);
    /// `None` goes round the loop again (nothing runnable arrived, or a Redis failure was waited out).
    async fn read_new<T: DeserializeOwned + Send + Sync + 'static>(
        &self,
        reader: &mut Reader,
        count: usize,
        block: Duration,
        backoff: &mut Backoff,
    ) -> Option<Vec<Task<T>>> {
        let conn = match reader.connection(&self.fetcher.reader_id).await {
            Ok(conn) => conn,
            Err(e) => {
                self.redis_error("connect", &e);
                backoff.wait().await;
                return None;
            }
        };
        let opts = StreamReadOptions::default()
            .group(GROUP, &self.name)
            .count(count)
            .block(block.as_millis() as usize);
        let reply: redis::RedisResult<Option<StreamReadReply>> = conn
            .xread_options(&[&self.queue.keys().stream], &[">"], &opts)
            .await;
        match reply {
            Ok(reply) => {
                backoff.reset();
                let entries = read_entries(reply);
                if entries.is_empty() {
                    return None;
                }
                let tasks = self.accept(entries).await;
                (!tasks.is_empty()).then_some(tasks)
            }
            Err(e) if e.code() == Some("NOGROUP") => {
                self.recreate_group(backoff).await;
                None
            }
            Err(e) => {
                if self.life.is_closing() {
                    return Some(Vec::new());
                }
                self.redis_error("read", &e);
                reader.conn = None;
                backoff.wait().await;
                None
            }
        }
    }

    async fn recreate_group(&self, backoff: &mut Backoff) {
        tracing::info!(
            queue = self.queue.name(),
            "The consumer group is missing (new or restarted Redis); creating it"
        );
        if let Err(e) = self.queue.ensure_group().await {
            tracing::warn!(queue = self.queue.name(), error = %e, "Could not create the consumer group");
            backoff.wait().await;
        }
    }

    /// Claims entries other consumers left idle for half of `reclaim_after`, with their delivery counts.
    async fn reclaim(&self, count: usize) -> redis::RedisResult<Vec<StreamEntry>> {
        let min_idle = (self.settings().reclaim_after / 2).as_millis() as u64;
        let rows: Vec<(String, Vec<String>, u64)> = scripts::RECLAIM
            .key(&self.queue.keys().stream)
            .arg(GROUP)
            .arg(&self.name)
            .arg(min_idle)
            .arg(count)
            .arg(SUSPECT_DELIVERIES)
            .invoke_async(&mut self.queue.broker().connection())
            .await
            .or_else(|e| {
                if e.code() == Some("NOGROUP") {
                    Ok(Vec::new())
                } else {
                    Err(e)
                }
            })?;
        Ok(rows
            .into_iter()
            .map(|(id, flat, deliveries)| {
                let mut fields = HashMap::new();
                let mut it = flat.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    fields.insert(k, v);
                }
                StreamEntry::new(id, fields, deliveries)
            })
            .collect())
    }

    /// Turns fetched entries into tasks; entries that must not run (out of attempts, undecodable, malformed)
    /// go to the dead letters here.
    async fn accept<T: DeserializeOwned + Send + Sync + 'static>(
        &self,
        entries: Vec<StreamEntry>,
    ) -> Vec<Task<T>> {
        let now = now_ms();
        let lapse = self.settings().reclaim_after / 2;
        let claims = self
            .claims
            .take(entries.iter().map(|e| e.id.as_str()), lapse);
        let mut tasks = Vec::with_capacity(entries.len());
        for (entry, claim) in entries.into_iter().zip(claims) {
            let id = entry.id.clone();
            if let Some(task) = self.admit(entry, claim, now).await {
                tasks.push(task);
            } else {
                self.disown(&id);
            }
        }
        // Suspects go last, so the rest of the batch starts before they wait for the worker to empty.
        tasks.sort_by_key(is_suspect);
        tasks
    }

    /// The task for one entry, or `None` when the entry went to the dead letters instead.
    async fn admit<T: DeserializeOwned + Send + Sync + 'static>(
        &self,
        entry: StreamEntry,
        claim: Claim,
        now: u64,
    ) -> Option<Task<T>> {
        let env = match entry.envelope {
            Ok(env) => env,
            Err(Malformed) => {
                let env = Envelope {
                    job_id: entry.id.clone(),
                    payload: String::new(),
                    attempts: u32::try_from(entry.deliveries).unwrap_or(u32::MAX),
                    enqueued_at_ms: 0,
                    last_error: Some(Malformed::MESSAGE.into()),
                };
                let _ = self.dead_letter(&entry.id, &env).await;
                return None;
            }
        };
        let attempt = env.attempts.saturating_add(entry.deliveries as u32);
        let max = self.settings().max_deliveries;
        if attempt > max {
            let last = env
                .last_error
                .as_ref()
                .map(|e| format!(" (last error: {e})"));
            let reason = format!(
                "delivered {} times without finishing: its worker crashed or was killed each time{}",
                attempt - 1,
                last.unwrap_or_default()
            );
            self.dead_letter_counted(&entry.id, env, attempt - 1, reason)
                .await;
            return None;
        }
        let args: T = match serde_json::from_str(&env.payload) {
            Ok(args) => args,
            Err(e) => {
                let reason = format!(
                    "payload does not decode as {}: {e}",
                    std::any::type_name::<T>()
                );
                self.dead_letter_counted(&entry.id, env, attempt, reason)
                    .await;
                return None;
            }
        };
        let ready_at_ms = entry_time_ms(&entry.id);
        metrics::histogram!(m::QUEUE_WAIT, &self.labels())
            .record(now.saturating_sub(ready_at_ms) as f64 / 1000.0);
        let delivery = Delivery {
            queue: self.queue.shared_name(),
            entry_id: entry.id,
            job_id: env.job_id,
            attempt,
            enqueued_at_ms: env.enqueued_at_ms,
            ready_at_ms,
            last_error: env.last_error,
            claim,
        };
        Some(self.build_task(args, delivery, env.payload, entry.deliveries))
    }

    /// Dead-letters an entry that must not run with `attempts` and `reason`, counting it when it was still ours.
    async fn dead_letter_counted(
        &self,
        entry_id: &str,
        mut env: Envelope,
        attempts: u32,
        reason: String,
    ) {
        env.attempts = attempts;
        env.last_error = Some(reason);
        if self.dead_letter(entry_id, &env).await.unwrap_or(false) {
            self.count_dead();
        }
    }

    /// The apalis task of a runnable entry: its [`Delivery`], its raw payload, and the suspect mark when it was
    /// delivered [`SUSPECT_DELIVERIES`] times.
    fn build_task<T>(
        &self,
        args: T,
        delivery: Delivery,
        payload: String,
        deliveries: u64,
    ) -> Task<T> {
        let mut task = TaskBuilder::new(args)
            .task_id(TaskId::from_string(delivery.job_id.clone()))
            .attempt(delivery.attempt.saturating_sub(1) as usize)
            .max_attempts(self.settings().max_deliveries as usize)
            .data(delivery)
            .data(RawPayload(Arc::from(payload)));
        if deliveries >= SUSPECT_DELIVERIES {
            task = task.data(Suspect);
        }
        task.build()
    }
}

/// The entries of an `XREADGROUP` reply; each was delivered once (new entries only).
fn read_entries(reply: Option<StreamReadReply>) -> Vec<StreamEntry> {
    reply
        .into_iter()
        .flat_map(|r| r.keys)
        .flat_map(|k| k.ids)
        .map(|id| {
            let fields = id
                .map
                .iter()
                .filter_map(|(k, v)| String::from_redis_value_ref(v).ok().map(|v| (k.clone(), v)))
                .collect();
            StreamEntry::new(id.id, fields, 1)
        })
        .collect()
}
