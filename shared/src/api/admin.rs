//! The operator endpoints (tokens with the admin claim): stage queues, dead letters, failed documents and the
//! providers' quota state.

use axum::{
    Json,
    extract::{Path, Query, State, rejection::QueryRejection},
    http::HeaderMap,
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{
    ApiState,
    error::{ApiError, ErrorBody, ErrorCode},
    extract::Admin,
};
use crate::{
    jobs::Stage,
    queue::{QueueError, QueueHandle},
    retry::{FailedDocument, FailureCount, FailureFilter},
};

/// One stage queue's state.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QueueState {
    /// The stage.
    pub stage: String,
    /// Jobs waiting for a worker.
    pub pending: u64,
    /// Jobs delivered and not yet acknowledged.
    pub in_flight: u64,
    /// Attempts waiting for their retry time.
    pub delayed: u64,
    /// Dead letters.
    pub dead: u64,
    /// Age of the oldest waiting job in ms, when one waits.
    pub oldest_pending_age_ms: Option<u64>,
}

/// One dead letter.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterEntry {
    /// Its id in the dead-letter stream (what replay and purge take).
    pub id: String,
    /// The job id.
    pub job_id: String,
    /// The job's JSON payload.
    pub payload: String,
    /// Attempts it used.
    pub attempts: u32,
    /// Why it died.
    pub error: String,
    /// When it died, ms since the epoch.
    pub died_at_ms: u64,
}

/// Dead letters to act on; none (or an empty list) means all of the stage's.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterIds {
    /// Dead-letter ids, as listed.
    #[serde(default)]
    #[schema(value_type = Vec<DeadLetterId>, max_items = 10000)]
    pub ids: Vec<String>,
}

/// A dead letter's id, `<ms>-<seq>` as listed (the schema of one entry of [`DeadLetterIds::ids`]).
#[derive(ToSchema)]
#[schema(pattern = "^[0-9]{1,19}-[0-9]{1,19}$")]
#[allow(dead_code)]
pub(super) struct DeadLetterId(String);

/// How many dead letters were replayed or purged.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Moved {
    /// The count.
    pub count: u64,
}

/// One entry of the fleet's quota state.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BudgetEntry {
    /// `<provider>:<model>:<key hash>` (bucket levels), `…:cooldown`, `<provider>:pause`, `<provider>:spent:<day>`.
    pub key: String,
    /// Levels, the cool-down's end, the pause reason or the day's spend.
    pub value: String,
    /// Time to live in ms (-1: none).
    pub ttl_ms: i64,
}

/// Whether a provider was paused before the resume.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Resumed {
    /// The provider.
    pub provider: String,
    /// True if it was paused.
    pub was_paused: bool,
}

fn stage_queue(state: &ApiState, stage: &str) -> Result<QueueHandle, ApiError> {
    let stage: Stage = stage.parse().map_err(|e: crate::jobs::UnknownStage| {
        ApiError::new(ErrorCode::NotFound, e.to_string())
    })?;
    Ok(state.broker.handle(stage.as_str())?)
}

