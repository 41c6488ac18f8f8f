//! The worker runtime: one apalis worker per stage in one process, each fed by its own queue consumer, with
//! `/healthz` and `/metrics`, restarts of a stage whose worker failed, and a graceful drain on shutdown.
//!
//! ```no_run
//! # async fn example(settings: upload_pipeline::Settings) -> Result<(), Box<dyn std::error::Error>> {
//! use upload_pipeline::{queue::{Delivery, JobError}, runtime::Runtime};
//!
//! #[derive(serde::Deserialize)]
//! struct Resize { image: String }
//!
//! Runtime::connect(settings.into())
//!     .await?
//!     .stage("resize", 8, |job: Resize, delivery: Delivery| async move {
//!         tracing::info!(attempt = delivery.attempt, "resizing {}", job.image);
//!         Ok::<(), JobError>(())
//!     })?
//!     .run(None, upload_pipeline::shutdown::signal())
//!     .await?;
//! # Ok(()) }
//! ```

use std::{
    collections::BTreeMap,
    future::Future,
    marker::PhantomData,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use apalis::layers::WorkerBuilderExt;
use apalis_core::{monitor::Monitor, task::Task, worker::builder::WorkerBuilder};
use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::{
    gauges, metrics as m,
    queue::{Broker, ConsumerHandle, Delivery, JobError, QueueError, QueueHandle},
    settings::Settings,
};

/// Why the runtime could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Redis could not be reached, or a queue is misnamed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The health and metrics address could not be bound.
    #[error("failed to listen on {addr} for /healthz and /metrics: {source}")]
    #[allow(missing_docs)]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The shutdown signal could not be installed.
    #[error("failed to wait for the shutdown signal: {0}")]
    Signal(std::io::Error),
    /// No stage was registered.
    #[error("no stage to run: register at least one")]
    NoStages,
    /// A document stage was asked for without the database and providers it needs.
    #[error("stage {0} needs the document pipeline (database and embedder)")]
    MissingPipeline(&'static str),
}

/// A worker process under construction: add stages, then [`Runtime::run`].
pub struct Runtime {
    settings: Arc<Settings>,
    broker: Broker,
    monitor: Monitor,
    state: Arc<RuntimeState>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("identity", &self.state.identity)
            .finish_non_exhaustive()
    }
}

struct StageState {
    queue: QueueHandle,
    slots: usize,
    current: Option<ConsumerHandle>,
    all: Vec<ConsumerHandle>,
}

struct RuntimeState {
    identity: String,
    heartbeat_limit: Duration,
    stages: Mutex<BTreeMap<String, StageState>>,
}

impl RuntimeState {
    /// Records a new consumer of `stage`; a restarted stage's old consumer gives its jobs back at once.
    fn attach(&self, stage: &str, consumer: ConsumerHandle, restarts: usize) {
        let mut stages = self.stages.lock().expect("stages lock");
        let Some(st) = stages.get_mut(stage) else {
            return;
        };
        if restarts > 0 {
            metrics::counter!(m::WORKER_RESTARTS, "stage" => stage.to_owned()).increment(1);
            if let Some(old) = st.current.take() {
                tokio::spawn(async move {
                    if let Err(e) = old.finish().await {
                        tracing::warn!(consumer = old.name(), error = %e, "Could not give the failed worker's jobs back; they will be reclaimed");
                    }
                });
            }
        }
        st.all.push(consumer.clone());
        st.current = Some(consumer);
    }

    fn consumers(&self) -> Vec<ConsumerHandle> {
        self.stages
            .lock()
            .expect("stages lock")
            .values()
            .flat_map(|s| s.all.iter().cloned())
            .collect()
    }
}

/// A unique, readable name for this process: `<host>-<pid>-<random>`.
fn process_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

impl Runtime {
    /// Connects to Redis with the given settings.
    pub async fn connect(settings: Arc<Settings>) -> Result<Self, RuntimeError> {
        let broker = Broker::connect(settings.redis_url.expose(), settings.queue.clone()).await?;
        let heartbeat_limit = settings.queue.reclaim_after.max(Duration::from_secs(10));
        Ok(Self {
            broker,
            monitor: Monitor::new(),
            state: Arc::new(RuntimeState {
                identity: process_identity(),
                heartbeat_limit,
                stages: Mutex::default(),
            }),
            settings,
        })
    }

    /// The settings the runtime was made with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The runtime's Redis connection.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// This process's name, the prefix of its consumer names.
    pub fn identity(&self) -> &str {
        &self.state.identity
    }

    /// Adds a stage: a worker that runs `handler` on jobs of queue `queue`, up to `concurrency` at once.
    pub fn stage<T, H, Fut>(
        mut self,
        queue: &str,
        concurrency: usize,
        handler: H,
    ) -> Result<Self, RuntimeError>
    where
        T: DeserializeOwned + Send + Sync + 'static,
        H: Fn(T, Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), JobError>> + Send + 'static,
    {
        let typed = self.broker.queue::<T>(queue)?;
        let concurrency = concurrency.max(1);
        self.state.stages.lock().expect("stages lock").insert(
            queue.to_owned(),
            StageState {
                queue: (*typed).clone(),
                slots: concurrency,
                current: None,
                all: Vec::new(),
            },
        );
        let handler = Arc::new(handler);
        let state = self.state.clone();
        let stage = queue.to_owned();
        self.monitor = self.monitor.register(move |restarts| {
            let name = format!("{}-{stage}-r{restarts}", state.identity);
            let consumer = typed.consumer(name.clone(), concurrency);
            state.attach(&stage, consumer.handle(), restarts);
            WorkerBuilder::new(name)
                .backend(consumer.backend())
                .concurrency(concurrency)
                .build(HandlerService {
                    handler: handler.clone(),
                    _job: PhantomData,
                })
        });
        Ok(self)
    }

