//! The embed stage: one batch of chunks to vectors; the batch that completes a document makes it `ready`
//! (decided in SQL under the document's row lock) and records its upload-to-queryable time. Vectors of a
//! cacheable embedder are kept by (model, dimensions, text SHA-256): a text seen before costs no second call.

use super::{
    Stage,
    pipeline::{
        EmbedJob, Heartbeat, Pipeline, StageError, current, ensure_claim, lock_document,
        settle_failure, start,
    },
};
use crate::{
    db,
    queue::{Delivery, JobError},
};

/// Runs one embed job. Idempotent: only chunks without a vector of the current model are embedded.
pub async fn run(p: Pipeline, job: EmbedJob, delivery: Delivery) -> Result<(), JobError> {
    match embed(&p, &job, &delivery).await {
        Ok(()) => Ok(()),
        Err(e) => {
            settle_failure(&p, job.user_id, job.document_id, Stage::Embed, &delivery, e).await
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
    let Some(now) = current(&p.pool, user, doc, Stage::Embed).await? else {
        return Ok(());
    };
    // A ready document needs nothing; a failed one stays failed (a batch that gave up failed it, and no sibling
    // batch may bring it back): only a retry request re-opens it.
    if now.status != Stage::Embed.document_status()
        || !start(&p.pool, user, doc, Stage::Embed, delivery.attempt).await?
    {
        return Ok(());
    }
    let _heartbeat = Heartbeat::start(p, user, doc, Stage::Embed);

    let cacheable = p.embedder.cacheable();
    let dims = p.embedder.dimensions() as i32;
    let mut tx = db::begin_as(&p.pool, user).await?;
    let hits = if cacheable {
        sqlx::query(
            "UPDATE upload_pipeline.document_chunks c SET embedding = e.embedding, embedding_model = $4 \
             FROM upload_pipeline.embedding_cache e \
             WHERE c.document_id = $1 AND c.chunk_index >= $2 AND c.chunk_index < $3 \
             AND (c.embedding IS NULL OR c.embedding_model IS DISTINCT FROM $4) \
             AND e.model = $4 AND e.dimensions = $5 AND e.text_sha256 = c.content_sha256",
        )
        .bind(doc)
        .bind(job.first as i32)
        .bind((job.first + job.count) as i32)
        .bind(&model)
        .bind(dims)
        .execute(&mut *tx)
        .await?
        .rows_affected()
    } else {
        0
    };
    let rows: Vec<(uuid::Uuid, String, String)> = sqlx::query_as(
        "SELECT id, content, content_sha256 FROM upload_pipeline.document_chunks WHERE document_id = $1 AND chunk_index >= $2 AND chunk_index < $3 \
         AND (embedding IS NULL OR embedding_model IS DISTINCT FROM $4) ORDER BY chunk_index",
    )
    .bind(doc)
    .bind(job.first as i32)
    .bind((job.first + job.count) as i32)
    .bind(&model)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    if cacheable {
        crate::metrics::cache_lookups("embedding", hits, rows.len() as u64);
    }

    // The provider is called before the transaction opens: a transaction held across a network call keeps a
    // pooled connection idle in transaction for the call's length, and its now() (which stamps ready_at and
    // finished_at) would be the moment before the call, not the commit. `make bench` caught both: documents
    // reported ready 100-300 ms before they were.
    let vectors = if rows.is_empty() {
        Vec::new()
    } else {
        let texts: Vec<String> = rows.iter().map(|(_, c, _)| c.clone()).collect();
        ensure_claim(delivery)?;
        p.embedder.embed(&texts).await?
    };
    let mut tx = db::begin_as(&p.pool, user).await?;
    if !rows.is_empty() {
        let ids: Vec<uuid::Uuid> = rows.iter().map(|(id, _, _)| *id).collect();
        let literals: Vec<String> = vectors.iter().map(|v| vector_literal(v)).collect();
        let hashes: Vec<&str> = rows.iter().map(|(_, _, h)| h.as_str()).collect();
        // A vector lands only on the text it was computed from: a chunk re-chunked meanwhile keeps no stale vector.
        sqlx::query(
            "UPDATE upload_pipeline.document_chunks c SET embedding = v.e::vector, embedding_model = $3 \
             FROM UNNEST($1::uuid[], $2::text[], $4::text[]) AS v(id, e, h) WHERE c.id = v.id AND c.content_sha256 = v.h",
        )
        .bind(&ids)
        .bind(&literals)
        .bind(&model)
        .bind(&hashes)
        .execute(&mut *tx)
        .await?;
        if cacheable {
            sqlx::query(
                "INSERT INTO upload_pipeline.embedding_cache (model, dimensions, text_sha256, embedding) \
                 SELECT $1, $2, v.h, v.e::vector FROM UNNEST($3::text[], $4::text[]) AS v(h, e) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&model)
            .bind(dims)
            .bind(&hashes)
            .bind(&literals)
            .execute(&mut *tx)
            .await?;
        }
    }
    // The last batch to land flips the document to ready; the row lock orders concurrent batches.
    if !lock_document(&mut tx, doc).await? {
        return Ok(());
    }
    let ready: Option<(f64,)> = sqlx::query_as(
        "UPDATE upload_pipeline.documents d SET status = 'ready', ready_at = now(), updated_at = now() \
         WHERE d.id = $1 AND d.status = 'embedding' AND d.chunks_total IS NOT NULL AND NOT EXISTS ( \
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
             WHERE document_id = $1 AND stage = 'embed' AND state IN ('queued', 'running', 'failed')",
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
