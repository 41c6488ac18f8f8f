//! The chunk stage: parsed sections to chunks (upserted by document and index), then embed jobs in batches so a
//! long document spreads over every embed replica.

use super::{
    JobState, Stage, content,
    pipeline::{Heartbeat, Pipeline, StageError, StageJob, settle_failure},
    store,
};
use crate::{
    chunking::Chunk,
    db,
    documents::DocumentStatus,
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

async fn chunk(p: &Pipeline, job: &StageJob, delivery: &Delivery) -> Result<(), StageError> {
    let (doc, user) = (job.document_id, job.user_id);
    let Some(now) = store::current(&p.pool, user, doc, Stage::Chunk).await? else {
        return Ok(());
    };
    if now.job_state == Some(JobState::Done) {
        if now.status == DocumentStatus::Embedding {
            let missing = missing_embeddings(p, user, doc).await?;
            p.push_embed(doc, user, &missing).await?;
        }
        return Ok(());
    }
    if !store::start(&p.pool, user, doc, Stage::Chunk, delivery.attempt).await? {
        tracing::info!(document_id = %doc, status = %now.status, "Nothing to chunk: the document or its chunk stage has moved on");
        return Ok(());
    }
    let _heartbeat = Heartbeat::start(p, user, doc, Stage::Chunk);

    let Some(sections) = content::parsed(&p.pool, user, doc).await? else {
        return Err(StageError::Retryable {
            message: "the parsed document is not there yet".into(),
            after: None,
        });
    };
    let chunks = split(p, sections).await?;

    let mut tx = db::begin_as(&p.pool, user).await?;
    if !store::lock_document(&mut tx, doc).await? {
        return Ok(());
    }
    if !store::advance(&mut tx, user, doc, Stage::Chunk).await? {
        tracing::info!(document_id = %doc, "Chunked, but the chunk stage is no longer this job's; nothing written");
        return Ok(());
    }
    content::save_chunks(&mut tx, doc, user, &chunks).await?;
    tx.commit().await?;
    tracing::info!(document_id = %doc, chunks = chunks.len(), "Chunked");
    let pushed = async {
        let missing = missing_embeddings(p, user, doc).await?;
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

/// The sections split into token-bounded chunks; a document with no text fails.
async fn split(p: &Pipeline, sections: Vec<Section>) -> Result<Vec<Chunk>, StageError> {
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
    Ok(chunks)
}

/// Indices of the chunks of a document still without a vector of the current model (for the reconciler).
pub async fn missing_embeddings(
    p: &Pipeline,
    user: uuid::Uuid,
    doc: uuid::Uuid,
) -> Result<Vec<u32>, StageError> {
    Ok(content::unembedded(&p.pool, user, doc, p.embedder.model()).await?)
}