/// Each stage queue's state (pending, in flight, delayed, dead, oldest age).
#[utoipa::path(
    get, path = "/v1/admin/queues", tag = "admin",
    responses(
        (status = 200, description = "One entry per stage", body = [QueueState]),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn admin_queues(
    State(state): State<ApiState>,
    Admin(_): Admin,
) -> Result<Response, ApiError> {
    let mut out = Vec::new();
    for stage in Stage::PIPELINE {
        let q = state.broker.handle(stage.as_str())?;
        let st = q.stats().await?;
        out.push(QueueState {
            stage: stage.as_str().to_owned(),
            pending: st.pending,
            in_flight: st.in_flight,
            delayed: st.delayed,
            dead: st.dead,
            oldest_pending_age_ms: st.oldest_pending_age_ms,
        });
    }
    Ok(Json(out).into_response())
}

/// Query of the dead-letter list.
#[derive(Debug, Deserialize, IntoParams)]
pub(super) struct DeadLetterQuery {
    /// At most this many, newest first (1-1000, default 50).
    limit: Option<u32>,
}

/// A stage's dead letters, newest first.
#[utoipa::path(
    get, path = "/v1/admin/dead-letters/{stage}", tag = "admin",
    params(("stage" = String, Path, description = "parse, chunk or embed"), DeadLetterQuery),
    responses(
        (status = 200, description = "Dead letters", body = [DeadLetterEntry]),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such stage", body = ErrorBody),
        (status = 422, description = "`invalid_request`: limit out of range", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn admin_dead_letters(
    State(state): State<ApiState>,
    Admin(_): Admin,
    Path(stage): Path<String>,
    query: Result<Query<DeadLetterQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let limit = query.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::unprocessable("limit must be between 1 and 1000"));
    }
    let q = stage_queue(&state, &stage)?;
    let dead = q.dead_letters(limit as usize).await?;
    let out: Vec<DeadLetterEntry> = dead
        .into_iter()
        .map(|d| DeadLetterEntry {
            id: d.entry_id,
            job_id: d.job_id,
            payload: d.payload,
            attempts: d.attempts,
            error: d.error,
            died_at_ms: d.died_at_ms,
        })
        .collect();
    Ok(Json(out).into_response())
}

fn dead_letter_ids(headers: &HeaderMap, body: &[u8]) -> Result<Vec<String>, ApiError> {
    let ids = if body.iter().all(u8::is_ascii_whitespace) {
        Vec::new()
    } else {
        let json = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/json")
            });
        if !json {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "send Content-Type: application/json",
            ));
        }
        // `null` is the body the schema's optional object allows: all of the stage's, like no body. Anything
        // else must be an object: serde would read a struct from an array too (`[]` as `{}`).
        let value: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(ErrorCode::InvalidJson, e.to_string()))?;
        match value {
            serde_json::Value::Null => Vec::new(),
            serde_json::Value::Object(_) => {
                serde_json::from_value::<DeadLetterIds>(value)
                    .map_err(|e| ApiError::new(ErrorCode::InvalidJson, e.to_string()))?
                    .ids
            }
            _ => {
                return Err(ApiError::new(
                    ErrorCode::InvalidJson,
                    "the body must be an object ({\"ids\": [...]}) or null",
                ));
            }
        }
    };
    let digits = |p: &str| (1..=19).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit());
    let valid = |id: &String| {
        id.split_once('-')
            .is_some_and(|(ms, seq)| digits(ms) && digits(seq))
    };
    if ids.len() > 10_000 || !ids.iter().all(valid) {
        return Err(ApiError::unprocessable(
            "ids must be at most 10,000 dead-letter ids of the form <ms>-<seq>",
        ));
    }
    Ok(ids)
}

/// What to do with dead letters.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterAction {
    /// Put them back on their queue with fresh attempts.
    Replay,
    /// Delete them.
    Purge,
}

