//! One consumer of a queue: the [`Consumer`] and [`ConsumerHandle`] callers hold, and the state they share with
//! its backend, its middleware and its background tasks, grouped by concern.

use std::{
    collections::HashMap,
    marker::PhantomData,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::Context,
    time::Duration,
};

use futures::task::AtomicWaker;
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    BATCH, Claim, GROUP, QueueError, QueueHandle,
    backend::StreamBackend,
    fetch::Fetcher,
    now_ms, scripts,
    tasks::{self, AckMsg},
};
use crate::metrics as m;

/// One consumer of a queue: a name in the consumer group, the jobs it holds, and its background tasks.
///
/// Create one per worker with [`Queue::consumer`](super::Queue::consumer) inside a Tokio runtime, hand
/// [`Consumer::backend`] to apalis's `WorkerBuilder`, and call [`ConsumerHandle::finish`] (from
/// [`Consumer::handle`]) after the worker stopped.
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

impl<T: DeserializeOwned + Send + Sync + 'static> Consumer<T> {
    pub(crate) fn new(queue: QueueHandle, name: String, concurrency: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            fetcher: Fetcher::new(queue.broker().client.clone()),
            queue,
            name,
            slots: Slots::new(concurrency),
            claims: Claims::new(),
            life: Lifecycle::new(tx),
        });
        let handles = tasks::spawn(&shared, rx);
        *shared.life.tasks.lock().expect("tasks lock") = handles;
        Self {
            shared,
            _job: PhantomData,
        }
    }

    /// The apalis backend that delivers this consumer's jobs.
    pub fn backend(&self) -> StreamBackend<T> {
        StreamBackend::new(self.shared.clone())
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
        self.0.slots.running.load(Ordering::Relaxed)
    }

    /// How long ago the consumer's fetch loop or claim refresher last went round.
    pub fn heartbeat_age(&self) -> Duration {
        let beat = self.0.life.last_beat_ms.load(Ordering::Relaxed);
        Duration::from_millis(now_ms().saturating_sub(beat))
    }

    /// Ends the consumer after its worker stopped (drained or timed out): flushes pending acknowledgements,
    /// stops its background tasks and gives every job it still holds back to the queue at once.
    /// Returns how many jobs it gave back.
    pub async fn finish(&self) -> Result<u64, QueueError> {
        self.0.finish().await
    }
}

/// What a consumer's backend, middleware ([`AckLayer`](super::AckLayer)) and background tasks share.
pub(crate) struct Shared {
    pub(crate) queue: QueueHandle,
    /// The consumer's name in the group.
    pub(crate) name: String,
    /// The worker's slots: how many jobs run, and the gate that lets a suspect run alone.
    pub(super) slots: Slots,
    /// The claims this consumer holds and keeps fresh.
    pub(super) claims: Claims,
    /// The fetch loop's blocking reader.
    pub(super) fetcher: Fetcher,
    /// Shutdown, heartbeat and the background tasks.
    pub(super) life: Lifecycle,
}

/// The worker's slots: how many jobs run, and the gate that lets a suspect job run alone.
pub(super) struct Slots {
    /// How many jobs the worker runs at once.
    concurrency: usize,
    /// Jobs whose handler is running.
    running: AtomicUsize,
    /// A suspect job is running: nothing else starts until it ends.
    suspect_running: AtomicBool,
    /// Wakes the backend when a handler ends (a suspect may start, or a suspect's run ended).
    waker: AtomicWaker,
}

impl Slots {
    fn new(concurrency: usize) -> Self {
        Self {
            concurrency,
            running: AtomicUsize::new(0),
            suspect_running: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    /// Free slots, at least one: how many jobs the next fetch asks for.
    pub(super) fn free(&self) -> usize {
        self.concurrency
            .saturating_sub(self.running.load(Ordering::Relaxed))
            .max(1)
    }

    /// Whether a job (a `suspect` one or not) must wait: a suspect runs, or a suspect would not run alone.
    fn blocked(&self, suspect: bool) -> bool {
        self.suspect_running.load(Ordering::Acquire)
            || (suspect && self.running.load(Ordering::Acquire) > 0)
    }

    /// Whether a job must wait (see [`Slots::blocked`]); if so, `cx` is woken when a handler ends. Checks again
    /// after registering, so a handler that ended in between is not missed.
    pub(super) fn must_wait(&self, cx: &Context<'_>, suspect: bool) -> bool {
        if !self.blocked(suspect) {
            return false;
        }
        self.waker.register(cx.waker());
        self.blocked(suspect)
    }

    /// Closes the gate behind a suspect that starts now.
    pub(super) fn suspect_started(&self) {
        self.suspect_running.store(true, Ordering::Release);
    }
}

/// The claims a consumer holds (buffered, running or waiting for their ack) and keeps fresh.
pub(super) struct Claims {
    /// Entry ids this consumer holds, with their claims.
    owned: Mutex<HashMap<String, Claim>>,
    /// When the refresher last refreshed every claim (or had none to refresh), ms since the epoch.
    refreshed_ms: Arc<AtomicU64>,
}

impl Claims {
    fn new() -> Self {
        Self {
            owned: Mutex::new(HashMap::new()),
            refreshed_ms: Arc::new(AtomicU64::new(now_ms())),
        }
    }

    /// The held entries, locked.
    pub(super) fn owned(&self) -> MutexGuard<'_, HashMap<String, Claim>> {
        self.owned.lock().expect("owned lock")
    }

    /// Takes claims on `entry_ids`, which lapse after `lapse` without a refresh.
    pub(super) fn take<'a>(
        &self,
        entry_ids: impl Iterator<Item = &'a str>,
        lapse: Duration,
    ) -> Vec<Claim> {
        let mut owned = self.owned();
        entry_ids
            .map(|id| {
                let claim = Claim::new(self.refreshed_ms.clone(), lapse);
                owned.insert(id.to_owned(), claim.clone());
                claim
            })
            .collect()
    }

