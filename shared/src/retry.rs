//! Recovering failed documents: a failed document re-runs from the stage that gave up, and operators see the
//! fleet's failures by stage and reason.
//!
//! A failed document has one stage row in state `dead`, with the reason. [`retry`] queues that stage again in
//! one transaction under the owner's row-level security, as compare-and-sets on the states it read, and keeps
//! what the earlier stages produced (parsed sections, chunks, vectors); the stage's job is pushed after the
//! commit. Every door uses it: `POST /v1/documents/{id}/retry`, a re-upload of the same bytes, and
//! `producer retry` through [`retry_failed`], which retries each match under its owner's identity.
//!
//! [`failures`] and [`failure_counts`] read every user's failures through the SECURITY DEFINER functions of
//! `migrations/20261130000002_retry.sql` (`GET /v1/admin/failures`, `producer failures`).

use std::{collections::BTreeMap, sync::Arc};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    db::{self, DbError},
    documents::{self, Document, DocumentStatus},
    jobs::{JobState, Pipeline, Stage, store},
    queue::{Broker, QueueError},
    settings::Settings,
};

/// A point in time, as the failure filters take it.
pub type Timestamp = DateTime<Utc>;

/// What a [`retry`] did.
#[derive(Debug)]
pub enum RetryOutcome {
    /// The stage that gave up is queued again and its job pushed.
    Requeued {
        /// The stage the document re-runs from; the stages before it keep their results.
        stage: Stage,
        /// The document as the retry committed it, before any worker took it up.
        document: Box<Document>,
    },
    /// The document is not failed: nothing changed.
    NotFailed {
        /// Its status.
        status: DocumentStatus,
    },
    /// The failed stage's row was not in the state read a moment before (a late copy of a job settled it
    /// meanwhile), or the document has no stage row to re-run: nothing changed.
    Raced,
    /// No such document for this user (also another user's).
    NotFound,
}

/// The document status a stage starts from when it is queued again: `queued` before parsing, the stage's own
/// status for the later stages (the status a redelivered job of that stage may start from).
fn resume_status(stage: Stage) -> DocumentStatus {
    match stage {
        Stage::Parse => DocumentStatus::Queued,
        Stage::Chunk => DocumentStatus::Chunking,
        // Synthetic work has no document: the CHECK constraint of `upload_jobs.stage` keeps it out.
        Stage::Embed | Stage::Synthetic => DocumentStatus::Embedding,
    }
}

/// The stage a failed document re-runs from: the row in state `dead`, else (a document failed before stages were
/// marked dead) the first stage not done, else the first stage. `rows` are in pipeline order.
/// `failed_documents()` in SQL picks by the same rule.
fn failed_stage(rows: &[(Stage, JobState)]) -> Option<(Stage, JobState)> {
    rows.iter()
        .copied()
        .min_by_key(|(_, state)| (*state != JobState::Dead, *state == JobState::Done))
}

/// Queues a failed document again from the stage that gave up, keeping what the earlier stages produced, then
/// pushes that stage's job (the chunks still without a vector, for the embed stage). Runs under `user`'s
/// row-level security: another user's document is [`RetryOutcome::NotFound`].
///
/// A push that fails after the commit is only logged: the stage is durably queued, and the reconciler pushes it.
pub async fn retry(p: &Pipeline, user: Uuid, id: Uuid) -> Result<RetryOutcome, DbError> {
    let mut tx = db::begin_as(&p.pool, user).await?;
    let Some(status) = store::lock_status(&mut tx, id).await? else {
        return Ok(RetryOutcome::NotFound);
    };
    if status != DocumentStatus::Failed {
        return Ok(RetryOutcome::NotFailed { status });
    }
    let rows = store::lock_stages(&mut tx, id).await?;
    let Some((stage, state)) = failed_stage(&rows) else {
        return Ok(RetryOutcome::Raced);
    };
    if !store::reopen(&mut tx, id, stage, state, resume_status(stage)).await? {
        // Dropping the transaction rolls both back.
        return Ok(RetryOutcome::Raced);
    }
    let Some(document) = documents::fetch(&mut tx, id).await? else {
        return Ok(RetryOutcome::Raced);
    };
    tx.commit().await?;
    tracing::info!(document_id = %id, stage = stage.as_str(), previous_state = %state, "Failed document queued again from the stage that gave up");
    if let Err(e) = push(p, user, id, stage).await {
        tracing::warn!(document_id = %id, stage = stage.as_str(), error = %e, "Could not push the retried stage's job; the reconciler will");
    }
    Ok(RetryOutcome::Requeued {
        stage,
        document: Box::new(document),
    })
}

