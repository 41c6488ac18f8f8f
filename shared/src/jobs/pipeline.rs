//! What the document stages share: their context, job payloads, and the bookkeeping of `upload_jobs` and
//! document status that every stage does the same way.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    JobState, Stage,
    store::{self, Attempt},
};
use crate::{
    db::DbError,
    providers::{Embedder, Parser, ProviderError},
    queue::{Broker, Delivery, JobError, Queue, QueueError},
    settings::Settings,
};

/// Version of the stage job payloads.
pub const JOB_VERSION: u32 = 1;

/// A parse or chunk job: ids only, never document bytes or text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageJob {
    /// The document.
    pub document_id: Uuid,
    /// Its owner: the stage acts under this user's row-level security.
    pub user_id: Uuid,
    /// Payload version.
    pub v: u32,
}

/// An embed job: one batch of a document's chunks, by chunk index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedJob {
    /// The document.
    pub document_id: Uuid,
    /// Its owner.
    pub user_id: Uuid,
    /// First chunk index of the batch.
    pub first: u32,
    /// Chunks in the batch (0: only check whether the document is complete).
    pub count: u32,
    /// Payload version.
    pub v: u32,
}

/// Everything the document stages need, shared by all their jobs in a process.
#[derive(Clone)]
pub struct Pipeline {
    /// The database.
    pub pool: PgPool,
    /// The parse queue.
    pub parse: Queue<StageJob>,
    /// The chunk queue.
    pub chunk: Queue<StageJob>,
    /// The embed queue.
    pub embed: Queue<EmbedJob>,
    /// The configured embedder.
    pub embedder: Arc<dyn Embedder>,
    /// The configured parser.
    pub parser: Arc<dyn Parser>,
    /// Settings.
    pub settings: Arc<Settings>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("embedding_model", &self.embedder.model())
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Builds the context from its parts.
    pub fn new(
        pool: PgPool,
        broker: &Broker,
        embedder: Arc<dyn Embedder>,
        parser: Arc<dyn Parser>,
        settings: Arc<Settings>,
    ) -> Result<Self, QueueError> {
        Ok(Self {
            pool,
            parse: broker.queue(Stage::Parse.as_str())?,
            chunk: broker.queue(Stage::Chunk.as_str())?,
            embed: broker.queue(Stage::Embed.as_str())?,
            embedder,
            parser,
            settings,
        })
    }

    /// Pushes the parse job of a document (after its upload committed). Returns `false` when it was already
    /// waiting, in flight or delayed (pushes are deduplicated by job id).
    pub async fn push_parse(&self, document_id: Uuid, user_id: Uuid) -> Result<bool, QueueError> {
        Self::push_stage(&self.parse, Stage::Parse, document_id, user_id).await
    }

    /// Pushes the chunk job of a document; `false` when it was already live.
    pub async fn push_chunk(&self, document_id: Uuid, user_id: Uuid) -> Result<bool, QueueError> {
        Self::push_stage(&self.chunk, Stage::Chunk, document_id, user_id).await
    }

    /// Pushes a document's job on a stage queue under the stable id `<document>:<stage>`.
    async fn push_stage(
        queue: &Queue<StageJob>,
        stage: Stage,
        document_id: Uuid,
        user_id: Uuid,
    ) -> Result<bool, QueueError> {
        let job = StageJob {
            document_id,
            user_id,
            v: JOB_VERSION,
        };
        queue
            .push_with_id(&format!("{document_id}:{stage}"), &job)
            .await
    }

    /// Pushes embed jobs covering the given chunk indices, in batches of `embedding.batch_size`; with no index,
    /// one job that only checks whether the document is complete. Batches already live are not pushed again;
    /// returns how many were added.
    pub async fn push_embed(
        &self,
        document_id: Uuid,
        user_id: Uuid,
        indices: &[u32],
    ) -> Result<usize, QueueError> {
        let jobs = self.embed_jobs(document_id, user_id, indices);
        Ok(self
            .embed
            .push_batch(jobs.iter().map(|(id, job)| (id.as_str(), job)))
            .await?
            .len())
    }

    /// Pushes the job(s) of a stage that was just queued again (a retry of a failed document): a copy still
    /// live (a failed job whose failure is being settled, a sibling embed batch about to skip) is followed by one
    /// more run instead of swallowing the push ([`Queue::push_again`]). Embed pushes the batches of the chunks
    /// still without a vector. Returns how many jobs were added at once.
    pub async fn requeue(
        &self,
        document_id: Uuid,
        user_id: Uuid,
        stage: Stage,
    ) -> Result<usize, StageError> {
        let job = StageJob {
            document_id,
            user_id,
            v: JOB_VERSION,
        };
        let added = match stage {
            Stage::Parse | Stage::Chunk => {
                let queue = if stage == Stage::Parse {
                    &self.parse
                } else {
                    &self.chunk
                };
                let id = format!("{document_id}:{stage}");
                queue.push_again([(id.as_str(), &job)]).await?.len()
            }
            Stage::Embed | Stage::Synthetic => {
                let missing = super::chunk::missing_embeddings(self, user_id, document_id).await?;
                let jobs = self.embed_jobs(document_id, user_id, &missing);
                self.embed
                    .push_again(jobs.iter().map(|(id, job)| (id.as_str(), job)))
                    .await?
                    .len()
            }
        };
        Ok(added)
    }

