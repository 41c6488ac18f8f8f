//! Documents as the API sees them: the durable upload, status with per-stage progress, listing and deletion.
//! Every function runs under the caller's row-level security ([`db::begin_as`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    db::{self, DbError},
    jobs::{JobState, Stage},
    parsing::DocKind,
};

/// A document's status.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum DocumentStatus {
    /// Waiting for the parse stage.
    Queued,
    /// Being parsed.
    Parsing,
    /// Being chunked.
    Chunking,
    /// Being embedded.
    Embedding,
    /// Searchable.
    Ready,
    /// Failed; see `error`.
    Failed,
}

impl DocumentStatus {
    /// The stored name (`documents.status`), as the API shows it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Parsing => "parsing",
            Self::Chunking => "chunking",
            Self::Embedding => "embedding",
            Self::Ready => "ready",
            Self::Failed => "failed",
        }
    }
}

impl std::fmt::Display for DocumentStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A new upload, already checked ([`DocKind::detect`]).
#[derive(Debug)]
pub struct NewUpload {
    /// The owner.
    pub user_id: Uuid,
    /// The file name as uploaded (sanitised).
    pub filename: String,
    /// What it is.
    pub kind: DocKind,
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Free-form metadata from the caller.
    pub metadata: serde_json::Value,
    /// The caller's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
}

/// What an upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadOutcome {
    /// A new document; its parse job must be pushed.
    Created(Uuid),
    /// The same user uploaded the same bytes before: that document.
    Duplicate(Uuid),
    /// A retry with an `Idempotency-Key` seen before: the document it created.
    Replayed(Uuid),
}

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The `Idempotency-Key` was used before for different bytes.
    #[error("the Idempotency-Key was already used for a different file")]
    IdempotencyConflict,
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for UploadError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e.into())
    }
}

