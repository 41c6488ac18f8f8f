//! The consumer side of a queue: the apalis [`Backend`] that fetches jobs, and the background tasks that keep a
//! consumer's claims alive, promote due retries and batch acknowledgements.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    marker::PhantomData,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use apalis_core::{
    backend::{Backend, BackendConfig, finalize::Ephemeral},
    task::{Task, builder::TaskBuilder, task_id::TaskId},
    worker::context::WorkerContext,
};
use redis::{
    AsyncCommands, FromRedisValue,
    aio::MultiplexedConnection,
    streams::{StreamReadOptions, StreamReadReply},
};
use serde::de::DeserializeOwned;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use super::{
    BATCH, Claim, Delivery, Envelope, GROUP, QueueError, QueueHandle, ack::AckLayer, entry_time_ms,
    error::Failure, now_ms, scripts,
};
use crate::metrics as m;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The raw payload of a delivered job, kept beside it so a retry can re-enqueue it as it was pushed.
#[derive(Debug, Clone)]
pub(crate) struct RawPayload(pub Arc<str>);

/// Marks a suspect: a job that was in flight in [`SUSPECT_DELIVERIES`] - 1 processes that died. It runs alone,
/// so a job that crashes its process takes no innocent job down with it, while innocents that only shared a
/// process with it finish.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Suspect;

/// Deliveries from which a reclaimed job runs alone.
const SUSPECT_DELIVERIES: u64 = 3;

/// One consumer of a queue: a name in the consumer group, the jobs it holds, and its background tasks.
///
/// Create one per worker with [`Queue::consumer`](super::Queue::consumer) inside a Tokio runtime, hand
/// [`Consumer::backend`] to apalis's `WorkerBuilder`, and call [`Consumer::finish`] after the worker stopped.
pub struct Consumer<T> {
    shared: Arc<Shared>,
    _job: PhantomData<fn() -> T>,
}

impl<T> Clone for Consumer<T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            _job: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("queue", &self.shared.queue.name())
            .field("name", &self.shared.name)
            .finish()
    }
}

enum AckMsg {
    /// Entry id, job id.
    Ack(String, String, oneshot::Sender<()>),
    Flush(oneshot::Sender<()>),
}

pub(crate) struct Shared {
    pub(crate) queue: QueueHandle,
    pub(crate) name: String,
    concurrency: usize,
    /// Jobs whose handler is running.
    running: AtomicUsize,
    /// Entry ids this consumer holds (buffered, running or waiting for their ack): the claims it keeps alive.
    owned: Mutex<HashMap<String, Claim>>,
    /// When the refresher last refreshed every claim (or had none to refresh), ms since the epoch.
    refreshed_ms: Arc<AtomicU64>,
    acker: mpsc::UnboundedSender<AckMsg>,
    closing: AtomicBool,
    /// Last time (ms since the epoch) the fetch loop or the refresher went round: the worker loop's heartbeat.
    last_beat_ms: AtomicU64,
    /// When the fetch loop last looked for stale claims, ms since the epoch.
    last_reclaim_ms: AtomicU64,
    reader: tokio::sync::Mutex<Reader>,
    reader_id: AtomicI64,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// A suspect job is running: nothing else starts until it ends.
    suspect_running: AtomicBool,
    /// Wakes the backend when a handler ends (a suspect may start, or a suspect's run ended).
    waker: futures::task::AtomicWaker,
}

