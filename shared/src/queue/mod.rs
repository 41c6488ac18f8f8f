//! A durable job queue on Redis Streams, plugged into apalis as a [`Backend`](apalis_core::backend::Backend).
//!
//! One queue is four Redis keys under `{prefix}:{<name>}:` (the braces keep a queue's keys in one cluster slot):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `stream` | stream + consumer group `workers` | jobs waiting (after the group's last-delivered id) and jobs in flight (its pending entries list) |
//! | `delayed` | sorted set | envelopes of failed attempts, scored by the time (Redis clock, ms) they are due again |
//! | `dead` | stream, capped | dead letters: payload, attempts and last error |
//! | `live` | set | the ids of the jobs that are waiting, in flight or delayed |
//! | `again` | hash | payloads of live jobs that must run once more when their live copy ends ([`Queue::push_again`]) |
//!
//! Delivery is at-least-once:
//! - workers read with `XREADGROUP ... BLOCK`, so an idle worker wakes the moment a job is pushed;
//! - while a job runs its worker keeps its claim fresh (`XCLAIM ... JUSTID`, which does not count a delivery), so a
//!   job that runs for ten times `reclaim_after` is never handed to a second worker;
//! - a killed worker's claims go stale; any replica takes them over with `XAUTOCLAIM` after `reclaim_after / 2` of
//!   idleness, checking every `reclaim_after / 4`, so the job runs again within `reclaim_after`;
//! - the acknowledgement (`XACK` + `XDEL`, batched) happens after the handler returns, so acknowledged entries leave
//!   Redis at once and its memory stays bounded;
//! - every run counts as an attempt (`a` in the envelope plus the stream's delivery count), so a job that keeps
//!   crashing its process is dead-lettered after `max_deliveries` like one that keeps failing;
//! - a push is deduplicated by job id in the same atomic step as the `XADD`: a job whose id is still waiting, in
//!   flight or delayed (`live`) is not added again, so re-pushing (the reconciler, a redelivered stage, a retry
//!   request) never duplicates live work. The id leaves `live` when its job is acknowledged or dead-lettered;
//! - a handler can tell when its claim was taken over ([`Delivery::claim_lost`]), so it stops before it calls a
//!   paid provider again.
//!
//! Failed attempts go to the `delayed` set with exponential backoff and jitter (or the delay the handler asked
//! for), and any worker's promoter moves them back into the stream when due. Permanent errors, payloads that do
//! not decode and jobs out of attempts go to the dead letters, which can be listed, replayed and purged.

mod ack;
mod backend;
mod error;
mod scripts;

use std::{
    collections::HashMap,
    marker::PhantomData,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::aio::ConnectionManager;
use serde::{Serialize, de::DeserializeOwned};

pub use ack::{AckLayer, AckService};
pub use backend::{Consumer, ConsumerHandle, StreamBackend};
pub use error::{JobError, QueueError};

use crate::settings::QueueSettings;

/// The consumer group every worker of a queue joins.
pub const GROUP: &str = "workers";

/// How many entries one script call or pipeline handles at most, so no Redis call grows with the backlog.
const BATCH: usize = 1000;

/// What a delivered job carries besides its payload; handlers can read it with `Data<Delivery>`.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Name of the queue the job came from.
    pub queue: Arc<str>,
    /// The stream entry id of this delivery (changes when the job is retried).
    pub entry_id: String,
    /// The job id, stable across retries.
    pub job_id: String,
    /// This attempt's number, from 1.
    pub attempt: u32,
    /// When the job was first pushed, in ms since the Unix epoch.
    pub enqueued_at_ms: u64,
    /// When this delivery became runnable (entry id time), in ms since the Unix epoch.
    pub ready_at_ms: u64,
    /// The error of the previous attempt, if there was one.
    pub last_error: Option<String>,
    /// This consumer's claim on the job, watched while the handler runs.
    pub claim: Claim,
}