    /// Runs every stage until `shutdown` resolves, then drains: no new jobs are fetched, running ones get
    /// `shutdown_grace` to finish, and whatever is unfinished after that is given back to the queue at once.
    /// Serves `/healthz` and `/metrics` (rendered by `metrics`, when given) on `worker.metrics_addr`.
    pub async fn run<S>(
        self,
        metrics: Option<PrometheusHandle>,
        shutdown: S,
    ) -> Result<(), RuntimeError>
    where
        S: Future<Output = std::io::Result<()>> + Send,
    {
        let queues: Vec<QueueHandle> = self
            .state
            .stages
            .lock()
            .expect("stages lock")
            .values()
            .map(|s| s.queue.clone())
            .collect();
        if queues.is_empty() {
            return Err(RuntimeError::NoStages);
        }
        for queue in &queues {
            queue.ensure_group().await?;
        }
        let addr = self.settings.worker.metrics_addr;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RuntimeError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| RuntimeError::Bind { addr, source })?;
        let app = Router::new()
            .route("/healthz", get(healthz))
            .route("/metrics", get(render_metrics))
            .with_state(Http {
                state: self.state.clone(),
                metrics,
            });
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        tracing::info!(
            identity = %self.state.identity, stages = ?queues.iter().map(|q| q.name()).collect::<Vec<_>>(), %local,
            "Worker started; serving /healthz and /metrics"
        );

        let grace = self.settings.worker.shutdown_grace;
        let result = self
            .monitor
            .shutdown_timeout(grace)
            .should_restart(|ctx, err| {
                tracing::error!(worker = ctx.name(), error = %err, "A stage worker failed; restarting it");
                true
            })
            .run_with_signal(shutdown)
            .await;

        let mut released = 0;
        for consumer in self.state.consumers() {
            match consumer.finish().await {
                Ok(n) => released += n,
                Err(e) => {
                    tracing::warn!(consumer = consumer.name(), error = %e, "Could not give unfinished jobs back; they will be reclaimed")
                }
            }
        }
        server.abort();
        tracing::info!(released, "Worker stopped");
        match result {
            Ok(()) => Ok(()),
            Err(apalis_core::monitor::MonitorError::ShutdownSignal(e)) => {
                Err(RuntimeError::Signal(e))
            }
            Err(e) => {
                tracing::error!(error = %e, "Stage workers ended with errors");
                Ok(())
            }
        }
    }
}

#[derive(Clone)]
struct Http {
    state: Arc<RuntimeState>,
    metrics: Option<PrometheusHandle>,
}

/// Healthy while every stage's worker loop went round within the heartbeat limit; never asks Redis.
async fn healthz(State(http): State<Http>) -> impl IntoResponse {
    let limit = http.state.heartbeat_limit;
    let stages: BTreeMap<String, serde_json::Value> = http
        .state
        .stages
        .lock()
        .expect("stages lock")
        .iter()
        .map(|(name, st)| {
            let age = st.current.as_ref().map(|c| c.heartbeat_age());
            let ok = age.is_some_and(|a| a <= limit);
            let status = serde_json::json!({
                "ok": ok,
                "heartbeat_age_seconds": age.map(|a| a.as_secs_f64()),
                "busy": st.current.as_ref().map_or(0, |c| c.busy()),
                "slots": st.slots,
            });
            (name.clone(), status)
        })
        .collect();
    let ok = stages.values().all(|s| s["ok"] == true);
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(serde_json::json!({ "status": if ok { "ok" } else { "stalled" }, "stages": stages })),
    )
}

/// Reads every stage queue's state from Redis, refreshes the gauges and renders the registry.
async fn render_metrics(State(http): State<Http>) -> impl IntoResponse {
    let stages: Vec<(String, QueueHandle, usize, Option<ConsumerHandle>)> = http
        .state
        .stages
        .lock()
        .expect("stages lock")
        .iter()
        .map(|(n, s)| (n.clone(), s.queue.clone(), s.slots, s.current.clone()))
        .collect();
    for (name, queue, slots, current) in stages {
        metrics::gauge!(m::WORKER_SLOTS, "stage" => name.clone()).set(slots as f64);
        if let Some(c) = current {
            metrics::gauge!(m::WORKER_BUSY, "stage" => name.clone()).set(c.busy() as f64);
            metrics::gauge!(m::WORKER_HEARTBEAT_AGE, "stage" => name.clone())
                .set(c.heartbeat_age().as_secs_f64());
        }
        gauges::refresh_queue_gauges(&queue).await;
    }
    gauges::collect_process();
    match http.metrics {
        Some(handle) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "metrics are not enabled in this process\n",
        )
            .into_response(),
    }
}

/// Adapts a job handler to the tower service apalis runs, inside a tracing span per job.
struct HandlerService<H, T> {
    handler: Arc<H>,
    _job: PhantomData<fn(T)>,
}

impl<H, T, Fut> tower::Service<Task<T>> for HandlerService<H, T>
where
    H: Fn(T, Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), JobError>> + Send + 'static,
    T: Send + 'static,
{
    type Response = ();
    type Error = JobError;
    type Future = Pin<Box<dyn Future<Output = Result<(), JobError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), JobError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, task: Task<T>) -> Self::Future {
        let Some(delivery) = task.ctx().data().get::<Delivery>().cloned() else {
            return Box::pin(async {
                Err(JobError::permanent(
                    "a job without delivery information reached a stage handler",
                ))
            });
        };
        let span = tracing::info_span!("job", queue = %delivery.queue, job.id = %delivery.job_id, attempt = delivery.attempt);
        let fut = (self.handler)(task.args, delivery);
        Box::pin(fut.instrument(span))
    }
}