impl<T: DeserializeOwned + Send + Sync + 'static> Consumer<T> {
    pub(crate) fn new(queue: QueueHandle, name: String, concurrency: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            reader: tokio::sync::Mutex::new(Reader {
                client: queue.broker().client.clone(),
                conn: None,
            }),
            queue,
            name,
            concurrency,
            running: AtomicUsize::new(0),
            owned: Mutex::new(HashMap::new()),
            refreshed_ms: Arc::new(AtomicU64::new(now_ms())),
            acker: tx,
            closing: AtomicBool::new(false),
            last_beat_ms: AtomicU64::new(now_ms()),
            last_reclaim_ms: AtomicU64::new(0),
            reader_id: AtomicI64::new(-1),
            tasks: Mutex::new(Vec::new()),
            suspect_running: AtomicBool::new(false),
            waker: futures::task::AtomicWaker::new(),
        });
        let tasks = vec![
            tokio::spawn(run_acker(shared.clone(), rx)),
            tokio::spawn(run_refresher(Arc::downgrade(&shared))),
            tokio::spawn(run_promoter(Arc::downgrade(&shared))),
        ];
        *shared.tasks.lock().expect("tasks lock") = tasks;
        Self {
            shared,
            _job: PhantomData,
        }
    }

    /// The apalis backend that delivers this consumer's jobs.
    pub fn backend(&self) -> StreamBackend<T> {
        StreamBackend {
            shared: self.shared.clone(),
            buffer: VecDeque::new(),
            fetch: None,
            closing: None,
        }
    }
}

impl<T> Consumer<T> {
    /// The untyped handle of this consumer: name, load, heartbeat, and [`ConsumerHandle::finish`].
    pub fn handle(&self) -> ConsumerHandle {
        ConsumerHandle(self.shared.clone())
    }
}

/// A consumer without its job type, for the runtime's health, metrics and shutdown.
#[derive(Clone)]
pub struct ConsumerHandle(Arc<Shared>);

impl std::fmt::Debug for ConsumerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerHandle")
            .field("queue", &self.0.queue.name())
            .field("name", &self.0.name)
            .finish()
    }
}

impl ConsumerHandle {
    /// The consumer's name in the group.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Jobs whose handler is running right now.
    pub fn busy(&self) -> usize {
        self.0.running.load(Ordering::Relaxed)
    }

    /// How long ago the consumer's fetch loop or claim refresher last went round.
    pub fn heartbeat_age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.0.last_beat_ms.load(Ordering::Relaxed)))
    }

    /// Ends the consumer after its worker stopped (drained or timed out): flushes pending acknowledgements,
    /// stops its background tasks and gives every job it still holds back to the queue at once.
    /// Returns how many jobs it gave back.
    pub async fn finish(&self) -> Result<u64, QueueError> {
        self.0.finish().await
    }
}

impl Shared {
    fn settings(&self) -> &crate::settings::QueueSettings {
        self.queue.broker().settings()
    }