impl Delivery {
    /// Whether another consumer may have taken this job over: the claim was found lost, or the consumer could not
    /// refresh it for half of `reclaim_after` (after which any replica may reclaim it). A handler checks this
    /// before each paid call and stops (its job is retried) instead of duplicating the other consumer's work.
    pub fn claim_lost(&self) -> bool {
        self.claim.is_lost()
    }
}

tokio::task_local! {
    /// The claim of the job the current task runs for (set around every handler by the backend).
    static CLAIM: Claim;
}

/// Runs `fut` with `claim` as the current task's claim (see [`current_claim_lost`]).
pub(crate) async fn with_claim<F: std::future::Future>(claim: Claim, fut: F) -> F::Output {
    CLAIM.scope(claim, fut).await
}

/// Whether the job the current task runs for was taken over by another consumer ([`Delivery::claim_lost`]);
/// `false` outside a job. Provider clients check it before each paid request of a call that makes several.
pub fn current_claim_lost() -> bool {
    CLAIM.try_with(Claim::is_lost).unwrap_or(false)
}

/// A consumer's claim on one delivered job, shared between the handler and the consumer's refresher.
#[derive(Clone)]
pub struct Claim(Arc<ClaimState>);

struct ClaimState {
    lost: std::sync::atomic::AtomicBool,
    /// When this consumer took the job (read or reclaimed it), ms since the epoch.
    taken_ms: u64,
    /// When the consumer last refreshed its claims successfully, ms since the epoch (shared by its claims).
    refreshed_ms: Arc<std::sync::atomic::AtomicU64>,
    /// How long without a refresh before another consumer may reclaim the job, in ms.
    lapse_ms: u64,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl Claim {
    pub(crate) fn new(refreshed_ms: Arc<std::sync::atomic::AtomicU64>, lapse: Duration) -> Self {
        Self(Arc::new(ClaimState {
            lost: std::sync::atomic::AtomicBool::new(false),
            taken_ms: now_ms(),
            refreshed_ms,
            lapse_ms: lapse.as_millis() as u64,
        }))
    }

    /// A claim nobody refreshes or takes over (for jobs run outside a consumer, in tests and tools).
    pub fn detached() -> Self {
        Self::new(
            Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX)),
            Duration::ZERO,
        )
    }

    /// Marks the claim lost (the refresher found another owner).
    pub(crate) fn lose(&self) {
        self.0
            .lost
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// See [`Delivery::claim_lost`].
    pub fn is_lost(&self) -> bool {
        if self.0.lost.load(std::sync::atomic::Ordering::Acquire) {
            return true;
        }
        let refreshed = self
            .0
            .refreshed_ms
            .load(std::sync::atomic::Ordering::Acquire);
        // Fresh since the later of its taking and the consumer's last complete refresh.
        refreshed != u64::MAX
            && now_ms().saturating_sub(refreshed.max(self.0.taken_ms)) >= self.0.lapse_ms
    }
}

/// A job as stored in the stream and in the delayed set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Envelope {
    /// Stable job id.
    pub id: String,
    /// JSON payload.
    pub p: String,
    /// Attempts used before this entry.
    pub a: String,
    /// First enqueue time, ms since the epoch.
    pub e: String,
    /// Error of the last failed attempt.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub err: Option<String>,
}

impl Envelope {
    fn new(id: String, payload: String) -> Self {
        Self {
            id,
            p: payload,
            a: "0".into(),
            e: now_ms().to_string(),
            err: None,
        }
    }

    fn fields(&self) -> Vec<(&'static str, &str)> {
        let mut f = vec![
            ("id", self.id.as_str()),
            ("p", self.p.as_str()),
            ("a", self.a.as_str()),
            ("e", self.e.as_str()),
        ];
        if let Some(err) = &self.err {
            f.push(("err", err.as_str()));
        }
        f
    }