    /// Records a complete refresh that started at `started_ms`.
    pub(super) fn refreshed(&self, started_ms: u64) {
        self.refreshed_ms.store(started_ms, Ordering::Release);
    }

    /// Whether the claims went unrefreshed for `lapse`, long enough for another consumer to take them over.
    pub(super) fn lapsed(&self, lapse: Duration) -> bool {
        now_ms().saturating_sub(self.refreshed_ms.load(Ordering::Acquire))
            >= lapse.as_millis() as u64
    }
}

/// Shutdown, heartbeat and the background tasks of a consumer.
pub(super) struct Lifecycle {
    /// Set when the worker stops: the fetch loop returns and the backend ends its stream.
    closing: AtomicBool,
    /// Last time (ms since the epoch) the fetch loop or the refresher went round: the worker loop's heartbeat.
    last_beat_ms: AtomicU64,
    /// Hands finished jobs to the acker task.
    pub(super) acker: mpsc::UnboundedSender<AckMsg>,
    /// The acker, refresher and promoter, aborted by [`ConsumerHandle::finish`].
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Lifecycle {
    fn new(acker: mpsc::UnboundedSender<AckMsg>) -> Self {
        Self {
            closing: AtomicBool::new(false),
            last_beat_ms: AtomicU64::new(now_ms()),
            acker,
            tasks: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    pub(super) fn close(&self) {
        self.closing.store(true, Ordering::Release);
    }
}

impl Shared {
    pub(super) fn settings(&self) -> &crate::settings::QueueSettings {
        self.queue.broker().settings()
    }

    pub(super) fn beat(&self) {
        self.life.last_beat_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub(super) fn labels(&self) -> [(&'static str, String); 1] {
        [("stage", self.queue.name().to_owned())]
    }

    pub(crate) fn redis_error(&self, op: &'static str, err: &redis::RedisError) {
        tracing::warn!(queue = self.queue.name(), consumer = %self.name, op, error = %err, "Redis call failed; retrying");
        metrics::counter!(m::QUEUE_REDIS_ERRORS, "stage" => self.queue.name().to_owned(), "op" => op).increment(1);
    }

    /// How often claims are refreshed and stale ones looked for.
    pub(super) fn refresh_interval(&self) -> Duration {
        (self.settings().reclaim_after / 4).max(Duration::from_millis(50))
    }

    /// Whether the claims went unrefreshed long enough for another consumer to take them over.
    pub(super) fn claims_lapsed(&self) -> bool {
        self.claims.lapsed(self.settings().reclaim_after / 2)
    }

    pub(crate) fn disown(&self, entry_id: &str) {
        self.claims.owned().remove(entry_id);
    }

    pub(crate) fn running_started(&self) {
        self.slots.running.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn running_ended(&self, suspect: bool) {
        self.slots.running.fetch_sub(1, Ordering::AcqRel);
        if suspect {
            self.slots.suspect_running.store(false, Ordering::Release);
        }
        self.slots.waker.wake();
    }

    /// Gives entries this consumer fetched but never started back to the queue at once.
    pub(super) async fn release(&self, ids: Vec<String>) -> Result<u64, QueueError> {
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
        self.life.close();
        self.unblock_reader().await;
        self.flush_acks().await;
        for task in self.life.tasks.lock().expect("tasks lock").drain(..) {
            task.abort();
        }
        self.claims.owned().clear();
        let released = self.queue.release_consumer(&self.name).await?;
        if released > 0 {
            tracing::info!(queue = self.queue.name(), consumer = %self.name, released, "Gave unfinished jobs back to the queue");
        }
        Ok(released)
    }
}