    fn beat(&self) {
        self.last_beat_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn labels(&self) -> [(&'static str, String); 1] {
        [("stage", self.queue.name().to_owned())]
    }

    pub(crate) fn redis_error(&self, op: &'static str, err: &redis::RedisError) {
        tracing::warn!(queue = self.queue.name(), consumer = %self.name, op, error = %err, "Redis call failed; retrying");
        metrics::counter!(m::QUEUE_REDIS_ERRORS, "stage" => self.queue.name().to_owned(), "op" => op).increment(1);
    }

    /// How often claims are refreshed and stale ones looked for.
    fn refresh_interval(&self) -> Duration {
        (self.settings().reclaim_after / 4).max(Duration::from_millis(50))
    }

    /// Whether the claims went unrefreshed long enough for another consumer to take them over.
    fn claims_lapsed(&self) -> bool {
        now_ms().saturating_sub(self.refreshed_ms.load(Ordering::Acquire))
            >= (self.settings().reclaim_after / 2).as_millis() as u64
    }

    pub(crate) fn disown(&self, entry_id: &str) {
        self.owned.lock().expect("owned lock").remove(entry_id);
    }

    pub(crate) fn running_started(&self) {
        self.running.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn running_ended(&self, suspect: bool) {
        self.running.fetch_sub(1, Ordering::AcqRel);
        if suspect {
            self.suspect_running.store(false, Ordering::Release);
        }
        self.waker.wake();
    }

    /// Acknowledges a finished job; resolves once `XACK` and `XDEL` are written and its id has left the live
    /// set (batched with other acks).
    pub(crate) async fn ack(&self, entry_id: String, job_id: String) {
        let (tx, rx) = oneshot::channel();
        if self.acker.send(AckMsg::Ack(entry_id, job_id, tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Acknowledges a job that ended (`success`, or `failed` when its handler recorded a permanent failure) and
    /// counts it, with its recovery when an earlier attempt had failed.
    pub(crate) async fn complete(&self, delivery: &Delivery, outcome: &'static str) {
        self.ack(delivery.entry_id.clone(), delivery.job_id.clone())
            .await;
        let stage = self.queue.name().to_owned();
        metrics::counter!(m::QUEUE_JOBS, "stage" => stage.clone(), "outcome" => outcome)
            .increment(1);
        let resolution = match outcome {
            "success" if delivery.attempt > 1 => "recovered",
            "success" => return,
            _ => "failed",
        };
        metrics::counter!(m::RECOVERY_FAILED_JOBS, "stage" => stage, "resolution" => resolution)
            .increment(1);
    }

    fn count_dead(&self) {
        let stage = self.queue.name().to_owned();
        metrics::counter!(m::QUEUE_JOBS, "stage" => stage.clone(), "outcome" => "dead")
            .increment(1);
        metrics::counter!(m::RECOVERY_FAILED_JOBS, "stage" => stage, "resolution" => "dead")
            .increment(1);
    }

    async fn flush_acks(&self) {
        let (tx, rx) = oneshot::channel();
        if self.acker.send(AckMsg::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Handles a failed attempt: schedule a retry, or dead-letter it when permanent or out of attempts.
    pub(crate) async fn fail(&self, delivery: &Delivery, payload: &str, failure: Failure) {
        if let Failure::Settled { .. } = failure {
            return self.complete(delivery, "failed").await;
        }
        let max = self.settings().max_deliveries;
        let dead_reason = match &failure {
            Failure::Permanent { error } => Some(error.clone()),
            Failure::Retry { error, .. } if delivery.attempt >= max => Some(format!(
                "{error} (gave up after {} attempts)",
                delivery.attempt
            )),
            Failure::Retry { .. } | Failure::Defer { .. } | Failure::Settled { .. } => None,
        };
        let outcome = if let Some(reason) = dead_reason {
            let env = Envelope {
                id: delivery.job_id.clone(),
                p: payload.to_owned(),
                a: delivery.attempt.to_string(),
                e: delivery.enqueued_at_ms.to_string(),
                err: Some(reason),
            };
            self.dead_letter(&delivery.entry_id, &env)
                .await
                .map(|owned| (owned, "dead"))
        } else {
            let (after, deferred) = match &failure {
                Failure::Retry {
                    after: Some(after), ..
                } => (*after, false),
                Failure::Defer { after, .. } => (*after, true),
                _ => (self.settings().backoff(delivery.attempt), false),
            };
            // A deferred job is stored as if this delivery never happened, so its next one has the same number.
            let attempts_used = if deferred {
                delivery.attempt.saturating_sub(1)
            } else {
                delivery.attempt
            };
            let env = Envelope {
                id: delivery.job_id.clone(),
                p: payload.to_owned(),
                a: attempts_used.to_string(),
                e: delivery.enqueued_at_ms.to_string(),
                err: Some(failure.message().to_owned()),
            };
            tracing::info!(
                queue = self.queue.name(), job.id = %delivery.job_id, attempt = delivery.attempt,
                retry_in_ms = after.as_millis() as u64, error = failure.message(),
                deferred, "Job attempt failed; it will be retried"
            );
            self.retry(&delivery.entry_id, &env, after)
                .await
                .map(|owned| (owned, if deferred { "deferred" } else { "retried" }))
        };
        match outcome {
            Ok((true, "dead")) => self.count_dead(),
            Ok((true, outcome)) => {
                metrics::counter!(m::QUEUE_JOBS, "stage" => self.queue.name().to_owned(), "outcome" => outcome)
                    .increment(1)
            }
            Ok((false, _)) => self.claim_lost(&delivery.entry_id),
            Err(e) => tracing::error!(
                queue = self.queue.name(), job.id = %delivery.job_id, error = %e,
                "Could not record a failed attempt; the job stays claimed and will be delivered again"
            ),
        }
        self.disown(&delivery.entry_id);
    }

    fn claim_lost(&self, entry_id: &str) {
        tracing::warn!(queue = self.queue.name(), consumer = %self.name, entry_id, "Lost the claim on a job to another consumer");
        metrics::counter!(m::QUEUE_CLAIMS_LOST, &self.labels()).increment(1);
    }

    /// Runs a script that changes the queue, retrying Redis failures a few times. `Ok(false)`: not ours anymore.
    async fn owned_op(
        &self,
        op: &'static str,
        call: impl Fn() -> redis::ScriptInvocation<'static>,
    ) -> Result<bool, QueueError> {
        let mut conn = self.queue.broker().connection();
        let mut backoff = Backoff::new();
        let mut tries = 0;
        loop {
            match call().invoke_async::<i64>(&mut conn).await {
                Ok(n) => return Ok(n == 1),
                Err(e) if tries < 8 => {
                    self.redis_error(op, &e);
                    tries += 1;
                    backoff.wait().await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn retry(
        &self,
        entry_id: &str,
        env: &Envelope,
        after: Duration,
    ) -> Result<bool, QueueError> {
        let member = serde_json::to_string(env).map_err(QueueError::Encode)?;
        let keys = self.queue.keys().clone();
        let (consumer, entry_id) = (self.name.clone(), entry_id.to_owned());
        self.owned_op("retry", move || {
            let mut inv = scripts::RETRY.prepare_invoke();
            inv.key(&keys.stream)
                .key(&keys.delayed)
                .arg(GROUP)
                .arg(&consumer)
                .arg(&entry_id);
            inv.arg(after.as_millis() as u64).arg(&member);
            inv
        })
        .await
    }

    async fn dead_letter(&self, entry_id: &str, env: &Envelope) -> Result<bool, QueueError> {
        tracing::warn!(
            queue = self.queue.name(), job.id = %env.id, attempts = %env.a, error = env.err.as_deref().unwrap_or(""),
            "Job moved to the dead letters"
        );
        let keys = self.queue.keys().clone();
        let (consumer, entry_id) = (self.name.clone(), entry_id.to_owned());
        let maxlen = self.settings().dead_letter_max;
        let fields: Vec<(String, String)> = env
            .fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        self.owned_op("dead_letter", move || {
            let mut inv = scripts::DEAD.prepare_invoke();
            inv.key(&keys.stream)
                .key(&keys.dead)
                .key(&keys.live)
                .key(&keys.again)
                .arg(GROUP)
                .arg(&consumer)
                .arg(&entry_id)
                .arg(maxlen);
            for (k, v) in &fields {
                inv.arg(k).arg(v);
            }
            inv
        })
        .await
    }

    /// Turns fetched entries into tasks; entries that must not run (out of attempts, undecodable, malformed)
    /// go to the dead letters here.
    async fn accept<T: DeserializeOwned + Send + Sync + 'static>(
        &self,
        entries: Vec<RawEntry>,
    ) -> Vec<Task<T>> {
        let max = self.settings().max_deliveries;
        let now = now_ms();
        let mut tasks = Vec::with_capacity(entries.len());
        let lapse = self.settings().reclaim_after / 2;
        let claims: Vec<Claim> = {
            let mut owned = self.owned.lock().expect("owned lock");
            entries
                .iter()
                .map(|e| {
                    let claim = Claim::new(self.refreshed_ms.clone(), lapse);
                    owned.insert(e.id.clone(), claim.clone());
                    claim
                })
                .collect()
        };
        for (entry, claim) in entries.into_iter().zip(claims) {
            let Some(env) = Envelope::from_fields(entry.fields) else {
                let env = Envelope {
                    id: entry.id.clone(),
                    p: String::new(),
                    a: entry.deliveries.to_string(),
                    e: "0".into(),
                    err: Some("malformed queue entry: missing its id or payload field".into()),
                };
                let _ = self.dead_letter(&entry.id, &env).await;
                self.disown(&entry.id);
                continue;
            };
            let attempt = env
                .a
                .parse::<u32>()
                .unwrap_or(0)
                .saturating_add(entry.deliveries as u32);
            if attempt > max {
                let mut env = env;
                let last = env
                    .err
                    .take()
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default();
                env.err = Some(format!(
                    "delivered {} times without finishing: its worker crashed or was killed each time{last}",
                    attempt - 1
                ));
                env.a = (attempt - 1).to_string();
                if self.dead_letter(&entry.id, &env).await.unwrap_or(false) {
                    self.count_dead();
                }
                self.disown(&entry.id);
                continue;
            }
            let args: T = match serde_json::from_str(&env.p) {
                Ok(args) => args,
                Err(e) => {
                    let mut env = env;
                    env.err = Some(format!(
                        "payload does not decode as {}: {e}",
                        std::any::type_name::<T>()
                    ));
                    env.a = attempt.to_string();
                    if self.dead_letter(&entry.id, &env).await.unwrap_or(false) {
                        self.count_dead();
                    }
                    self.disown(&entry.id);
                    continue;
                }
            };
            let ready_at_ms = entry_time_ms(&entry.id);
            metrics::histogram!(m::QUEUE_WAIT, &self.labels())
                .record(now.saturating_sub(ready_at_ms) as f64 / 1000.0);
            let delivery = Delivery {
                queue: self.queue.shared_name(),
                entry_id: entry.id,
                job_id: env.id.clone(),
                attempt,
                enqueued_at_ms: env.e.parse().unwrap_or(0),
                ready_at_ms,
                last_error: env.err,
                claim,
            };
            let mut task = TaskBuilder::new(args)
                .task_id(TaskId::from_string(env.id))
                .attempt(attempt.saturating_sub(1) as usize)
                .max_attempts(max as usize)
                .data(delivery)
                .data(RawPayload(Arc::from(env.p)));
            if entry.deliveries >= SUSPECT_DELIVERIES {
                task = task.data(Suspect);
            }
            tasks.push(task.build());
        }
        // Suspects go last, so the rest of the batch starts before they wait for the worker to empty.
        tasks.sort_by_key(is_suspect);
        tasks
    }

    /// Fetches up to `count` jobs: claims stale entries of dead consumers first (when due), then blocks on the
    /// stream. Redis failures are logged, counted and retried with backoff; they never end the worker.
    async fn fetch<T: DeserializeOwned + Send + Sync + 'static>(
        self: Arc<Self>,
        count: usize,
    ) -> Vec<Task<T>> {
        let mut reader = self.reader.lock().await;
        let mut backoff = Backoff::new();
        let interval = self.refresh_interval();
        let block = self
            .settings()
            .block_timeout
            .min(interval)
            .max(Duration::from_millis(10));
        let stream = self.queue.keys().stream.clone();
        loop {
            if self.closing.load(Ordering::Acquire) {
                return Vec::new();
            }
            self.beat();
            let now = now_ms();
            if now.saturating_sub(self.last_reclaim_ms.load(Ordering::Relaxed))
                >= interval.as_millis() as u64
            {
                self.last_reclaim_ms.store(now, Ordering::Relaxed);
                match self.reclaim(count).await {
                    Ok(entries) if !entries.is_empty() => {
                        metrics::counter!(m::QUEUE_RECLAIMED, &self.labels())
                            .increment(entries.len() as u64);
                        tracing::info!(queue = self.queue.name(), consumer = %self.name, count = entries.len(), "Took over stale jobs of a consumer that stopped answering");
                        let tasks = self.accept(entries).await;
                        if !tasks.is_empty() {
                            return tasks;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.redis_error("reclaim", &e);
                        backoff.wait().await;
                        continue;
                    }
                }
            }
            let conn = match reader.connection(&self.reader_id).await {
                Ok(conn) => conn,
                Err(e) => {
                    self.redis_error("connect", &e);
                    backoff.wait().await;
                    continue;
                }
            };
            let opts = StreamReadOptions::default()
                .group(GROUP, &self.name)
                .count(count)
                .block(block.as_millis() as usize);
            let reply: redis::RedisResult<Option<StreamReadReply>> =
                conn.xread_options(&[&stream], &[">"], &opts).await;
            match reply {
                Ok(reply) => {
                    backoff.reset();
                    let entries: Vec<RawEntry> = reply
                        .into_iter()
                        .flat_map(|r| r.keys)
                        .flat_map(|k| k.ids)
                        .map(|id| RawEntry {
                            fields: id
                                .map
                                .iter()
                                .filter_map(|(k, v)| {
                                    String::from_redis_value_ref(v).ok().map(|v| (k.clone(), v))
                                })
                                .collect(),
                            id: id.id,
                            deliveries: 1,
                        })
                        .collect();
                    if !entries.is_empty() {
                        let tasks = self.accept(entries).await;
                        if !tasks.is_empty() {
                            return tasks;
                        }
                    }
                }
                Err(e) if e.code() == Some("NOGROUP") => {
                    tracing::info!(
                        queue = self.queue.name(),
                        "The consumer group is missing (new or restarted Redis); creating it"
                    );
                    if let Err(e) = self.queue.ensure_group().await {
                        tracing::warn!(queue = self.queue.name(), error = %e, "Could not create the consumer group");
                        backoff.wait().await;
                    }
                }
                Err(e) => {
                    if self.closing.load(Ordering::Acquire) {
                        return Vec::new();
                    }
                    self.redis_error("read", &e);
                    reader.conn = None;
                    backoff.wait().await;
                }
            }
        }
    }

    async fn reclaim(&self, count: usize) -> redis::RedisResult<Vec<RawEntry>> {
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
                RawEntry {
                    id,
                    fields,
                    deliveries,
                }
            })
            .collect())
    }

    /// Wakes the reader if it is blocked in `XREADGROUP`, so shutdown need not wait for the block timeout.
    async fn unblock_reader(&self) {
        let id = self.reader_id.load(Ordering::Acquire);
        if id >= 0 {
            let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                .arg("UNBLOCK")
                .arg(id)
                .query_async(&mut self.queue.broker().connection())
                .await;
        }
    }

    async fn release(&self, ids: Vec<String>) -> Result<u64, QueueError> {
        let mut released = 0;
        for chunk in ids.chunks(BATCH) {
            let n: u64 = scripts::RELEASE
                .key(&self.queue.keys().stream)
                .arg(GROUP)
                .arg(&self.name)
                .arg(chunk)
                .invoke_async(&mut self.queue.broker().connection())
                .await?;
            released += n;
        }
        for id in &ids {
            self.disown(id);
        }
        if released > 0 {
            metrics::counter!(m::QUEUE_JOBS, "stage" => self.queue.name().to_owned(), "outcome" => "released")
                .increment(released);
        }
        Ok(released)
    }

    async fn finish(&self) -> Result<u64, QueueError> {
        self.closing.store(true, Ordering::Release);
        self.unblock_reader().await;
        self.flush_acks().await;
        for task in self.tasks.lock().expect("tasks lock").drain(..) {
            task.abort();
        }
        self.owned.lock().expect("owned lock").clear();
        let released = self.queue.release_consumer(&self.name).await?;
        if released > 0 {
            tracing::info!(queue = self.queue.name(), consumer = %self.name, released, "Gave unfinished jobs back to the queue");
        }
        Ok(released)
    }
}

/// An entry as read from Redis, before it is decoded.
struct RawEntry {
    id: String,
    fields: HashMap<String, String>,
    deliveries: u64,
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

/// Exponential backoff for Redis failures: 50 ms doubling to 5 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_millis(50))
    }
    fn reset(&mut self) {
        self.0 = Duration::from_millis(50);
    }
    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
    }
}

/// Writes acknowledgements in batches: whatever finished while the previous batch was in flight goes in the next
/// one (`XACK` with many ids, then `XDEL`), so a busy worker spends a fraction of a Redis call per job.
async fn run_acker(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<AckMsg>) {
    let mut conn = shared.queue.broker().connection();
    let stream = shared.queue.keys().stream.clone();
    let live = shared.queue.keys().live.clone();
    let again = shared.queue.keys().again.clone();
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
        let ids: Vec<&str> = acks.iter().map(|(id, _)| *id).collect();
        if !ids.is_empty() {
            let mut backoff = Backoff::new();
            loop {
                let mut inv = scripts::ACK.prepare_invoke();
                inv.key(&stream)
                    .key(&live)
                    .key(&again)
                    .arg(GROUP)
                    .arg(&shared.name)
                    .arg(now_ms());
                for (id, job) in &acks {
                    inv.arg(*id).arg(*job);
                }
                let res: redis::RedisResult<i64> = inv.invoke_async(&mut conn).await;
                let res = res.map(drop);
                match res {
                    Ok(()) => break,
                    // The group (or the whole stream) is gone after a Redis restart: nothing left to acknowledge.
                    Err(e) if e.code() == Some("NOGROUP") => break,
                    Err(e) => {
                        shared.redis_error("ack", &e);
                        backoff.wait().await;
                    }
                }
            }
            let mut owned = shared.owned.lock().expect("owned lock");
            for id in &ids {
                owned.remove(*id);
            }
        }
        for msg in batch.drain(..) {
            let (AckMsg::Ack(_, _, done) | AckMsg::Flush(done)) = msg;
            let _ = done.send(());
        }
    }
}

/// Keeps the claims of the jobs this consumer holds fresh, so no other consumer takes them over while they run.
async fn run_refresher(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let interval = s.refresh_interval();
        let ids: Vec<String> = s
            .owned
            .lock()
            .expect("owned lock")
            .keys()
            .cloned()
            .collect();
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
                Ok(lost) => {
                    let mut owned = s.owned.lock().expect("owned lock");
                    for id in lost {
                        // Acknowledged since the snapshot: not lost, just done.
                        if let Some(claim) = owned.remove(&id) {
                            claim.lose();
                            tracing::warn!(queue = s.queue.name(), consumer = %s.name, entry_id = %id, "Lost the claim on a running job to another consumer");
                            metrics::counter!(m::QUEUE_CLAIMS_LOST, &s.labels()).increment(1);
                        }
                    }
                }
                Err(e) => {
                    all_refreshed = false;
                    s.redis_error("refresh", &e);
                }
            }
        }
        if all_refreshed {
            s.refreshed_ms.store(started, Ordering::Release);
        } else if s.claims_lapsed() {
            tracing::warn!(queue = s.queue.name(), consumer = %s.name, "Could not refresh the claims for half of reclaim_after: another consumer may take the running jobs over, so they stop before their next paid call");
        }
        s.beat();
        drop(s);
        tokio::time::sleep(interval).await;
    }
}

/// Moves retries that are due from the delayed set into the stream.
async fn run_promoter(shared: std::sync::Weak<Shared>) {
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

/// The apalis backend of one [`Consumer`]: fetches only as many jobs as the worker has free slots.
pub struct StreamBackend<T> {
    shared: Arc<Shared>,
    buffer: VecDeque<Task<T>>,
    fetch: Option<BoxFuture<Vec<Task<T>>>>,
    closing: Option<BoxFuture<()>>,
}

impl<T> std::fmt::Debug for StreamBackend<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamBackend")
            .field("queue", &self.shared.queue.name())
            .field("consumer", &self.shared.name)
            .finish()
    }
}

fn is_suspect<T>(task: &Task<T>) -> bool {
    task.ctx().data().get::<Suspect>().is_some()
}

fn entry_id_of<T>(task: &Task<T>) -> Option<String> {
    task.ctx()
        .data()
        .get::<Delivery>()
        .map(|d| d.entry_id.clone())
}

impl<T: DeserializeOwned + Send + Sync + 'static> Backend for StreamBackend<T> {
    type Task = Task<T>;
    type Error = QueueError;

