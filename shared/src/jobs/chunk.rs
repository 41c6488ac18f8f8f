//! The chunk stage: parsed sections to chunks (upserted by document and index), then embed jobs in batches so a
//! long document spreads over every embed replica.

use super::{
    Stage,
    pipeline::{
        Heartbeat, Pipeline, StageError, StageJob, advance, current, lock_document, settle_failure,
        start,
    },
};
use crate::{
    db,
    helper::{ChunkFailure, ChunkSizes, chunk_bounded},
    parsing::Section,
    queue::{Delivery, JobError},
};

/// Runs one chunk job. Idempotent: chunks are upserted by (document, index), and an unchanged chunk keeps its
/// embedding.
pub async fn run(p: Pipeline, job: StageJob, delivery: Delivery) -> Result<(), JobError> {
    match chunk(&p, &job, &delivery).await {
        Ok(()) => Ok(()),
        Err(e) => {
            settle_failure(&p, job.user_id, job.document_id, Stage::Chunk, &delivery, e).await
        }
    }
}

async fn unembedded(
    p: &Pipeline,
    user: uuid::Uuid,
    doc: uuid::Uuid,
) -> Result<Vec<u32>, StageError> {
    let mut tx = db::begin_as(&p.pool, user).await?;
    let rows: Vec<(i32,)> = sqlx::query_as(
        "SELECT chunk_index FROM upload_pipeline.document_chunks \
         WHERE document_id = $1 AND (embedding IS NULL OR embedding_model IS DISTINCT FROM $2) ORDER BY chunk_index",
    )
    .bind(doc)
    .bind(p.embedder.model())
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows.into_iter().map(|(i,)| i as u32).collect())
}

async fn chunk(p: &Pipeline, job: &StageJob, delivery: &Delivery) -> Result<(), StageError> {
    let (doc, user) = (job.document_id, job.user_id);
    let Some(now) = current(&p.pool, user, doc, Stage::Chunk).await? else {
        return Ok(());
    };
    if now.job_state.as_deref() == Some("done") {
        if now.status == Stage::Embed.document_status() {
            let missing = unembedded(p, user, doc).await?;
            p.push_embed(doc, user, &missing).await?;
        }
        return Ok(());
    }
    if !start(&p.pool, user, doc, Stage::Chunk, delivery.attempt).await? {
        tracing::info!(document_id = %doc, status = %now.status, "Nothing to chunk: the document or its chunk stage has moved on");
        return Ok(());
    }
    let _heartbeat = Heartbeat::start(p, user, doc, Stage::Chunk);

    let mut tx = db::begin_as(&p.pool, user).await?;
    let sections: Option<(sqlx::types::Json<Vec<Section>>,)> = sqlx::query_as(
        "SELECT sections FROM upload_pipeline.document_parsed WHERE document_id = $1",
    )
    .bind(doc)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    let Some((sqlx::types::Json(sections),)) = sections else {
        return Err(StageError::Retryable {
            message: "the parsed document is not there yet".into(),
            after: None,
        });
    };
    let cfg = &p.settings.chunking;
    let sizes = ChunkSizes {
        max_tokens: cfg.max_tokens,
        overlap_tokens: cfg.overlap_tokens,
        max_chunks: cfg.max_chunks,
    };
    // Bounded like parsing, in a helper process killed at the deadline: some deeply nested Markdown (1,500 nested
    // list levels in 2 MB) keeps the splitter busy for many minutes; the document fails and its core is free.
    let pl = &p.settings.pipeline;
    let chunks = chunk_bounded(sections, sizes, pl.parse_memory_mb, pl.parse_timeout)
        .await
        .map_err(|e| match e {
            ChunkFailure::Document(m) => StageError::Permanent(m),
            ChunkFailure::Unavailable(message) => StageError::Retryable {
                message,
                after: None,
            },
        })?;
    if chunks.is_empty() {
        return Err(StageError::Permanent(
            "the document has no text to index".into(),
        ));
    }

    let mut tx = db::begin_as(&p.pool, user).await?;
    if !lock_document(&mut tx, doc).await? {
        return Ok(());
    }
    if !advance(&mut tx, user, doc, Stage::Chunk).await? {
        tracing::info!(document_id = %doc, "Chunked, but the chunk stage is no longer this job's; nothing written");
        return Ok(());
    }
    let indices: Vec<i32> = chunks.iter().map(|c| c.index as i32).collect();
    let contents: Vec<&str> = chunks.iter().map(|c| c.content.as_str()).collect();
    let tokens: Vec<i32> = chunks.iter().map(|c| c.token_count as i32).collect();
    let hashes: Vec<&str> = chunks.iter().map(|c| c.content_sha256.as_str()).collect();
    let metadata: Vec<serde_json::Value> = chunks.iter().map(|c| c.metadata.clone()).collect();
    sqlx::query(
        "INSERT INTO upload_pipeline.document_chunks (document_id, user_id, chunk_index, content, token_count, content_sha256, metadata) \
         SELECT $1, $2, * FROM UNNEST($3::int[], $4::text[], $5::int[], $6::text[], $7::jsonb[]) \
         ON CONFLICT (document_id, chunk_index) DO UPDATE SET \
           embedding = CASE WHEN document_chunks.content_sha256 = excluded.content_sha256 THEN document_chunks.embedding END, \
           embedding_model = CASE WHEN document_chunks.content_sha256 = excluded.content_sha256 THEN document_chunks.embedding_model END, \
           content = excluded.content, token_count = excluded.token_count, content_sha256 = excluded.content_sha256, \
           metadata = excluded.metadata",
    )
    .bind(doc)
    .bind(user)
    .bind(&indices)
    .bind(&contents)
    .bind(&tokens)
    .bind(&hashes)
    .bind(&metadata)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "DELETE FROM upload_pipeline.document_chunks WHERE document_id = $1 AND chunk_index >= $2",
    )
    .bind(doc)
    .bind(chunks.len() as i32)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE upload_pipeline.documents SET chunks_total = $2 WHERE id = $1")
        .bind(doc)
        .bind(chunks.len() as i32)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(document_id = %doc, chunks = chunks.len(), "Chunked");
    let pushed = async {
        let missing = unembedded(p, user, doc).await?;
        p.push_embed(doc, user, &missing).await?;
        Ok::<_, StageError>(())
    };
    if let Err(e) = pushed.await {
        // Not acknowledged: the redelivery finds the stage done and pushes the missing embed jobs.
        return Err(StageError::Unfinished(format!(
            "chunked, but the embed jobs could not be pushed: {e}"
        )));
    }
    Ok(())
}

/// Indices of the chunks of a document still without a vector of the current model (for the reconciler).
pub async fn missing_embeddings(
    p: &Pipeline,
    user: uuid::Uuid,
    doc: uuid::Uuid,
) -> Result<Vec<u32>, StageError> {
    unembedded(p, user, doc).await
}