    fn from_fields(mut map: HashMap<String, String>) -> Option<Self> {
        Some(Self {
            id: map.remove("id")?,
            p: map.remove("p")?,
            a: map.remove("a").unwrap_or_else(|| "0".into()),
            e: map.remove("e").unwrap_or_else(|| "0".into()),
            err: map.remove("err"),
        })
    }
}

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
    fn new(prefix: &str, name: &str) -> Self {
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

/// A connection to the Redis that carries the queues, shared by every queue of a process.
#[derive(Clone)]
pub struct Broker {
    client: redis::Client,
    conn: ConnectionManager,
    settings: Arc<QueueSettings>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("prefix", &self.settings.key_prefix)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Connects to Redis; the connection reconnects by itself after a Redis restart.
    pub async fn connect(redis_url: &str, settings: QueueSettings) -> Result<Self, QueueError> {
        let client = redis::Client::open(redis_url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(3);
        let conn = client.get_connection_manager_with_config(config).await?;
        Ok(Self {
            client,
            conn,
            settings: Arc::new(settings),
        })
    }

    /// The queue settings this broker was made with.
    pub fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    /// A shared Redis connection, for callers that keep state of their own next to the queues.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The typed queue `name` (lowercase letters, digits, `-` and `_`).
    pub fn queue<T>(&self, name: &str) -> Result<Queue<T>, QueueError> {
        Ok(Queue {
            handle: self.handle(name)?,
            _job: PhantomData,
        })
    }

    /// The queue `name` without a job type: state and dead letters only.
    pub fn handle(&self, name: &str) -> Result<QueueHandle, QueueError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !valid {
            return Err(QueueError::InvalidName(name.to_owned()));
        }
        Ok(QueueHandle {
            inner: Arc::new(HandleInner {
                name: Arc::from(name),
                keys: Keys::new(&self.settings.key_prefix, name),
                broker: self.clone(),
            }),
        })
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

impl QueueHandle {
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

    fn conn(&self) -> ConnectionManager {
        self.inner.broker.conn.clone()
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
    async fn push_jobs(
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

    /// Reads the queue's state.
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        let k = &self.inner.keys;
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

    /// Lists up to `limit` dead letters, newest first.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(&self.inner.keys.dead)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut self.conn())
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|e| {
                let field = |name: &str| e.get::<String>(name).unwrap_or_default();
                DeadLetter {
                    died_at_ms: entry_time_ms(&e.id),
                    job_id: field("id"),
                    payload: field("p"),
                    attempts: field("a").parse().unwrap_or(0),
                    error: field("err"),
                    entry_id: e.id,
                }
            })
            .collect())
    }

    /// Puts dead letters back on the queue with a fresh attempt count: the given entry ids, or all of them when
    /// `ids` is empty. Returns how many were moved.
    pub async fn replay_dead(&self, ids: &[String]) -> Result<u64, QueueError> {
        let k = &self.inner.keys;
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
        let dead = &self.inner.keys.dead;
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

/// A typed queue: pushes jobs of type `T` and builds the apalis backend that delivers them.
pub struct Queue<T> {
    handle: QueueHandle,
    _job: PhantomData<fn() -> T>,
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Self {
            handle: self.handle.clone(),
            _job: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.handle.name())
            .finish()
    }
}

impl<T> std::ops::Deref for Queue<T> {
    type Target = QueueHandle;
    fn deref(&self) -> &QueueHandle {
        &self.handle
    }
}

impl<T: Serialize> Queue<T> {
    /// Pushes one job and returns its id.
    pub async fn push(&self, job: &T) -> Result<String, QueueError> {
        let id = new_job_id();
        self.push_with_id(&id, job).await?;
        Ok(id)
    }

    /// Pushes one job under a job id of the caller's (for example a document id and stage). Returns `false`
    /// when a job of that id was already waiting, in flight or delayed: it was not pushed twice.
    pub async fn push_with_id(&self, id: &str, job: &T) -> Result<bool, QueueError> {
        let payload = serde_json::to_string(job).map_err(QueueError::Encode)?;
        let added = self
            .handle
            .push_jobs(&[(id.to_owned(), payload)], false)
            .await?;
        Ok(!added.is_empty())
    }

    /// Pushes jobs that must run after whatever copy of them is live: a job id that is not live is pushed; one
    /// that is (a copy about to end, which may decide to do nothing) is marked to run once more, with fresh
    /// attempts, when that copy is acknowledged or dead-lettered. For work the caller has just made necessary,
    /// such as a retry of a failed document. Returns the ids that were added at once.
    pub async fn push_again<'a, I>(&self, jobs: I) -> Result<Vec<String>, QueueError>
    where
        I: IntoIterator<Item = (&'a str, &'a T)>,
        T: 'a,
    {
        let jobs = encode_jobs(jobs)?;
        self.handle.push_jobs(&jobs, true).await
    }

    /// Pushes many jobs under job ids of the caller's, in batches, each at most once (see
    /// [`Queue::push_with_id`]). Returns the ids that were added.
    pub async fn push_batch<'a, I>(&self, jobs: I) -> Result<Vec<String>, QueueError>
    where
        I: IntoIterator<Item = (&'a str, &'a T)>,
        T: 'a,
    {
        let jobs = encode_jobs(jobs)?;
        self.handle.push_jobs(&jobs, false).await
    }

    /// Pushes many jobs under new ids, in batches; returns their ids in order.
    pub async fn push_many<'a, I>(&self, jobs: I) -> Result<Vec<String>, QueueError>
    where
        I: IntoIterator<Item = &'a T>,
        T: 'a,
    {
        let jobs = jobs
            .into_iter()
            .map(|job| {
                Ok((
                    new_job_id(),
                    serde_json::to_string(job).map_err(QueueError::Encode)?,
                ))
            })
            .collect::<Result<Vec<_>, QueueError>>()?;
        self.handle.push_jobs(&jobs, false).await?;
        Ok(jobs.into_iter().map(|(id, _)| id).collect())
    }

    /// Pushes a job that becomes runnable after `delay`.
    pub async fn push_delayed(&self, job: &T, delay: Duration) -> Result<String, QueueError> {
        let id = new_job_id();
        let env = Envelope::new(
            id.clone(),
            serde_json::to_string(job).map_err(QueueError::Encode)?,
        );
        let member = serde_json::to_string(&env).map_err(QueueError::Encode)?;
        let _: i64 = scripts::PUSH_DELAYED
            .key(&self.handle.keys().delayed)
            .key(&self.handle.keys().live)
            .arg(&id)
            .arg(delay.as_millis() as u64)
            .arg(member)
            .invoke_async(&mut self.handle.conn())
            .await?;
        Ok(id)
    }
}

impl<T: DeserializeOwned + Send + Sync + 'static> Queue<T> {
    /// Registers a new consumer of this queue with room for `concurrency` jobs at once; its
    /// [`Consumer::backend`] plugs into apalis's `WorkerBuilder`.
    pub fn consumer(&self, name: impl Into<String>, concurrency: usize) -> Consumer<T> {
        Consumer::new(self.handle.clone(), name.into(), concurrency.max(1))
    }
}

/// (job id, JSON payload) pairs.
fn encode_jobs<'a, T: Serialize + 'a>(
    jobs: impl IntoIterator<Item = (&'a str, &'a T)>,
) -> Result<Vec<(String, String)>, QueueError> {
    jobs.into_iter()
        .map(|(id, job)| {
            Ok((
                id.to_owned(),
                serde_json::to_string(job).map_err(QueueError::Encode)?,
            ))
        })
        .collect()
}

/// A job id: time-ordered (ms since the epoch) with 64 random bits, so ids sort by creation.
pub fn new_job_id() -> String {
    format!("{:012x}{:016x}", now_ms(), rand::random::<u64>())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The time part of a stream entry id (`<ms>-<seq>`).
pub(crate) fn entry_time_ms(id: &str) -> u64 {
    id.split('-')
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0)
}