    fn poll_ready(
        &mut self,
        _cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), QueueError>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Option<Result<Task<T>, QueueError>>> {
        loop {
            if let Some(task) = self.buffer.front() {
                let suspect = is_suspect(task);
                if self.shared.suspect_running.load(Ordering::Acquire)
                    || (suspect && self.shared.running.load(Ordering::Acquire) > 0)
                {
                    // Wait for the suspect to end, or for the worker to empty before a suspect starts.
                    self.shared.waker.register(cx.waker());
                    let busy = self.shared.suspect_running.load(Ordering::Acquire)
                        || (suspect && self.shared.running.load(Ordering::Acquire) > 0);
                    if busy {
                        return Poll::Pending;
                    }
                }
                if suspect {
                    self.shared.suspect_running.store(true, Ordering::Release);
                }
                return Poll::Ready(self.buffer.pop_front().map(Ok));
            }
            if self.shared.suspect_running.load(Ordering::Acquire) {
                self.shared.waker.register(cx.waker());
                if self.shared.suspect_running.load(Ordering::Acquire) {
                    return Poll::Pending;
                }
            }
            if self.shared.closing.load(Ordering::Acquire) {
                return Poll::Ready(None);
            }
            let fetch = self.fetch.get_or_insert_with(|| {
                let free = self
                    .shared
                    .concurrency
                    .saturating_sub(self.shared.running.load(Ordering::Relaxed))
                    .max(1);
                Box::pin(self.shared.clone().fetch::<T>(free))
            });
            match fetch.as_mut().poll(cx) {
                Poll::Ready(tasks) => {
                    self.fetch = None;
                    self.buffer.extend(tasks);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), QueueError>> {
        let closing = self.closing.get_or_insert_with(|| {
            let shared = self.shared.clone();
            let fetch = self.fetch.take();
            let mut unstarted: Vec<String> = self.buffer.drain(..).filter_map(|t| entry_id_of(&t)).collect();
            Box::pin(async move {
                shared.closing.store(true, Ordering::Release);
                if let Some(fetch) = fetch {
                    shared.unblock_reader().await;
                    unstarted.extend(fetch.await.iter().filter_map(entry_id_of));
                }
                if let Err(e) = shared.release(unstarted).await {
                    tracing::warn!(queue = shared.queue.name(), error = %e, "Could not give unstarted jobs back; they will be reclaimed");
                }
                shared.flush_acks().await;
            })
        });
        closing.as_mut().poll(cx).map(|()| Ok(()))
    }
}

// The backend is never pinned structurally (its futures are boxed), so it is Unpin whatever the job type.
impl<T> Unpin for StreamBackend<T> {}

impl<T> Drop for StreamBackend<T> {
    fn drop(&mut self) {
        // Jobs fetched but never started stop being refreshed, so any consumer can take them over.
        for task in self.buffer.drain(..) {
            if let Some(id) = entry_id_of(&task) {
                self.shared.disown(&id);
            }
        }
    }
}

impl<T: DeserializeOwned + Send + Sync + 'static> BackendConfig for StreamBackend<T> {
    type Args = T;
    type Id = String;
    type Kind = Ephemeral;
    type Config = ();
    type Layer = AckLayer;

    fn config(&self) -> &Self::Config {
        &()
    }

    fn middleware(&mut self, _worker: &mut WorkerContext) -> AckLayer {
        AckLayer::new(self.shared.clone())
    }
}
