//! The backend's middleware: it sees every job's final result (it is installed outermost) and records it in
//! Redis only after the handler returned, so a job is acknowledged after its work is committed.

use std::{
    any::Any,
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use apalis_core::{error::BoxDynError, task::Task};
use futures::FutureExt;
use tower::{Layer, Service};

use super::{
    Delivery,
    consumer::Shared,
    delivery::{RawPayload, Suspect, with_claim},
    error::Failure,
};
use crate::metrics as m;

/// Installed by the backend on every worker it feeds; not meant to be added by hand.
#[derive(Clone)]
pub struct AckLayer {
    shared: Arc<Shared>,
}

impl AckLayer {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

impl std::fmt::Debug for AckLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckLayer")
            .field("queue", &self.shared.queue.name())
            .finish()
    }
}

impl<S> Layer<S> for AckLayer {
    type Service = AckService<S>;
    fn layer(&self, inner: S) -> AckService<S> {
        AckService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// See [`AckLayer`].
#[derive(Clone)]
pub struct AckService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for AckService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckService")
            .field("queue", &self.shared.queue.name())
            .finish()
    }
}

/// Counts a running handler; if the job future is dropped before it finished (shutdown timed out, worker torn
/// down), its claim is no longer refreshed, so another consumer can take the job over.
struct Running {
    shared: Arc<Shared>,
    entry_id: String,
    suspect: bool,
    handler_done: bool,
    settled: bool,
}

impl Running {
    fn handler_done(&mut self) {
        if !self.handler_done {
            self.handler_done = true;
            self.shared.running_ended(self.suspect);
        }
    }

    fn settle(&mut self) {
        self.settled = true;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.handler_done();
        if !self.settled {
            self.shared.disown(&self.entry_id);
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

impl<S, T, Res> Service<Task<T>> for AckService<S>
where
    S: Service<Task<T>, Response = Res>,
    S::Error: Into<BoxDynError> + Send,
    S::Future: Send + 'static,
    Res: Send + 'static,
    T: Send + 'static,
{
    type Response = Res;
    type Error = BoxDynError;
    type Future = Pin<Box<dyn Future<Output = Result<Res, BoxDynError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxDynError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<T>) -> Self::Future {
        let delivery = task.ctx().data().get::<Delivery>().cloned();
        let payload = task.ctx().data().get::<RawPayload>().map(|p| p.0.clone());
        let suspect = task.ctx().data().get::<Suspect>().is_some();
        let shared = self.shared.clone();
        let fut = self.inner.call(task);
        let (Some(delivery), Some(payload)) = (delivery, payload) else {
            return Box::pin(async move { fut.await.map_err(Into::into) });
        };
        let fut = with_claim(delivery.claim.clone(), fut);
        shared.running_started();
        let mut running = Running {
            shared: shared.clone(),
            entry_id: delivery.entry_id.clone(),
            suspect,
            handler_done: false,
            settled: false,
        };
        Box::pin(async move {
            let started = Instant::now();
            let result = AssertUnwindSafe(fut).catch_unwind().await;
            running.handler_done();
            metrics::histogram!(m::QUEUE_JOB_DURATION, "stage" => delivery.queue.to_string())
                .record(started.elapsed().as_secs_f64());
            let result = match result {
                Ok(Ok(res)) => {
                    shared.complete(&delivery, "success").await;
                    Ok(res)
                }
                Ok(Err(err)) => {
                    let err: BoxDynError = err.into();
                    shared
                        .fail(&delivery, &payload, Failure::classify(&err))
                        .await;
                    Err(err)
                }
                Err(panic) => {
                    let error = format!("the handler panicked: {}", panic_message(panic.as_ref()));
                    tracing::error!(queue = %delivery.queue, job.id = %delivery.job_id, attempt = delivery.attempt, "{error}");
                    shared
                        .fail(
                            &delivery,
                            &payload,
                            Failure::Retry {
                                error: error.clone(),
                                after: None,
                            },
                        )
                        .await;
                    Err(error.into())
                }
            };
            running.settle();
            result
        })
    }
}
