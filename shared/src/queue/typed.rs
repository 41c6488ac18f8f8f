//! The typed [`Queue<T>`]: pushes jobs of type `T` (now, in batches, delayed, or again after a live copy) and
//! registers the consumers that deliver them.

use std::{marker::PhantomData, time::Duration};

use serde::{Serialize, de::DeserializeOwned};

use super::{
    QueueError, consumer::Consumer, envelope::Envelope, handle::QueueHandle, new_job_id, scripts,
};

/// A typed queue: pushes jobs of type `T` and builds the apalis backend that delivers them.
pub struct Queue<T> {
    pub(super) handle: QueueHandle,
    pub(super) _job: PhantomData<fn() -> T>,
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
        let member = env.delayed_member().map_err(QueueError::Encode)?;
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
