//! What the document stages share: their context, job payloads, and the bookkeeping of `upload_jobs` and
//! document status that every stage does the same way.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    db::{self, DbError},
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
            parse: broker.queue(super::Stage::Parse.as_str())?,
            chunk: broker.queue(super::Stage::Chunk.as_str())?,
            embed: broker.queue(super::Stage::Embed.as_str())?,
            embedder,
            parser,
            settings,
        })
    }

    /// Pushes the parse job of a document (after its upload committed).
    pub async fn push_parse(&self, document_id: Uuid, user_id: Uuid) -> Result<(), QueueError> {
        Self::push_stage(&self.parse, "parse", document_id, user_id).await
    }

    /// Pushes the chunk job of a document.
    pub async fn push_chunk(&self, document_id: Uuid, user_id: Uuid) -> Result<(), QueueError> {
        Self::push_stage(&self.chunk, "chunk", document_id, user_id).await
    }

    /// Pushes a document's job on a stage queue under the stable id `<document>:<stage>`.
    async fn push_stage(
        queue: &Queue<StageJob>,
        stage: &str,
        document_id: Uuid,
        user_id: Uuid,
    ) -> Result<(), QueueError> {
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
    /// one job that only checks whether the document is complete.
    pub async fn push_embed(
        &self,
        document_id: Uuid,
        user_id: Uuid,
        indices: &[u32],
    ) -> Result<(), QueueError> {
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
        self.embed
            .push_batch(jobs.iter().map(|(id, job)| (id.as_str(), job)))
            .await
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

/// The state of a document and of one of its stages, read under the owner's row-level security.
pub(crate) struct Current {
    pub status: String,
    pub job_state: Option<String>,
}

/// Reads the document's status and the stage's state; `None` when the document was deleted.
pub(crate) async fn current(
    pool: &PgPool,
    user: Uuid,
    doc: Uuid,
    stage: &str,
) -> Result<Option<Current>, DbError> {
    let mut tx = db::begin_as(pool, user).await?;
    let row: Option<(String, Option<String>)> = sqlx::query_as(
        "SELECT d.status, j.state FROM upload_pipeline.documents d \
         LEFT JOIN upload_pipeline.upload_jobs j ON j.document_id = d.id AND j.stage = $2 WHERE d.id = $1",
    )
    .bind(doc)
    .bind(stage)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row.map(|(status, job_state)| Current { status, job_state }))
}

/// Marks a stage running and the document in that stage's status.
pub(crate) async fn start(
    pool: &PgPool,
    user: Uuid,
    doc: Uuid,
    stage: &str,
    status: &str,
    attempt: u32,
) -> Result<(), DbError> {
    let mut tx = db::begin_as(pool, user).await?;
    sqlx::query(
        "INSERT INTO upload_pipeline.upload_jobs (document_id, stage, user_id, state, attempts, started_at) \
         VALUES ($1, $2, $3, 'running', $4, now()) \
         ON CONFLICT (document_id, stage) DO UPDATE SET state = 'running', attempts = GREATEST(upload_jobs.attempts, $4), \
         started_at = coalesce(upload_jobs.started_at, now()), updated_at = now()",
    )
    .bind(doc)
    .bind(stage)
    .bind(user)
    .bind(attempt as i32)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE upload_pipeline.documents SET status = $2, error = NULL, updated_at = now() WHERE id = $1 AND status NOT IN ('ready')",
    )
    .bind(doc)
    .bind(status)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Records the outcome of a failed attempt and tells the queue what to do.
pub(crate) async fn settle_failure(
    p: &Pipeline,
    job_user: Uuid,
    doc: Uuid,
    stage: &str,
    delivery: &Delivery,
    err: StageError,
) -> Result<(), JobError> {
    let max = p.settings.queue.max_deliveries;
    match err {
        StageError::Permanent(reason) => {
            tracing::warn!(document_id = %doc, stage, %reason, "Document failed permanently");
            if let Err(e) = fail_document(&p.pool, job_user, doc, stage, &reason).await {
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
                    "{stage} gave up after {} attempts: {message}",
                    delivery.attempt
                )
            });
            let state = if last { "dead" } else { "failed" };
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
            tracing::info!(document_id = %doc, stage, %message, wait_seconds = wait.as_secs_f64(), "The provider's budget is spent for now; the document waits");
            // No attempt is spent: the recorded count stays as it was.
            let at = Attempt {
                doc,
                user: job_user,
                stage,
                attempts: 0,
            };
            let waiting = format!("waiting for the provider's budget: {message}");
            record_attempt(p, &at, "queued", &waiting, None).await;
            Err(JobError::defer(message, wait))
        }
    }
}

