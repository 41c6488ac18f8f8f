//! The parse stage: uploaded bytes to Markdown sections (`document_parsed`), then the chunk job. Results of
//! remote parsers are cached by (file SHA-256, parser with its settings): a known file costs no second call.

use std::sync::Arc;

use super::{
    JobState, Stage, content,
    pipeline::{Heartbeat, Pipeline, StageError, StageJob, ensure_claim, settle_failure},
    store,
};
use crate::{
    db,
    documents::DocumentStatus,
    parsing::{DocKind, Section},
    providers::ParseInput,
    queue::{Delivery, JobError},
};

/// Runs one parse job. Idempotent: a redelivered job whose stage is done only pushes the next job again.
pub async fn run(p: Pipeline, job: StageJob, delivery: Delivery) -> Result<(), JobError> {
    match parse(&p, &job, &delivery).await {
        Ok(()) => Ok(()),
        Err(e) => {
            settle_failure(&p, job.user_id, job.document_id, Stage::Parse, &delivery, e).await
        }
    }
}

async fn parse(p: &Pipeline, job: &StageJob, delivery: &Delivery) -> Result<(), StageError> {
    let (doc, user) = (job.document_id, job.user_id);
    let Some(now) = store::current(&p.pool, user, doc, Stage::Parse).await? else {
        tracing::info!(document_id = %doc, "The document was deleted; nothing to parse");
        return Ok(());
    };
    if now.job_state == Some(JobState::Done) {
        // Delivered again after the stage committed (the ack or the next push was lost): make sure the next
        // stage runs (the push is a no-op when its job is live).
        if now.status == DocumentStatus::Chunking {
            p.push_chunk(doc, user).await?;
        }
        return Ok(());
    }
    if !store::start(&p.pool, user, doc, Stage::Parse, delivery.attempt).await? {
        tracing::info!(document_id = %doc, status = %now.status, "Nothing to parse: the document or its parse stage has moved on");
        return Ok(());
    }
    let _heartbeat = Heartbeat::start(p, user, doc, Stage::Parse);

    let Some(source) = content::source(&p.pool, user, doc).await? else {
        // A deleted document takes its stage row with it (this job found it above): bytes missing under a live
        // row cannot come back by waiting.
        return Err(StageError::Permanent(
            "the uploaded bytes of this document are missing".into(),
        ));
    };
    let kind = DocKind::from_content_type(&source.content_type).ok_or_else(|| {
        StageError::Permanent(format!(
            "no parser for content type {}",
            source.content_type
        ))
    })?;
    let parser = p.parser.key(kind);
    let cacheable = p.parser.cacheable(kind);
    let sha256 = source.sha256.clone();
    let sections = sections(p, delivery, source, kind, (&parser, cacheable)).await?;

    let mut tx = db::begin_as(&p.pool, user).await?;
    if !store::lock_document(&mut tx, doc).await? {
        return Ok(());
    }
    if !store::advance(&mut tx, user, doc, Stage::Parse).await? {
        // Another copy finished first, or the document failed or was retried meanwhile: write nothing.
        tracing::info!(document_id = %doc, "Parsed, but the parse stage is no longer this job's; nothing written");
        return Ok(());
    }
    content::save_parsed(
        &mut tx,
        (doc, user),
        (&sha256, &parser),
        &sections,
        cacheable,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(document_id = %doc, sections = sections.len(), %parser, "Parsed");
    if let Err(e) = p.push_chunk(doc, user).await {
        // The job is not acknowledged: its redelivery finds the stage done and pushes the chunk job.
        return Err(StageError::Unfinished(format!(
            "parsed, but the chunk job could not be pushed: {e}"
        )));
    }
    Ok(())
}

/// The document's sections: from the cache when `parser` is cacheable and has seen the file, else from the
/// parser.
async fn sections(
    p: &Pipeline,
    delivery: &Delivery,
    source: content::Source,
    kind: DocKind,
    (parser, cacheable): (&str, bool),
) -> Result<Vec<Section>, StageError> {
    if cacheable {
        let cached = content::cached_sections(&p.pool, &source.sha256, parser).await?;
        let hit = cached.is_some();
        crate::metrics::cache_lookups("parse", hit as u64, !hit as u64);
        if let Some(sections) = cached {
            return Ok(sections);
        }
    }
    let input = ParseInput {
        filename: source.filename,
        kind,
        bytes: Arc::new(source.bytes),
    };
    ensure_claim(delivery)?;
    Ok(p.parser.parse(&input).await?)
}
