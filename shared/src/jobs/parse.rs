//! The parse stage: uploaded bytes to Markdown sections (`document_parsed`), then the chunk job. Results of
//! remote parsers are cached by (file SHA-256, parser with its settings): a known file costs no second call.

use std::sync::Arc;

use super::{
    Stage,
    pipeline::{
        Heartbeat, Pipeline, StageError, StageJob, advance, current, ensure_claim, lock_document,
        settle_failure, start,
    },
};
use crate::{
    db,
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
    let Some(now) = current(&p.pool, user, doc, Stage::Parse).await? else {
        tracing::info!(document_id = %doc, "The document was deleted; nothing to parse");
        return Ok(());
    };
    if now.job_state.as_deref() == Some("done") {
        // Delivered again after the stage committed (the ack or the next push was lost): make sure the next
        // stage runs (the push is a no-op when its job is live).
        if now.status == Stage::Chunk.document_status() {
            p.push_chunk(doc, user).await?;
        }
        return Ok(());
    }
    if !start(&p.pool, user, doc, Stage::Parse, delivery.attempt).await? {
        tracing::info!(document_id = %doc, status = %now.status, "Nothing to parse: the document or its parse stage has moved on");
        return Ok(());
    }
    let _heartbeat = Heartbeat::start(p, user, doc, Stage::Parse);

    let mut tx = db::begin_as(&p.pool, user).await?;
    let row: Option<(String, String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT d.filename, d.content_type, d.sha256, b.bytes FROM upload_pipeline.documents d \
         JOIN upload_pipeline.document_bytes b ON b.document_id = d.id WHERE d.id = $1",
    )
    .bind(doc)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    let Some((filename, content_type, sha256, bytes)) = row else {
        // A deleted document takes its stage row with it (this job found it above): bytes missing under a live
        // row cannot come back by waiting.
        return Err(StageError::Permanent(
            "the uploaded bytes of this document are missing".into(),
        ));
    };
    let kind = DocKind::from_content_type(&content_type).ok_or_else(|| {
        StageError::Permanent(format!("no parser for content type {content_type}"))
    })?;
    let parser = p.parser.key(kind);
    let cacheable = p.parser.cacheable(kind);
    let cached = if cacheable {
        cached_sections(p, &sha256, &parser).await?
    } else {
        None
    };
    let sections = match cached {
        Some(sections) => sections,
        None => {
            let input = ParseInput {
                filename,
                kind,
                bytes: Arc::new(bytes),
            };
            ensure_claim(delivery)?;
            p.parser.parse(&input).await?
        }
    };

    let mut tx = db::begin_as(&p.pool, user).await?;
    if !lock_document(&mut tx, doc).await? {
        return Ok(());
    }
    if !advance(&mut tx, user, doc, Stage::Parse).await? {
        // Another copy finished first, or the document failed or was retried meanwhile: write nothing.
        tracing::info!(document_id = %doc, "Parsed, but the parse stage is no longer this job's; nothing written");
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO upload_pipeline.document_parsed (document_id, user_id, parser, sections) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (document_id) DO UPDATE SET parser = excluded.parser, sections = excluded.sections, created_at = now()",
    )
    .bind(doc)
    .bind(user)
    .bind(&parser)
    .bind(sqlx::types::Json(&sections))
    .execute(&mut *tx)
    .await?;
    if cacheable {
        sqlx::query(
            "INSERT INTO upload_pipeline.parse_cache (file_sha256, parser, sections) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&sha256)
        .bind(&parser)
        .bind(sqlx::types::Json(&sections))
        .execute(&mut *tx)
        .await?;
    }
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

/// The cached sections of a file for `parser`, recording the hit or miss.
async fn cached_sections(
    p: &Pipeline,
    sha256: &str,
    parser: &str,
) -> Result<Option<Vec<Section>>, StageError> {
    let row: Option<(sqlx::types::Json<Vec<Section>>,)> = sqlx::query_as(
        "SELECT sections FROM upload_pipeline.parse_cache WHERE file_sha256 = $1 AND parser = $2",
    )
    .bind(sha256)
    .bind(parser)
    .fetch_optional(&p.pool)
    .await?;
    let hit = row.is_some();
    crate::metrics::cache_lookups("parse", hit as u64, !hit as u64);
    Ok(row.map(|(s,)| s.0))
}