/// The stage row an attempt belongs to.
struct Attempt<'a> {
    doc: Uuid,
    user: Uuid,
    stage: &'a str,
    /// Attempts made so far (the recorded count never goes down).
    attempts: u32,
}

/// Records an attempt that did not finish on its stage row, and fails the document when `gave_up` says why. A
/// failure to record is only logged: the queue's own record decides what happens next, and the next attempt
/// records again.
async fn record_attempt(
    p: &Pipeline,
    at: &Attempt<'_>,
    state: &str,
    last_error: &str,
    gave_up: Option<String>,
) {
    let recorded = async {
        let mut tx = db::begin_as(&p.pool, at.user).await?;
        sqlx::query(
            "UPDATE upload_pipeline.upload_jobs SET state = $3, last_error = $4, attempts = GREATEST(attempts, $5), updated_at = now() \
             WHERE document_id = $1 AND stage = $2",
        )
        .bind(at.doc)
        .bind(at.stage)
        .bind(state)
        .bind(last_error)
        .bind(at.attempts as i32)
        .execute(&mut *tx)
        .await?;
        if let Some(reason) = gave_up {
            sqlx::query("UPDATE upload_pipeline.documents SET status = 'failed', error = $2, updated_at = now() WHERE id = $1")
                .bind(at.doc)
                .bind(reason)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok::<_, DbError>(())
    }
    .await;
    if let Err(e) = recorded {
        tracing::warn!(document_id = %at.doc, stage = at.stage, error = %e, "Could not record an unfinished attempt");
    }
}

/// Marks the document failed at `stage` with a reason its owner can read.
pub(crate) async fn fail_document(
    pool: &PgPool,
    user: Uuid,
    doc: Uuid,
    stage: &str,
    reason: &str,
) -> Result<(), DbError> {
    let mut tx = db::begin_as(pool, user).await?;
    sqlx::query(
        "UPDATE upload_pipeline.upload_jobs SET state = 'dead', last_error = $3, finished_at = now(), updated_at = now() \
         WHERE document_id = $1 AND stage = $2",
    )
    .bind(doc)
    .bind(stage)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE upload_pipeline.documents SET status = 'failed', error = $2, updated_at = now() WHERE id = $1")
        .bind(doc)
        .bind(format!("{stage}: {reason}"))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    crate::metrics::document_failed(stage);
    Ok(())
}

/// In one transaction: the stage done, the next stage queued, the document in the next status.
pub(crate) async fn advance<'c>(
    tx: &mut sqlx::Transaction<'c, sqlx::Postgres>,
    user: Uuid,
    doc: Uuid,
    stage: &str,
    next: &str,
    next_status: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE upload_pipeline.upload_jobs SET state = 'done', last_error = NULL, finished_at = now(), updated_at = now() \
         WHERE document_id = $1 AND stage = $2",
    )
    .bind(doc)
    .bind(stage)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO upload_pipeline.upload_jobs (document_id, stage, user_id) VALUES ($1, $2, $3) \
         ON CONFLICT (document_id, stage) DO UPDATE SET state = 'queued', last_error = NULL, queued_at = now(), \
         started_at = NULL, finished_at = NULL, updated_at = now()",
    )
    .bind(doc)
    .bind(next)
    .bind(user)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE upload_pipeline.documents SET status = $2, updated_at = now() WHERE id = $1",
    )
    .bind(doc)
    .bind(next_status)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Locks the document's row for the rest of the transaction; `false` when it was deleted meanwhile (its jobs then
/// finish as no-ops).
pub(crate) async fn lock_document(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    doc: Uuid,
) -> Result<bool, sqlx::Error> {
    let row: Option<(Uuid,)> =
        sqlx::query_as("SELECT id FROM upload_pipeline.documents WHERE id = $1 FOR UPDATE")
            .bind(doc)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(row.is_some())
}