/// Pushes the job of a stage queued again; a copy still live (the failed job being settled) runs it once more
/// when it ends instead of swallowing the push.
async fn push(p: &Pipeline, user: Uuid, id: Uuid, stage: Stage) -> Result<(), String> {
    p.requeue(id, user, stage)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Which failed documents an operator means; every field unset means all of them.
#[derive(Debug, Clone, Default)]
pub struct FailureFilter {
    /// Only documents that failed at this stage.
    pub stage: Option<Stage>,
    /// Only documents that failed at or after this time.
    pub since: Option<Timestamp>,
    /// Only this user's documents.
    pub user: Option<Uuid>,
}

/// A failed document, as operators list it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, sqlx::FromRow, utoipa::ToSchema)]
pub struct FailedDocument {
    /// The document.
    pub document_id: Uuid,
    /// Its owner.
    pub user_id: Uuid,
    /// The stage that gave up (the one a retry re-runs): `parse`, `chunk` or `embed`.
    pub stage: String,
    /// The error its owner sees: `<stage>: <reason>`.
    pub error: Option<String>,
    /// The reason recorded on the stage.
    pub reason: Option<String>,
    /// When it failed.
    pub failed_at: DateTime<Utc>,
}

/// How many documents failed at a stage for one reason.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, sqlx::FromRow, utoipa::ToSchema)]
pub struct FailureCount {
    /// The stage that gave up.
    pub stage: String,
    /// The reason recorded on the stage.
    pub reason: Option<String>,
    /// How many documents.
    pub documents: i64,
    /// The latest of their failures.
    pub last_failed_at: DateTime<Utc>,
}

/// Up to `limit` failed documents matching `filter`, fleet-wide, newest failure first.
pub async fn failures(
    pool: &PgPool,
    filter: &FailureFilter,
    limit: u32,
) -> Result<Vec<FailedDocument>, DbError> {
    page(pool, filter, limit, None).await
}

/// Failed documents matching `filter`, newest first, older than `before` when given (keyset paging).
async fn page(
    pool: &PgPool,
    filter: &FailureFilter,
    limit: u32,
    before: Option<(Timestamp, Uuid)>,
) -> Result<Vec<FailedDocument>, DbError> {
    let mut tx = operator(pool).await?;
    let rows = sqlx::query_as(
        "SELECT document_id, user_id, stage, error, reason, failed_at \
         FROM upload_pipeline.failed_documents($1, $2, $3, $4, $5, $6)",
    )
    .bind(filter.stage.map(Stage::as_str))
    .bind(filter.since)
    .bind(filter.user)
    .bind(limit.min(i32::MAX as u32) as i32)
    .bind(before.map(|b| b.0))
    .bind(before.map(|b| b.1))
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows)
}

/// A transaction that reads the whole fleet's failures: the functions show every user's only when asked
/// (`upload_pipeline.operator`), so a session that forgot to set its user sees nothing rather than everything.
async fn operator(pool: &PgPool) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, DbError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('upload_pipeline.operator', 'on', true)")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Every failed document matching `filter`, counted by stage and reason, most frequent first.
pub async fn failure_counts(
    pool: &PgPool,
    filter: &FailureFilter,
) -> Result<Vec<FailureCount>, DbError> {
    let mut tx = operator(pool).await?;
    let rows = sqlx::query_as(
        "SELECT stage, reason, documents, last_failed_at FROM upload_pipeline.failure_counts($1, $2, $3)",
    )
    .bind(filter.stage.map(Stage::as_str))
    .bind(filter.since)
    .bind(filter.user)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows)
}

/// What [`retry_failed`] did.
#[derive(Debug, Default)]
pub struct RetryReport {
    /// Documents queued again, by the stage they re-run from.
    pub requeued: BTreeMap<Stage, u64>,
    /// Matching documents that were no longer failed when their turn came (retried meanwhile, or deleted).
    pub skipped: u64,
    /// Documents whose retry failed, with the error.
    pub errors: Vec<(Uuid, String)>,
}

impl RetryReport {
    /// Documents queued again, all stages together.
    pub fn total(&self) -> u64 {
        self.requeued.values().sum()
    }
}

/// Documents listed per query while retrying.
const RETRY_PAGE: u32 = 500;