/// Replays dead letters (back on their queue with fresh attempts) or purges them: the given ids, or all of the
/// stage's.
#[utoipa::path(
    post, path = "/v1/admin/dead-letters/{stage}/{action}", tag = "admin",
    params(
        ("stage" = String, Path, description = "parse, chunk or embed"),
        ("action" = DeadLetterAction, Path, description = "replay or purge"),
    ),
    request_body(content = Option<DeadLetterIds>, content_type = "application/json"),
    responses(
        (status = 200, description = "How many were replayed or purged", body = Moved),
        (status = 400, description = "`invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such stage or action", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_request`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn admin_dead_letter_action(
    State(state): State<ApiState>,
    Admin(user): Admin,
    Path((stage, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let action: DeadLetterAction = serde_json::from_value(serde_json::Value::String(action))
        .map_err(|_| {
            ApiError::new(
                ErrorCode::NotFound,
                "no such action: expected replay or purge",
            )
        })?;
    let q = stage_queue(&state, &stage)?;
    let ids = dead_letter_ids(&headers, &body)?;
    let count = match action {
        DeadLetterAction::Replay => q.replay_dead(&ids).await,
        DeadLetterAction::Purge => q.purge_dead(&ids).await,
    }?;
    tracing::info!(admin = %user, stage, ?action, count, "Dead letters handled by an operator");
    Ok(Json(Moved { count }).into_response())
}

/// A stage of the document pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PipelineStage {
    /// Uploaded bytes to Markdown.
    Parse,
    /// Markdown to chunks.
    Chunk,
    /// Chunks to vectors.
    Embed,
}

impl From<PipelineStage> for Stage {
    fn from(s: PipelineStage) -> Self {
        match s {
            PipelineStage::Parse => Stage::Parse,
            PipelineStage::Chunk => Stage::Chunk,
            PipelineStage::Embed => Stage::Embed,
        }
    }
}

/// Filters of the failures listing.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct FailureQuery {
    /// Only documents that failed at this stage.
    #[param(inline)]
    stage: Option<PipelineStage>,
    /// Only documents that failed at or after this time (RFC 3339, e.g. `2026-11-30T08:00:00Z`).
    since: Option<DateTime<Utc>>,
    /// Only this user's documents.
    user: Option<Uuid>,
    /// List at most this many documents (the counts cover every match).
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<u32>,
}

/// Failed documents by stage and reason.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Failures {
    /// Every matching failed document counted by stage and reason, most frequent first.
    pub counts: Vec<FailureCount>,
    /// The matching failed documents, newest failure first, at most `limit`.
    pub documents: Vec<FailedDocument>,
}

/// Failed documents of every user: counts by the stage that gave up and its reason, and the newest failures.
/// `POST /v1/documents/{id}/retry` (as the owner) or `producer retry` re-runs them.
#[utoipa::path(
    get, path = "/v1/admin/failures", tag = "admin",
    params(FailureQuery),
    responses(
        (status = 200, description = "Counts and documents", body = Failures),
        (status = 400, description = "`invalid_request` (stage, since, user or limit)", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn admin_failures(
    State(state): State<ApiState>,
    Admin(_): Admin,
    query: Result<Query<FailureQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "limit must be between 1 and 1000",
        ));
    }
    let filter = FailureFilter {
        stage: query.stage.map(Stage::from),
        since: query.since,
        user: query.user,
    };
    let pool = &state.pipeline.pool;
    let counts = crate::retry::failure_counts(pool, &filter).await?;
    let documents = crate::retry::failures(pool, &filter, limit).await?;
    Ok(Json(Failures { counts, documents }).into_response())
}

/// The fleet's quota state: bucket levels, cool-downs, pauses and today's spend per provider.
#[utoipa::path(
    get, path = "/v1/admin/quota", tag = "admin",
    responses(
        (status = 200, description = "Quota state entries", body = [BudgetEntry]),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn admin_quota(
    State(state): State<ApiState>,
    Admin(_): Admin,
) -> Result<Response, ApiError> {
    let quota =
        crate::quota::Quota::with_connection(state.broker.connection(), &state.pipeline.settings);
    let states = quota.report().await.map_err(QueueError::from)?;
    let out: Vec<BudgetEntry> = states
        .into_iter()
        .map(|b| BudgetEntry {
            key: b.key,
            value: b.value,
            ttl_ms: b.ttl_ms,
        })
        .collect();
    Ok(Json(out).into_response())
}

/// Ends a provider's fleet-wide pause after it ran out of quota or credit.
#[utoipa::path(
    post, path = "/v1/admin/quota/{provider}/resume", tag = "admin",
    params(("provider" = String, Path, description = "openai or llamaparse")),
    responses(
        (status = 200, description = "Whether it was paused", body = Resumed),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such provider", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn admin_resume(
    State(state): State<ApiState>,
    Admin(user): Admin,
    Path(provider): Path<String>,
) -> Result<Response, ApiError> {
    if provider != "openai" && provider != "llamaparse" {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "no such provider: expected openai or llamaparse",
        ));
    }
    let quota =
        crate::quota::Quota::with_connection(state.broker.connection(), &state.pipeline.settings);
    let was_paused = quota.resume(&provider).await.map_err(QueueError::from)?;
    tracing::info!(admin = %user, provider, was_paused, "Quota pause ended by an operator");
    Ok(Json(Resumed {
        provider,
        was_paused,
    })
    .into_response())
}
