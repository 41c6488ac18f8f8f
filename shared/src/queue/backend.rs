//! [`StreamBackend`]: the apalis [`Backend`] of one consumer. It hands out fetched tasks as the worker has room,
//! lets a suspect job run alone, and gives unstarted jobs back when the worker closes.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use apalis_core::{
    backend::{Backend, BackendConfig, finalize::Ephemeral},
    task::Task,
    worker::context::WorkerContext,
};
use serde::de::DeserializeOwned;

use super::{Delivery, QueueError, ack::AckLayer, consumer::Shared, delivery::Suspect};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The apalis backend of one [`Consumer`](super::Consumer): fetches only as many jobs as the worker has free slots.
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

impl<T> StreamBackend<T> {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            buffer: VecDeque::new(),
            fetch: None,
            closing: None,
        }
    }
}

pub(super) fn is_suspect<T>(task: &Task<T>) -> bool {
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
        let slots = &self.shared.slots;
        loop {
            if let Some(task) = self.buffer.front() {
                let suspect = is_suspect(task);
                // Wait for the suspect to end, or for the worker to empty before a suspect starts.
                if slots.must_wait(cx, suspect) {
                    return Poll::Pending;
                }
                if suspect {
                    slots.suspect_started();
                }
                return Poll::Ready(self.buffer.pop_front().map(Ok));
            }
            // Nothing is fetched while a suspect runs: what this consumer takes, a crash would take down too.
            if slots.must_wait(cx, false) {
                return Poll::Pending;
            }
            if self.shared.life.is_closing() {
                return Poll::Ready(None);
            }
            let fetch = self.fetch.get_or_insert_with(|| {
                Box::pin(self.shared.clone().fetch::<T>(self.shared.slots.free()))
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
                shared.life.close();
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