/// Records an upload durably: the document, its bytes and its queued parse stage in one transaction.
pub async fn create(pool: &PgPool, up: &NewUpload) -> Result<UploadOutcome, UploadError> {
    let sha256 = hex::encode(Sha256::digest(&up.bytes));
    for _ in 0..2 {
        let mut tx = db::begin_as(pool, up.user_id).await?;
        if let Some(key) = &up.idempotency_key {
            let seen: Option<(Uuid, String)> = sqlx::query_as(
                "SELECT id, sha256 FROM upload_pipeline.documents WHERE idempotency_key = $1",
            )
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((id, seen_sha)) = seen {
                return if seen_sha == sha256 {
                    Ok(UploadOutcome::Replayed(id))
                } else {
                    Err(UploadError::IdempotencyConflict)
                };
            }
        }
        let dup: Option<(Uuid,)> =
            sqlx::query_as("SELECT id FROM upload_pipeline.documents WHERE sha256 = $1")
                .bind(&sha256)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some((id,)) = dup {
            return Ok(UploadOutcome::Duplicate(id));
        }
        let id = Uuid::new_v4();
        let inserted = sqlx::query(
            "INSERT INTO upload_pipeline.documents (id, user_id, filename, content_type, size_bytes, sha256, metadata, idempotency_key) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(id)
        .bind(up.user_id)
        .bind(&up.filename)
        .bind(up.kind.content_type())
        .bind(up.bytes.len() as i64)
        .bind(&sha256)
        .bind(&up.metadata)
        .bind(&up.idempotency_key)
        .execute(&mut *tx)
        .await;
        match inserted {
            // A concurrent upload of the same bytes or key won: look again.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => continue,
            other => other?,
        };
        sqlx::query("INSERT INTO upload_pipeline.document_bytes (document_id, user_id, bytes) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(up.user_id)
            .bind(&up.bytes)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO upload_pipeline.upload_jobs (document_id, stage, user_id) VALUES ($1, 'parse', $2)")
            .bind(id)
            .bind(up.user_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        return Ok(UploadOutcome::Created(id));
    }
    Err(UploadError::Db(DbError::Sqlx(sqlx::Error::Protocol(
        "concurrent uploads kept conflicting".into(),
    ))))
}

/// The progress of one stage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, sqlx::FromRow)]
pub struct StageStatus {
    /// `parse`, `chunk` or `embed`.
    pub stage: Stage,
    /// Its state.
    pub state: JobState,
    /// Attempts so far.
    pub attempts: i32,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// When it was queued.
    pub queued_at: DateTime<Utc>,
    /// When it started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
}

/// A document with its progress.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, sqlx::FromRow)]
pub struct Document {
    /// Its id.
    pub id: Uuid,
    /// The file name.
    pub filename: String,
    /// Its MIME type.
    pub content_type: String,
    /// Size in bytes.
    pub size_bytes: i64,
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
    /// Where it is in the pipeline.
    pub status: DocumentStatus,
    /// Why it failed.
    pub error: Option<String>,
    /// The caller's metadata.
    pub metadata: serde_json::Value,
    /// Chunks made (once chunked).
    pub chunks_total: Option<i32>,
    /// Chunks with a vector.
    #[sqlx(default)]
    pub chunks_embedded: i64,
    /// Per-stage progress.
    #[sqlx(skip)]
    pub stages: Vec<StageStatus>,
    /// Upload time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// When it became searchable.
    pub ready_at: Option<DateTime<Utc>>,
}

const DOCUMENT_COLUMNS: &str = "d.id, d.filename, d.content_type, d.size_bytes, d.sha256, d.status, d.error, d.metadata, \
     d.chunks_total, d.created_at, d.updated_at, d.ready_at";

/// One document with its stages, or `None` (also when it is another user's).
pub async fn get(pool: &PgPool, user: Uuid, id: Uuid) -> Result<Option<Document>, DbError> {
    let mut tx = db::begin_as(pool, user).await?;
    let doc = fetch(&mut tx, id).await?;
    tx.commit().await?;
    Ok(doc)
}

/// One document with its stages, read in the caller's transaction (so under its row-level security, and as that
/// transaction sees it).
pub(crate) async fn fetch(
    conn: &mut sqlx::PgConnection,
    id: Uuid,
) -> Result<Option<Document>, sqlx::Error> {
    let doc: Option<Document> = sqlx::query_as(&format!(
        "SELECT {DOCUMENT_COLUMNS}, (SELECT count(*) FROM upload_pipeline.document_chunks c \
         WHERE c.document_id = d.id AND c.embedding IS NOT NULL) AS chunks_embedded \
         FROM upload_pipeline.documents d WHERE d.id = $1"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(mut doc) = doc else { return Ok(None) };
    doc.stages = sqlx::query_as(
        "SELECT stage, state, attempts, last_error, queued_at, started_at, finished_at FROM upload_pipeline.upload_jobs \
         WHERE document_id = $1 ORDER BY array_position(ARRAY['parse', 'chunk', 'embed'], stage)",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(doc))
}

/// A page of documents, newest first, with the cursor of the next page.
pub async fn list(
    pool: &PgPool,
    user: Uuid,
    status: Option<DocumentStatus>,
    limit: u32,
    cursor: Option<(DateTime<Utc>, Uuid)>,
) -> Result<(Vec<Document>, Option<(DateTime<Utc>, Uuid)>), DbError> {
    let mut tx = db::begin_as(pool, user).await?;
    let docs: Vec<Document> = sqlx::query_as(&format!(
        "SELECT {DOCUMENT_COLUMNS} FROM upload_pipeline.documents d \
         WHERE ($1::text IS NULL OR d.status = $1) AND ($2::timestamptz IS NULL OR (d.created_at, d.id) < ($2, $3)) \
         ORDER BY d.created_at DESC, d.id DESC LIMIT $4"
    ))
    .bind(status)
    .bind(cursor.map(|c| c.0))
    .bind(cursor.map(|c| c.1))
    .bind(limit as i64 + 1)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut docs = docs;
    let next = if docs.len() > limit as usize {
        docs.truncate(limit as usize);
        docs.last().map(|d| (d.created_at, d.id))
    } else {
        None
    };
    Ok((docs, next))
}

/// Deletes a document with its bytes, parsed content, jobs and chunks, in one transaction. `false`: not found.
pub async fn delete(pool: &PgPool, user: Uuid, id: Uuid) -> Result<bool, DbError> {
    let mut tx = db::begin_as(pool, user).await?;
    let n = sqlx::query("DELETE FROM upload_pipeline.documents WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(n == 1)
}