/// Retries every failed document matching `filter`, each under its owner's identity through [`retry`]. Walks
/// the failures newest first in keyset pages, so a document that fails again while this runs (it is then newer
/// than the walk's position) is not retried twice. One document's error does not stop the others.
pub async fn retry_failed(p: &Pipeline, filter: &FailureFilter) -> Result<RetryReport, DbError> {
    let mut report = RetryReport::default();
    let mut before = None;
    loop {
        let found = page(&p.pool, filter, RETRY_PAGE, before).await?;
        let Some(last) = found.last() else { break };
        before = Some((last.failed_at, last.document_id));
        for f in &found {
            match retry(p, f.user_id, f.document_id).await {
                Ok(RetryOutcome::Requeued { stage, .. }) => {
                    *report.requeued.entry(stage).or_default() += 1;
                }
                Ok(_) => report.skipped += 1,
                Err(e) => report.errors.push((f.document_id, e.to_string())),
            }
        }
        if found.len() < RETRY_PAGE as usize {
            break;
        }
    }
    Ok(report)
}

/// A pipeline for operator commands that queue stages again but never call a provider: the local parser, and a
/// hashing embedder standing in under the configured model's name and width (a retry only reads the model's
/// name, to find the chunks still without its vector), so the command neither loads a model nor needs a key.
pub fn operator_pipeline(
    pool: PgPool,
    broker: &Broker,
    settings: Arc<Settings>,
) -> Result<Pipeline, QueueError> {
    let embedding = &settings.embedding;
    let embedder = Arc::new(crate::providers::hashing::HashingEmbedder::new(
        &embedding.model,
        embedding.dimensions as usize,
    ));
    let parser = Arc::new(crate::providers::local::LocalParser::new(
        &settings.pipeline,
    ));
    Pipeline::new(pool, broker, embedder, parser, settings)
}

/// Reads a `--since`: an RFC 3339 time (`2026-11-30T08:00:00Z`), or a duration before now (`2h`, `30m`, `1day`).
pub fn parse_since(text: &str) -> Result<Timestamp, String> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let ago = humantime_serde::re::humantime::parse_duration(text).map_err(|e| {
        format!(
            "expected an RFC 3339 time (2026-11-30T08:00:00Z) or a duration before now (2h, 30m, 1day), got {text:?}: {e}"
        )
    })?;
    let ago = chrono::Duration::from_std(ago).map_err(|_| format!("{text:?} is too long ago"))?;
    Utc::now()
        .checked_sub_signed(ago)
        .ok_or_else(|| format!("{text:?} is too long ago"))
}

#[cfg(test)]
mod tests {
    use super::*;

    use JobState::{Dead, Done, Failed};

    #[test]
    fn a_document_re_runs_from_its_dead_stage_else_from_its_first_stage_not_done() {
        let dead_embed = [
            (Stage::Parse, Done),
            (Stage::Chunk, Done),
            (Stage::Embed, Dead),
        ];
        assert_eq!(failed_stage(&dead_embed).unwrap().0, Stage::Embed);
        let dead_chunk = [(Stage::Parse, Done), (Stage::Chunk, Dead)];
        assert_eq!(failed_stage(&dead_chunk).unwrap().0, Stage::Chunk);
        let no_dead = [(Stage::Parse, Done), (Stage::Chunk, Failed)];
        assert_eq!(failed_stage(&no_dead).unwrap().0, Stage::Chunk);
        let all_done = [(Stage::Parse, Done), (Stage::Chunk, Done)];
        assert_eq!(failed_stage(&all_done).unwrap().0, Stage::Parse);
        assert!(failed_stage(&[]).is_none());
        assert_eq!(resume_status(Stage::Parse).as_str(), "queued");
        assert_eq!(resume_status(Stage::Chunk).as_str(), "chunking");
        assert_eq!(resume_status(Stage::Embed).as_str(), "embedding");
    }

    #[test]
    fn since_takes_a_time_or_a_duration_before_now() {
        let at = parse_since("2026-11-30T08:00:00Z").unwrap();
        assert_eq!(at.to_rfc3339(), "2026-11-30T08:00:00+00:00");
        let two_hours = parse_since("2h").unwrap();
        let ago = Utc::now() - two_hours;
        assert!(
            (ago.num_seconds() - 7200).abs() < 60,
            "{}",
            ago.num_seconds()
        );
        let err = parse_since("yesterday").unwrap_err();
        assert!(
            err.contains("RFC 3339") && err.contains("yesterday"),
            "{err}"
        );
    }
}
