//! The embed stage: one batch of chunks to vectors; the batch that completes a document makes it `ready`
//! (decided in SQL under the document's row lock) and records its upload-to-queryable time.

use super::pipeline::{
    EmbedJob, Pipeline, StageError, current, lock_document, settle_failure, start,
};
use crate::{
    db,
    providers::EmbedError,
    queue::{Delivery, JobError},
};

/// Runs one embed job. Idempotent: only chunks without a vector of the current model are embedded.
pub async fn run(p: Pipeline, job: EmbedJob, delivery: Delivery) -> Result<(), JobError> {
    match embed(&p, &job, &delivery).await {
        Ok(()) => Ok(()),
        Err(e) => settle_failure(&p, job.user_id, job.document_id, "embed", &delivery, e).await,
    }
}

impl From<EmbedError> for StageError {
    fn from(e: EmbedError) -> Self {
        match e {
            EmbedError::RateLimited { .. } | EmbedError::Transient(_) => Self::Retryable {
                after: e.retry_after(),
                message: e.to_string(),
            },
            // Out of quota: defer (never fail the document); retry once someone restored the quota.
            EmbedError::QuotaExhausted(_) => Self::Retryable {
                after: Some(std::time::Duration::from_secs(60)),
                message: e.to_string(),
            },
            EmbedError::Permanent(m) => Self::Permanent(m),
        }
    }
}

fn vector_literal(v: &[f32]) -> String {
    let mut s = String::with_capacity(v.len() * 10 + 2);
    s.push('[');
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&x.to_string());
    }
    s.push(']');
    s
}

async fn embed(p: &Pipeline, job: &EmbedJob, delivery: &Delivery) -> Result<(), StageError> {
    let (doc, user) = (job.document_id, job.user_id);
    let model = p.embedder.model().to_owned();
    let Some(now) = current(&p.pool, user, doc, "embed").await? else {
        return Ok(());
    };
    if now.status == "ready" {
        return Ok(());
    }
    start(&p.pool, user, doc, "embed", "embedding", delivery.attempt).await?;

    let mut tx = db::begin_as(&p.pool, user).await?;
    let rows: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT id, content FROM upload_pipeline.document_chunks WHERE document_id = $1 AND chunk_index >= $2 AND chunk_index < $3 \
         AND (embedding IS NULL OR embedding_model IS DISTINCT FROM $4) ORDER BY chunk_index",
    )
    .bind(doc)
    .bind(job.first as i32)
    .bind((job.first + job.count) as i32)
    .bind(&model)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;

    let mut tx = db::begin_as(&p.pool, user).await?;
    if !rows.is_empty() {
        let texts: Vec<String> = rows.iter().map(|(_, c)| c.clone()).collect();
        let vectors = p.embedder.embed(&texts).await?;
        let ids: Vec<uuid::Uuid> = rows.iter().map(|(id, _)| *id).collect();
        let literals: Vec<String> = vectors.iter().map(|v| vector_literal(v)).collect();
        sqlx::query(
            "UPDATE upload_pipeline.document_chunks c SET embedding = v.e::vector, embedding_model = $3 \
             FROM UNNEST($1::uuid[], $2::text[]) AS v(id, e) WHERE c.id = v.id",
        )
        .bind(&ids)
        .bind(&literals)
        .bind(&model)
        .execute(&mut *tx)
        .await?;
    }
    // The last batch to land flips the document to ready; the row lock orders concurrent batches.
    if !lock_document(&mut tx, doc).await? {
        return Ok(());
    }
    let ready: Option<(f64,)> = sqlx::query_as(
        "UPDATE upload_pipeline.documents d SET status = 'ready', ready_at = now(), updated_at = now() \
         WHERE d.id = $1 AND d.status <> 'ready' AND d.chunks_total IS NOT NULL AND NOT EXISTS ( \
           SELECT 1 FROM upload_pipeline.document_chunks c WHERE c.document_id = d.id \
           AND (c.embedding IS NULL OR c.embedding_model IS DISTINCT FROM $2)) \
         RETURNING extract(epoch FROM now() - d.created_at)::float8",
    )
    .bind(doc)
    .bind(&model)
    .fetch_optional(&mut *tx)
    .await?;
    if ready.is_some() {
        sqlx::query(
            "UPDATE upload_pipeline.upload_jobs SET state = 'done', last_error = NULL, finished_at = now(), updated_at = now() \
             WHERE document_id = $1 AND stage = 'embed'",
        )
        .bind(doc)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    if let Some((seconds,)) = ready {
        crate::metrics::document_ready(seconds);
        tracing::info!(document_id = %doc, upload_to_queryable_seconds = seconds, "Document ready");
    }
    Ok(())
}