    /// The embed jobs, with their ids, that cover the given chunk indices (see [`Pipeline::push_embed`]).
    pub fn embed_jobs(
        &self,
        document_id: Uuid,
        user_id: Uuid,
        indices: &[u32],
    ) -> Vec<(String, EmbedJob)> {
        let size = self.settings.embedding.batch_size.max(1);
        let mut jobs: Vec<(String, EmbedJob)> = indices
            .chunks(size)
            .map(|batch| {
                let (first, last) = (batch[0], batch[batch.len() - 1]);
                let job = EmbedJob {
                    document_id,
                    user_id,
                    first,
                    count: last - first + 1,
                    v: JOB_VERSION,
                };
                (format!("{document_id}:embed:{first}"), job)
            })
            .collect();
        if jobs.is_empty() {
            jobs.push((
                format!("{document_id}:embed:check"),
                EmbedJob {
                    document_id,
                    user_id,
                    first: 0,
                    count: 0,
                    v: JOB_VERSION,
                },
            ));
        }
        jobs
    }
}

/// A stage's failure, classified once: retryable ones go back to the queue, permanent ones fail the document.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Worth another attempt (database or provider unavailable, rate limited).
    #[error("{message}")]
    Retryable {
        /// What went wrong.
        message: String,
        /// When to try again, if the cause said.
        after: Option<std::time::Duration>,
    },
    /// The document cannot get through this stage (corrupt file, refused request): it is marked failed.
    #[error("{0}")]
    Permanent(String),
    /// The provider is rate limited, paused or out of quota: the document waits (the time given, else
    /// `pipeline.quota_wait`) without spending attempts, and is never failed for it.
    #[error("{message}")]
    Deferred {
        /// Why it waits.
        message: String,
        /// For how long, when known.
        after: Option<std::time::Duration>,
    },
    /// The job must run again, but this attempt records nothing on the document: its work committed and only
    /// the next stage's push failed (the redelivery pushes it), or its claim was taken over by another consumer
    /// (which owns the stage row now).
    #[error("{0}")]
    Unfinished(String),
}

impl From<ProviderError> for StageError {
    fn from(e: ProviderError) -> Self {
        match e {
            ProviderError::Transient { .. } => Self::Retryable {
                after: None,
                message: e.to_string(),
            },
            // Rate limits and budgets are not the document's fault: it waits without spending attempts.
            ProviderError::RateLimited { .. } | ProviderError::Throttled { .. } => Self::Deferred {
                after: e.retry_after(),
                message: e.to_string(),
            },
            // Out of quota: the document waits until a probe finds the quota back or an operator resumes.
            ProviderError::QuotaExhausted { .. } => Self::Deferred {
                after: None,
                message: e.to_string(),
            },
            // A refused key pauses the provider fleet-wide: documents wait for the key to work again (a probe) or
            // an operator's resume, and never fail for it.
            ProviderError::Unauthorized { .. } => Self::Deferred {
                after: None,
                message: e.to_string(),
            },
            ProviderError::Permanent { message, .. } => Self::Permanent(message),
        }
    }
}

impl StageError {
    /// Retryable (after the queue's backoff) or permanent, as the cause says.
    fn classified(retryable: bool, e: impl std::fmt::Display) -> Self {
        if retryable {
            Self::Retryable {
                message: e.to_string(),
                after: None,
            }
        } else {
            Self::Permanent(e.to_string())
        }
    }
}

impl From<DbError> for StageError {
    fn from(e: DbError) -> Self {
        Self::classified(e.is_retryable(), e)
    }
}

impl From<sqlx::Error> for StageError {
    fn from(e: sqlx::Error) -> Self {
        DbError::from(e).into()
    }
}

impl From<QueueError> for StageError {
    fn from(e: QueueError) -> Self {
        Self::classified(e.is_retryable(), e)
    }
}

/// Keeps a running stage's row fresh while its handler works (a LlamaParse job may take half an hour), so the
/// reconciler never takes a running stage for a lost one. Stops when dropped.
pub(crate) struct Heartbeat(tokio::task::JoinHandle<()>);

