//! The parse stage: uploaded bytes to Markdown sections (`document_parsed`), then the chunk job.

use std::time::Duration;

use super::pipeline::{
    Pipeline, StageError, StageJob, advance, current, lock_document, settle_failure, start,
};
use crate::{
    db,
    parsing::{self, DocKind, Limits, ParseError},
    queue::{Delivery, JobError},
};

/// Runs one parse job. Idempotent: a redelivered job whose stage is done only pushes the next job again.
pub async fn run(p: Pipeline, job: StageJob, delivery: Delivery) -> Result<(), JobError> {
    match parse(&p, &job, &delivery).await {
        Ok(()) => Ok(()),
        Err(e) => settle_failure(&p, job.user_id, job.document_id, "parse", &delivery, e).await,
    }
}

async fn parse(p: &Pipeline, job: &StageJob, delivery: &Delivery) -> Result<(), StageError> {
    let (doc, user) = (job.document_id, job.user_id);
    let Some(now) = current(&p.pool, user, doc, "parse").await? else {
        tracing::info!(document_id = %doc, "The document was deleted; nothing to parse");
        return Ok(());
    };
    if now.job_state.as_deref() == Some("done") {
        // Delivered again after the stage committed (the ack was lost): make sure the next stage runs.
        p.push_chunk(doc, user).await?;
        return Ok(());
    }
    start(&p.pool, user, doc, "parse", "parsing", delivery.attempt).await?;

    let mut tx = db::begin_as(&p.pool, user).await?;
    let row: Option<(String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT d.filename, d.content_type, b.bytes FROM upload_pipeline.documents d \
         JOIN upload_pipeline.document_bytes b ON b.document_id = d.id WHERE d.id = $1",
    )
    .bind(doc)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    let Some((filename, content_type, bytes)) = row else {
        return Ok(());
    };
    let kind = DocKind::from_content_type(&content_type).ok_or_else(|| {
        StageError::Permanent(format!("no parser for content type {content_type}"))
    })?;
    let limits = Limits {
        max_pages: p.settings.pipeline.max_pages,
        max_chars: p.settings.pipeline.max_chars,
    };
    let timeout = p.settings.pipeline.parse_timeout;
    let parsed = tokio::time::timeout(
        timeout,
        tokio::task::spawn_blocking(move || parsing::parse(kind, &bytes, limits)),
    )
    .await;
    let sections = match parsed {
        Err(_) => {
            return Err(StageError::Permanent(format!(
                "parsing took longer than {}",
                humantime(timeout)
            )));
        }
        // The parser panicked on this input: the same bytes would panic again.
        Ok(Err(join)) => {
            return Err(StageError::Permanent(format!(
                "the parser crashed on this file: {join}"
            )));
        }
        Ok(Ok(Err(e))) => return Err(StageError::Permanent(parse_reason(&filename, &e))),
        Ok(Ok(Ok(sections))) => sections,
    };
    let parser = format!(
        "local:{}",
        serde_json::to_value(kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    );
    let mut tx = db::begin_as(&p.pool, user).await?;
    if !lock_document(&mut tx, doc).await? {
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
    advance(&mut tx, user, doc, "parse", "chunk", "chunking").await?;
    tx.commit().await?;
    tracing::info!(document_id = %doc, sections = sections.len(), %parser, "Parsed");
    if let Err(e) = p.push_chunk(doc, user).await {
        tracing::warn!(document_id = %doc, error = %e, "Could not push the chunk job; the reconciler will");
    }
    Ok(())
}

fn parse_reason(filename: &str, e: &ParseError) -> String {
    format!("{filename}: {e}")
}

fn humantime(d: Duration) -> String {
    format!("{:.0} s", d.as_secs_f64())
}
