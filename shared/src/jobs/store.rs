//! The SQL of the stages' state machines: a document's status (`documents.status`) and its stages' rows
//! (`upload_jobs`). Every change here is a compare-and-set on the state it expects, and reports whether it found
//! it; the callers decide what a change that found another state means. Every function takes the owner's
//! transaction ([`db::begin_as`]) or opens one, so row-level security applies.
//!
//! The unsettled states (`queued`, `running`, `failed`) are spelled out in the SQL rather than bound: the partial
//! index `upload_jobs_unsettled` has that predicate.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::{JobState, Stage};
use crate::{
    db::{self, DbError},
    documents::DocumentStatus,
};

/// The state of a document and of one of its stages, read under the owner's row-level security.
pub(crate) struct Current {
    /// The document's status.
    pub status: DocumentStatus,
    /// The stage's state, when it has a row.
    pub job_state: Option<JobState>,
}

/// Reads the document's status and the stage's state; `None` when the document was deleted.
pub(crate) async fn current(
    pool: &PgPool,
    user: Uuid,
    doc: Uuid,
    stage: Stage,
) -> Result<Option<Current>, DbError> {
    let mut tx = db::begin_as(pool, user).await?;
    let row: Option<(DocumentStatus, Option<JobState>)> = sqlx::query_as(
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

/// Marks a stage running and the document in that stage's status, as one compare-and-set: only a document in a
/// status this stage may start from ([`Stage::startable_from`]) and a stage row that is `queued`, `running` or
/// `failed` are moved. Returns `false`, changing nothing, when either is elsewhere (the document is ready, failed
/// or deleted, or the stage is done or dead): a late or duplicate copy of the job then has nothing to do.
pub(crate) async fn start(
    pool: &PgPool,
    user: Uuid,
    doc: Uuid,
    stage: Stage,
    attempt: u32,
) -> Result<bool, DbError> {
    let Some(status) = stage.document_status() else {
        return Ok(false);
    };
    let mut tx = db::begin_as(pool, user).await?;
    let moved = sqlx::query(
        "UPDATE upload_pipeline.documents SET status = $2, updated_at = now() WHERE id = $1 AND status = ANY($3)",
    )
    .bind(doc)
    .bind(status)
    .bind(stage.startable_from())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if moved == 0 {
        return Ok(false);
    }
    let started: Option<(i32,)> = sqlx::query_as(
        "INSERT INTO upload_pipeline.upload_jobs (document_id, stage, user_id, state, attempts, started_at) \
         VALUES ($1, $2, $3, 'running', $4, now()) \
         ON CONFLICT (document_id, stage) DO UPDATE SET state = 'running', attempts = GREATEST(upload_jobs.attempts, $4), \
         started_at = coalesce(upload_jobs.started_at, now()), updated_at = now() \
         WHERE upload_jobs.state IN ('queued', 'running', 'failed') RETURNING attempts",
    )
    .bind(doc)
    .bind(stage)
    .bind(user)
    .bind(attempt as i32)
    .fetch_optional(&mut *tx)
    .await?;
    if started.is_none() {
        return Ok(false);
    }
    tx.commit().await?;
    Ok(true)
}

/// Touches a stage's row while it is `running` (the heartbeat of a long handler).
pub(crate) async fn touch_running(
    pool: &PgPool,
    user: Uuid,
    doc: Uuid,
    stage: Stage,
) -> Result<(), DbError> {
    let mut tx = db::begin_as(pool, user).await?;
    sqlx::query(
        "UPDATE upload_pipeline.upload_jobs SET updated_at = now() \
         WHERE document_id = $1 AND stage = $2 AND state = 'running'",
    )
    .bind(doc)
    .bind(stage)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Touches a stage's row whatever its state, so the reconciler meets it again only after another
/// `pipeline.reconcile_after`.
pub(crate) async fn touch(
    pool: &PgPool,
    user: Uuid,
    doc: Uuid,
    stage: Stage,
) -> Result<(), DbError> {
    let mut tx = db::begin_as(pool, user).await?;
    sqlx::query(
        "UPDATE upload_pipeline.upload_jobs SET updated_at = now() WHERE document_id = $1 AND stage = $2",
    )
    .bind(doc)
    .bind(stage)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The stage row an attempt belongs to.
pub(crate) struct Attempt {
    pub doc: Uuid,
    pub user: Uuid,
    pub stage: Stage,
    /// Attempts made so far (the recorded count never goes down).
    pub attempts: u32,
}

/// Records an attempt that did not finish on its stage row, in `state` (`queued`, `failed` or `dead`), only while
/// the row is unsettled: a late copy never reopens a done or dead stage. When `gave_up` says why, also fails the
/// document (unless it is ready or failed already). Returns whether the document was failed.
pub(crate) async fn record_attempt(
    pool: &PgPool,
    at: &Attempt,
    state: JobState,
    last_error: &str,
    gave_up: Option<String>,
) -> Result<bool, DbError> {
    let mut tx = db::begin_as(pool, at.user).await?;
    // The document's row first, as every stage transition locks it: one lock order, no deadlock between batches.
    if !lock_document(&mut tx, at.doc).await? {
        return Ok(false);
    }
    let updated = sqlx::query(
        "UPDATE upload_pipeline.upload_jobs SET state = $3, last_error = $4, attempts = GREATEST(attempts, $5), \
         finished_at = CASE WHEN $3 = 'dead' THEN now() END, updated_at = now() \
         WHERE document_id = $1 AND stage = $2 AND state IN ('queued', 'running', 'failed')",
    )
    .bind(at.doc)
    .bind(at.stage)
    .bind(state)
    .bind(last_error)
    .bind(at.attempts as i32)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let mut failed = false;
    if let (Some(reason), 1..) = (gave_up, updated) {
        failed = fail_status(&mut tx, at.doc, &reason).await?;
    }
    tx.commit().await?;
    Ok(failed)
}

/// Marks the document failed at `stage` with a reason its owner can read, as a compare-and-set: only an
/// unsettled stage row (last touched at `touched`, when given) of a document that is neither ready nor failed.
/// Returns whether it did.
pub(crate) async fn fail_document(
    pool: &PgPool,
    user: Uuid,
    doc: Uuid,
    stage: Stage,
    reason: &str,
    touched: Option<DateTime<Utc>>,
) -> Result<bool, DbError> {
    let mut tx = db::begin_as(pool, user).await?;
    // The document's row first, as every stage transition locks it: one lock order, no deadlock between batches.
    if !lock_document(&mut tx, doc).await? {
        return Ok(false);
    }
    let row = sqlx::query(
        "UPDATE upload_pipeline.upload_jobs SET state = 'dead', last_error = $3, finished_at = now(), updated_at = now() \
         WHERE document_id = $1 AND stage = $2 AND state IN ('queued', 'running', 'failed') \
         AND ($4::timestamptz IS NULL OR updated_at = $4)",
    )
    .bind(doc)
    .bind(stage)
    .bind(reason)
    .bind(touched)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if row == 0 {
        return Ok(false);
    }
    if !fail_status(&mut tx, doc, &format!("{stage}: {reason}")).await? {
        return Ok(false);
    }
    tx.commit().await?;
    Ok(true)
}

/// The document -> `failed` with `error`, unless it is ready or failed already; whether it moved.
async fn fail_status(
    tx: &mut Transaction<'_, Postgres>,
    doc: Uuid,
    error: &str,
) -> Result<bool, sqlx::Error> {
    let failed = sqlx::query(
        "UPDATE upload_pipeline.documents SET status = 'failed', error = $2, updated_at = now() \
         WHERE id = $1 AND status NOT IN ('ready', 'failed')",
    )
    .bind(doc)
    .bind(error)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(failed > 0)
}

/// In one transaction, as compare-and-sets: the stage `running` -> `done`, the document from this stage's status
/// to the next stage's, and the next stage queued. Returns `false` when the stage was not running or the document
/// not in this stage (a late or duplicate copy): the caller then rolls back and writes nothing.
pub(crate) async fn advance(
    tx: &mut Transaction<'_, Postgres>,
    user: Uuid,
    doc: Uuid,
    stage: Stage,
) -> Result<bool, sqlx::Error> {
    let Some(next) = stage.next() else {
        return Ok(false);
    };
    let (Some(from), Some(to)) = (stage.document_status(), next.document_status()) else {
        return Ok(false);
    };
    let done = sqlx::query(
        "UPDATE upload_pipeline.upload_jobs SET state = 'done', last_error = NULL, finished_at = now(), updated_at = now() \
         WHERE document_id = $1 AND stage = $2 AND state = 'running'",
    )
    .bind(doc)
    .bind(stage)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if done == 0 {
        return Ok(false);
    }
    let moved = sqlx::query(
        "UPDATE upload_pipeline.documents SET status = $2, updated_at = now() WHERE id = $1 AND status = $3",
    )
    .bind(doc)
    .bind(to)
    .bind(from)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if moved == 0 {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO upload_pipeline.upload_jobs (document_id, stage, user_id) VALUES ($1, $2, $3) \
         ON CONFLICT (document_id, stage) DO UPDATE SET state = 'queued', last_error = NULL, attempts = 0, queued_at = now(), \
         started_at = NULL, finished_at = NULL, updated_at = now()",
    )
    .bind(doc)
    .bind(next)
    .bind(user)
    .execute(&mut **tx)
    .await?;
    Ok(true)
}

/// The batch that completes a document: `embedding` -> `ready` when every chunk has a vector of `model`, and the
/// embed stage done, under the document's row lock (taken by the caller). Returns the document's
/// upload-to-queryable time in seconds when this call made it ready.
pub(crate) async fn finish_embedding(
    tx: &mut Transaction<'_, Postgres>,
    doc: Uuid,
    model: &str,
) -> Result<Option<f64>, sqlx::Error> {
    let ready: Option<(f64,)> = sqlx::query_as(
        "UPDATE upload_pipeline.documents d SET status = 'ready', ready_at = now(), updated_at = now() \
         WHERE d.id = $1 AND d.status = 'embedding' AND d.chunks_total IS NOT NULL AND NOT EXISTS ( \
           SELECT 1 FROM upload_pipeline.document_chunks c WHERE c.document_id = d.id \
           AND (c.embedding IS NULL OR c.embedding_model IS DISTINCT FROM $2)) \
         RETURNING extract(epoch FROM now() - d.created_at)::float8",
    )
    .bind(doc)
    .bind(model)
    .fetch_optional(&mut **tx)
    .await?;
    if ready.is_some() {
        sqlx::query(
            "UPDATE upload_pipeline.upload_jobs SET state = 'done', last_error = NULL, finished_at = now(), updated_at = now() \
             WHERE document_id = $1 AND stage = 'embed' AND state IN ('queued', 'running', 'failed')",
        )
        .bind(doc)
        .execute(&mut **tx)
        .await?;
    }
    Ok(ready.map(|(seconds,)| seconds))
}

/// Locks the document's row for the rest of the transaction; `false` when it was deleted meanwhile (its jobs then
/// finish as no-ops).
pub(crate) async fn lock_document(
    tx: &mut Transaction<'_, Postgres>,
    doc: Uuid,
) -> Result<bool, sqlx::Error> {
    Ok(lock_status(tx, doc).await?.is_some())
}

/// Locks the document's row and reads its status; `None` when there is no such document.
pub(crate) async fn lock_status(
    tx: &mut Transaction<'_, Postgres>,
    doc: Uuid,
) -> Result<Option<DocumentStatus>, sqlx::Error> {
    let row: Option<(DocumentStatus,)> =
        sqlx::query_as("SELECT status FROM upload_pipeline.documents WHERE id = $1 FOR UPDATE")
            .bind(doc)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(row.map(|(status,)| status))
}

/// Locks the document's stage rows and reads their states, in pipeline order.
pub(crate) async fn lock_stages(
    tx: &mut Transaction<'_, Postgres>,
    doc: Uuid,
) -> Result<Vec<(Stage, JobState)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT stage, state FROM upload_pipeline.upload_jobs WHERE document_id = $1 \
         ORDER BY array_position(ARRAY['parse', 'chunk', 'embed'], stage) FOR UPDATE",
    )
    .bind(doc)
    .fetch_all(&mut **tx)
    .await
}

/// Re-opens a failed document at `stage`, as compare-and-sets: the stage from `state` (as read) to a fresh
/// `queued`, and the document from `failed` to `status`. Returns `false` when either had moved: the caller then
/// drops the transaction, which rolls both back.
pub(crate) async fn reopen(
    tx: &mut Transaction<'_, Postgres>,
    doc: Uuid,
    stage: Stage,
    state: JobState,
    status: DocumentStatus,
) -> Result<bool, sqlx::Error> {
    let requeued = sqlx::query(
        "UPDATE upload_pipeline.upload_jobs SET state = 'queued', attempts = 0, last_error = NULL, queued_at = now(), \
         started_at = NULL, finished_at = NULL, updated_at = now() \
         WHERE document_id = $1 AND stage = $2 AND state = $3",
    )
    .bind(doc)
    .bind(stage)
    .bind(state)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    let reopened = sqlx::query(
        "UPDATE upload_pipeline.documents SET status = $2, error = NULL, updated_at = now() \
         WHERE id = $1 AND status = 'failed'",
    )
    .bind(doc)
    .bind(status)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(requeued == 1 && reopened == 1)
}

/// One unsettled stage, as `stale_jobs` returns it.
pub(crate) struct Stale {
    pub doc: Uuid,
    pub user: Uuid,
    pub stage: Stage,
    pub state: JobState,
    pub attempts: i32,
    pub updated_at: DateTime<Utc>,
}

/// Up to `limit` stages unsettled since before `before`, fleet-wide, in keyset order after `after`
/// (`stale_jobs()`, which runs as its owner).
pub(crate) async fn stale_page(
    pool: &PgPool,
    before: DateTime<Utc>,
    after: Option<(DateTime<Utc>, Uuid, Stage)>,
    limit: i32,
) -> Result<Vec<Stale>, DbError> {
    let (ts, doc, stage) = after
        .map(|(ts, doc, stage)| (ts, doc, stage.as_str()))
        .unwrap_or((DateTime::<Utc>::UNIX_EPOCH, Uuid::nil(), ""));
    let rows: Vec<(Uuid, Uuid, Stage, JobState, i32, DateTime<Utc>)> = sqlx::query_as(
        "SELECT document_id, user_id, stage, state, attempts, updated_at \
         FROM upload_pipeline.stale_jobs($1, $2, $3, $4, $5)",
    )
    .bind(before)
    .bind(ts)
    .bind(doc)
    .bind(stage)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(doc, user, stage, state, attempts, updated_at)| Stale {
            doc,
            user,
            stage,
            state,
            attempts,
            updated_at,
        })
        .collect())
}