impl Heartbeat {
    /// Touches the stage row every third of `pipeline.reconcile_after` while it is `running`.
    pub(crate) fn start(p: &Pipeline, user: Uuid, doc: Uuid, stage: Stage) -> Self {
        let pool = p.pool.clone();
        let every =
            (p.settings.pipeline.reconcile_after / 3).max(std::time::Duration::from_millis(50));
        Self(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let touched = store::touch_running(&pool, user, doc, stage).await;
                if let Err(e) = touched {
                    tracing::debug!(document_id = %doc, stage = stage.as_str(), error = %e, "Could not refresh a running stage's row");
                }
            }
        }))
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Stops a handler whose claim another consumer took over, before it calls a paid provider again.
pub(crate) fn ensure_claim(delivery: &Delivery) -> Result<(), StageError> {
    if delivery.claim_lost() {
        return Err(StageError::Unfinished(
            "the job's claim was taken over by another consumer; stopping before the provider call"
                .into(),
        ));
    }
    Ok(())
}

/// Records the outcome of a failed attempt and tells the queue what to do.
pub(crate) async fn settle_failure(
    p: &Pipeline,
    job_user: Uuid,
    doc: Uuid,
    stage: Stage,
    delivery: &Delivery,
    err: StageError,
) -> Result<(), JobError> {
    let max = p.settings.queue.max_deliveries;
    let stage_name = stage.as_str();
    // Another consumer owns the job now (and its stage row): whatever went wrong here, it decides.
    let err = match err {
        StageError::Unfinished(_) => err,
        other if delivery.claim_lost() => StageError::Unfinished(format!(
            "the job's claim was taken over by another consumer ({other})"
        )),
        other => other,
    };
    match err {
        StageError::Permanent(reason) => {
            tracing::warn!(document_id = %doc, stage = stage_name, %reason, "Document failed permanently");
            if let Err(e) = fail_document(&p.pool, job_user, doc, stage, &reason, None).await {
                return Err(JobError::retryable(format!(
                    "could not record the failure ({e}): {reason}"
                )));
            }
            Err(JobError::failed(reason))
        }
        StageError::Retryable { message, after } => {
            let last = delivery.attempt >= max;
            let gave_up = last.then(|| {
                format!(
                    "{stage_name}: gave up after {} attempts: {message}",
                    delivery.attempt
                )
            });
            let state = if last {
                JobState::Dead
            } else {
                JobState::Failed
            };
            let at = Attempt {
                doc,
                user: job_user,
                stage,
                attempts: delivery.attempt,
            };
            record_attempt(p, &at, state, &message, gave_up).await;
            Err(match after {
                Some(after) => JobError::retry_after(message, after),
                None => JobError::retryable(message),
            })
        }
        StageError::Deferred { message, after } => {
            let wait = after.unwrap_or(p.settings.pipeline.quota_wait);
            tracing::info!(document_id = %doc, stage = stage_name, %message, wait_seconds = wait.as_secs_f64(), "The provider's budget is spent for now; the document waits");
            // No attempt is spent: the recorded count stays as it was.
            let at = Attempt {
                doc,
                user: job_user,
                stage,
                attempts: 0,
            };
            let waiting = format!("waiting for the provider's budget: {message}");
            record_attempt(p, &at, JobState::Queued, &waiting, None).await;
            Err(JobError::defer(message, wait))
        }
        StageError::Unfinished(message) => {
            // Not the document's fault: no attempt is spent, so a stage that keeps meeting a lost push or claim is
            // never dead-lettered for it.
            tracing::info!(document_id = %doc, stage = stage_name, %message, "The job will run again");
            Err(JobError::defer(message, p.settings.queue.retry_base))
        }
    }
}

/// Records an attempt that did not finish on its stage row (see [`store::record_attempt`]). A failure to record
/// is only logged: the queue's own record decides what happens next, and the next attempt records again.
async fn record_attempt(
    p: &Pipeline,
    at: &Attempt,
    state: JobState,
    last_error: &str,
    gave_up: Option<String>,
) {
    match store::record_attempt(&p.pool, at, state, last_error, gave_up).await {
        Ok(true) => crate::metrics::document_failed(at.stage.as_str()),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(document_id = %at.doc, stage = at.stage.as_str(), error = %e, "Could not record an unfinished attempt");
        }
    }
}

/// [`store::fail_document`] (the compare-and-set that fails the document at `stage` with its reason), counting
/// the failure in the metrics when it did.
pub(crate) async fn fail_document(
    pool: &PgPool,
    user: Uuid,
    doc: Uuid,
    stage: Stage,
    reason: &str,
    touched: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<bool, DbError> {
    let failed = store::fail_document(pool, user, doc, stage, reason, touched).await?;
    if failed {
        crate::metrics::document_failed(stage.as_str());
    }
    Ok(failed)
}
