//! The document handlers: upload, status, listing, retry and delete, with their request and answer shapes.

use axum::{
    Json,
    extract::{Multipart, Query, State, multipart::MultipartRejection, rejection::QueryRejection},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{
    ApiState,
    error::{ApiError, ErrorBody, ErrorCode},
    extract::{Caller, DocumentId},
    types::Document,
    upload::{self, UploadForm},
};
pub use crate::documents::DocumentStatus;
use crate::{
    documents::{self, NewUpload, UploadOutcome},
    metrics as m,
    parsing::DocKind,
    retry::RetryOutcome,
};

/// The answer to an upload.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UploadResponse {
    /// The document.
    pub document_id: Uuid,
    /// Its status when the upload was accepted: `queued` for a new document (whatever a worker did since), the
    /// status of the earlier document for a duplicate, the status it restarts from when it was re-queued.
    pub status: String,
    /// Present and true when the same user uploaded the same bytes before: the answer is about that document.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// Present and true when that earlier document had failed and is queued again from the stage that gave up
    /// (answered with 202, like a new upload).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub requeued: bool,
}

/// Uploads a document. It is durable before the answer: the document, its bytes and its parse stage are committed
/// in one transaction, then the parse job is pushed.
#[utoipa::path(
    post, path = "/v1/documents", tag = "documents",
    request_body(
        content = UploadForm, content_type = "multipart/form-data",
        encoding(("metadata" = (content_type = "application/json"))),
    ),
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries of one upload safe: the same key answers with the document it created")),
    responses(
        (status = 202, description = "Accepted: a new document (`status` is `queued`), a retry with a known Idempotency-Key, or the same bytes as an earlier document of this user that had failed, now queued again from the stage that gave up (`duplicate` and `requeued` true)", body = UploadResponse),
        (status = 200, description = "The same bytes were uploaded before by this user: that document, with its status", body = UploadResponse),
        (status = 400, description = "`invalid_request`, `empty_file`, `invalid_metadata`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`", body = ErrorBody),
        (status = 413, description = "`file_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_document`, `invalid_text`", body = ErrorBody),
        (status = 429, description = "`rate_limited`: over `api.uploads_per_minute`; see `Retry-After`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn upload(
    State(state): State<ApiState>,
    Caller(user): Caller,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    // Before reading the body: a flood costs one Redis call per request, never a buffered file.
    upload::admit(&state, user).await?;
    let limit = state.pipeline.settings.api.max_upload_bytes;
    let multipart = multipart.map_err(upload::not_multipart)?;
    let idempotency_key = upload::idempotency_key(&headers)?;
    let form = upload::read_form(multipart, limit).await?;
    let kind = DocKind::detect(&form.filename, &form.bytes)?;
    let up = NewUpload {
        user_id: user,
        filename: form.filename,
        kind,
        bytes: form.bytes,
        metadata: form.metadata,
        idempotency_key,
    };
    let outcome = documents::create(&state.pipeline.pool, &up).await?;
    let (body, code) = accepted(&state, user, outcome).await?;
    Ok((code, Json(body)).into_response())
}

/// The answer to a stored upload: 202 for a new document or a known `Idempotency-Key`, else what [`duplicate`]
/// says.
async fn accepted(
    state: &ApiState,
    user: Uuid,
    outcome: UploadOutcome,
) -> Result<(UploadResponse, StatusCode), ApiError> {
    match outcome {
        UploadOutcome::Created(id) => {
            metrics::counter!(m::DOCUMENTS_UPLOADED, "outcome" => "created").increment(1);
            // Durable already: if Redis is down the reconciler pushes the job later.
            if let Err(e) = state.pipeline.push_parse(id, user).await {
                tracing::warn!(document_id = %id, error = %e, "Could not push the parse job; the reconciler will");
            }
            // The state at acceptance, not a read after the push: a fast worker may have moved it on already.
            let body = UploadResponse {
                document_id: id,
                status: DocumentStatus::Queued.to_string(),
                duplicate: false,
                requeued: false,
            };
            Ok((body, StatusCode::ACCEPTED))
        }
        UploadOutcome::Replayed(id) => {
            metrics::counter!(m::DOCUMENTS_UPLOADED, "outcome" => "replayed").increment(1);
            let body = UploadResponse {
                document_id: id,
                status: current_status(state, user, id).await?.to_string(),
                duplicate: false,
                requeued: false,
            };
            Ok((body, StatusCode::ACCEPTED))
        }
        UploadOutcome::Duplicate(id) => {
            metrics::counter!(m::DOCUMENTS_UPLOADED, "outcome" => "duplicate").increment(1);
            duplicate(state, user, id).await
        }
    }
}

/// The answer to the same bytes uploaded again: the earlier document, queued again from the stage that gave up
/// when it had failed (202), as it is otherwise (200).
async fn duplicate(
    state: &ApiState,
    user: Uuid,
    id: Uuid,
) -> Result<(UploadResponse, StatusCode), ApiError> {
    let (status, requeued) = match crate::retry::retry(&state.pipeline, user, id).await? {
        RetryOutcome::Requeued { document, .. } => (document.status, true),
        RetryOutcome::NotFailed { status } => (status, false),
        RetryOutcome::Raced => (current_status(state, user, id).await?, false),
        RetryOutcome::NotFound => return Err(ApiError::not_found()),
    };
    let body = UploadResponse {
        document_id: id,
        status: status.to_string(),
        duplicate: true,
        requeued,
    };
    let code = if requeued {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((body, code))
}

/// A document's status now; 404 when it is gone.
async fn current_status(
    state: &ApiState,
    user: Uuid,
    id: Uuid,
) -> Result<DocumentStatus, ApiError> {
    Ok(documents::get(&state.pipeline.pool, user, id)
        .await?
        .ok_or_else(ApiError::not_found)?
        .status)
}

/// A document's status, error, chunk counts, per-stage progress and timestamps.
#[utoipa::path(
    get, path = "/v1/documents/{id}", tag = "documents",
    params(("id" = Uuid, Path, description = "The document")),
    responses(
        (status = 200, description = "The document", body = Document),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found` (also for another user's document)", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn status(
    State(state): State<ApiState>,
    Caller(user): Caller,
    DocumentId(id): DocumentId,
) -> Result<Response, ApiError> {
    let doc = documents::get(&state.pipeline.pool, user, id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(Document::from(doc)).into_response())
}

/// Deletes a document with its bytes, jobs and chunks, in one transaction.
#[utoipa::path(
    delete, path = "/v1/documents/{id}", tag = "documents",
    params(("id" = Uuid, Path, description = "The document")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn remove(
    State(state): State<ApiState>,
    Caller(user): Caller,
    DocumentId(id): DocumentId,
) -> Result<Response, ApiError> {
    if documents::delete(&state.pipeline.pool, user, id).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found())
    }
}

/// The answer to a retry.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RetryResponse {
    /// The stage the document re-runs from (`parse`, `chunk` or `embed`); what the stages before it produced is
    /// kept.
    pub stage: String,
    /// The document as the retry left it, before any worker took it up.
    pub document: Document,
}

/// Queues a failed document again from the stage that gave up, keeping what the earlier stages produced (parsed
/// sections, chunks, vectors), and pushes that stage's job.
#[utoipa::path(
    post, path = "/v1/documents/{id}/retry", tag = "documents",
    params(("id" = Uuid, Path, description = "The document")),
    responses(
        (status = 202, description = "Queued again from the stage that gave up", body = RetryResponse),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found` (also for another user's document)", body = ErrorBody),
        (status = 409, description = "`not_failed`: the document is not failed, so there is nothing to retry", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn retry_document(
    State(state): State<ApiState>,
    Caller(user): Caller,
    DocumentId(id): DocumentId,
) -> Result<Response, ApiError> {
    match crate::retry::retry(&state.pipeline, user, id).await? {
        RetryOutcome::Requeued { stage, document } => {
            let body = RetryResponse {
                stage: stage.as_str().to_owned(),
                document: Document::from(*document),
            };
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
        RetryOutcome::NotFailed { status } => Err(ApiError::new(
            ErrorCode::NotFailed,
            format!("the document is {status}, not failed: there is nothing to retry"),
        )),
        RetryOutcome::Raced => Err(ApiError::new(
            ErrorCode::NotFailed,
            "the document's failed stage was settled while it was being retried; look at its status",
        )),
        RetryOutcome::NotFound => Err(ApiError::not_found()),
    }
}

/// Filters and paging of a listing.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ListParams {
    /// Only documents in this status.
    #[param(inline)]
    status: Option<DocumentStatus>,
    /// Page size.
    #[param(minimum = 1, maximum = 100, default = 20)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page; absent or empty for the first page.
    #[param(pattern = "^([0-9]{1,16}_[0-9a-f]{32})?$")]
    cursor: Option<String>,
}

/// A page of documents.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DocumentPage {
    /// Newest first.
    pub documents: Vec<Document>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// `<microseconds since the epoch>_<id as 32 lowercase hex digits>`: every string the `cursor` parameter's
/// pattern matches is a valid cursor, so the schema describes exactly what the server accepts.
fn encode_cursor(c: (DateTime<Utc>, Uuid)) -> String {
    format!("{}_{}", c.0.timestamp_micros(), c.1.simple())
}

fn decode_cursor(s: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let Some((micros, id)) = s.split_once('_') else {
        return decode_legacy_cursor(s);
    };
    let digits = (1..=16).contains(&micros.len()) && micros.bytes().all(|b| b.is_ascii_digit());
    let hex = id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !(digits && hex) {
        return decode_legacy_cursor(s);
    }
    Some((
        DateTime::from_timestamp_micros(micros.parse().ok()?)?,
        Uuid::parse_str(id).ok()?,
    ))
}

/// The base64 cursors of earlier releases, still in clients' hands for a page or two after an upgrade.
fn decode_legacy_cursor(s: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()?;
    let (t, id) = std::str::from_utf8(&raw).ok()?.split_once('|')?;
    Some((
        DateTime::parse_from_rfc3339(t).ok()?.with_timezone(&Utc),
        Uuid::parse_str(id).ok()?,
    ))
}

/// The caller's documents, newest first.
#[utoipa::path(
    get, path = "/v1/documents", tag = "documents",
    params(ListParams),
    responses(
        (status = 200, description = "A page of documents", body = DocumentPage),
        (status = 400, description = "`invalid_request` (status, limit or cursor)", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn list(
    State(state): State<ApiState>,
    Caller(user): Caller,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params?;
    let limit = params.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "limit must be between 1 and 100",
        ));
    }
    // `cursor=` is the first page, as a client that always sends the parameter spells it.
    let cursor = match params.cursor.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(
            decode_cursor(c)
                .ok_or_else(|| ApiError::new(ErrorCode::InvalidRequest, "invalid cursor"))?,
        ),
    };
    let (docs, next) =
        documents::list(&state.pipeline.pool, user, params.status, limit, cursor).await?;
    Ok(Json(DocumentPage {
        documents: docs.into_iter().map(Document::from).collect(),
        next_cursor: next.map(encode_cursor),
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let c = (Utc::now(), Uuid::new_v4());
        let back = decode_cursor(&encode_cursor(c)).unwrap();
        assert_eq!(back.1, c.1);
        assert!(decode_cursor("garbage").is_none());
    }

    #[test]
    fn every_cursor_the_schema_allows_is_valid() {
        let top = format!("9999999999999999_{}", "f".repeat(32));
        assert!(decode_cursor(&top).is_some());
        assert!(decode_cursor(&format!("0_{}", "0".repeat(32))).is_some());
        for refused in [
            "1_",
            "_0",
            "1-abc",
            &format!("1_{}", "F".repeat(32)),
            &format!("12345678901234567_{}", "0".repeat(32)),
        ] {
            assert!(decode_cursor(refused).is_none(), "{refused}");
        }
        let legacy = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("2026-11-30T00:00:00+00:00|{}", Uuid::nil()));
        assert_eq!(decode_cursor(&legacy).unwrap().1, Uuid::nil());
    }
}
