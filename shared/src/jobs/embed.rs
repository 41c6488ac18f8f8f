//! The embed stage: one batch of chunks to vectors; the batch that completes a document makes it `ready`
//! (decided in SQL under the document's row lock) and records its upload-to-queryable time. Vectors of a
//! cacheable embedder are kept by (model, dimensions, text SHA-256): a text seen before costs no second call.

use super::{
    Stage,
    content::{self, Batch},
    pipeline::{EmbedJob, Heartbeat, Pipeline, StageError, ensure_claim, settle_failure},
    store,
};
use crate::{
    db,
    documents::DocumentStatus,
    providers::PartialEmbedding,
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

/// Stores the vectors a call got before it failed part-way (`rows`' first ones), on their own: the call's error
/// is what the job reports, so a failure to store them is only logged.
async fn keep_partial(
    p: &Pipeline,
    user: uuid::Uuid,
    batch: &Batch<'_>,
    rows: &[content::Pending],
    vectors: &[Vec<f32>],
    cacheable: bool,
) {
    if rows.is_empty() {
        return;
    }
    let literals: Vec<String> = vectors.iter().map(|v| vector_literal(v)).collect();
    let kept: Result<(), db::DbError> = async {
        let mut tx = db::begin_as(&p.pool, user).await?;
        content::save_vectors(&mut tx, batch, rows, &literals, cacheable).await?;
        tx.commit().await?;
        Ok(())
    }
    .await;
    match kept {
        Ok(()) => tracing::info!(
            document_id = %batch.doc,
            kept = rows.len(),
            "An embedding call failed part-way; the vectors it got are kept"
        ),
        Err(e) => tracing::warn!(
            document_id = %batch.doc,
            error = %e,
            "An embedding call failed part-way and the vectors it got could not be kept"
        ),
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
    let Some(now) = store::current(&p.pool, user, doc, Stage::Embed).await? else {
        return Ok(());
    };
    // A ready document needs nothing; a failed one stays failed (a batch that gave up failed it, and no sibling
    // batch may bring it back): only a retry request re-opens it.
    if now.status != DocumentStatus::Embedding
        || !store::start(&p.pool, user, doc, Stage::Embed, delivery.attempt).await?
    {
        return Ok(());
    }
    let _heartbeat = Heartbeat::start(p, user, doc, Stage::Embed);

    let cacheable = p.embedder.cacheable();
    let batch = Batch {
        doc,
        first: job.first as i32,
        end: (job.first + job.count) as i32,
        model: &model,
        dimensions: p.embedder.dimensions() as i32,
    };
    let mut tx = db::begin_as(&p.pool, user).await?;
    let hits = if cacheable {
        content::vectors_from_cache(&mut tx, &batch).await?
    } else {
        0
    };
    let rows = content::pending(&mut tx, &batch).await?;
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
        match p.embedder.embed_keeping(&texts).await {
            Ok(vectors) => vectors,
            Err(PartialEmbedding { done, error }) => {
                // The requests that were answered are paid for: their vectors are kept, and the job's next
                // attempt embeds only the rest.
                keep_partial(
                    p,
                    user,
                    &batch,
                    &rows[..done.len().min(rows.len())],
                    &done,
                    cacheable,
                )
                .await;
                return Err(error.into());
            }
        }
    };
    let mut tx = db::begin_as(&p.pool, user).await?;
    if !rows.is_empty() {
        let literals: Vec<String> = vectors.iter().map(|v| vector_literal(v)).collect();
        content::save_vectors(&mut tx, &batch, &rows, &literals, cacheable).await?;
    }
    // The last batch to land flips the document to ready; the row lock orders concurrent batches.
    if !store::lock_document(&mut tx, doc).await? {
        return Ok(());
    }
    let ready = store::finish_embedding(&mut tx, doc, &model).await?;
    tx.commit().await?;
    if let Some(seconds) = ready {
        crate::metrics::document_ready(seconds);
        tracing::info!(document_id = %doc, upload_to_queryable_seconds = seconds, "Document ready");
    }
    Ok(())
}
