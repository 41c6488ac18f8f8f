//! The producer's HTTP API (axum). Every `/v1` call needs `Authorization: Bearer <JWT>`; errors are
//! `{"error": {"code": "...", "message": "..."}}`.
//!
//! | method and path | does | answers |
//! |---|---|---|
//! | `POST /v1/documents` | multipart `file` (+ optional `metadata`, a JSON object); `Idempotency-Key` header | 202 `{document_id, status}`; 200 with `duplicate: true` for bytes uploaded before; 202 with `duplicate` and `requeued` true when that earlier document had failed |
//! | `GET /v1/documents/{id}` | status, error, chunks, per-stage progress | 200, 404 |
//! | `POST /v1/documents/{id}/retry` | a failed document re-runs from the stage that gave up | 202 `{stage, document}`, 404, 409 `not_failed` |
//! | `GET /v1/documents?status=&limit=&cursor=` | the caller's documents, newest first | 200 `{documents, next_cursor}` |
//! | `DELETE /v1/documents/{id}` | removes it with its chunks | 204, 404 |
//! | `POST /v1/search` | `{query, k}` | 200 `{results, took_ms, embedding_model}` |
//! | `GET /v1/admin/failures?stage=&since=&user=&limit=` | admin claim: failed documents of every user | 200 `{counts, documents}` |
//! | `GET /healthz`, `/readyz`, `/metrics` | liveness; Postgres and Redis reachable; Prometheus | |
//!
//! Error codes: `invalid_request` 400, `invalid_json` 400, `empty_file` 400, `invalid_metadata` 400,
//! `unauthorized` 401, `forbidden` 403, `not_found` 404, `idempotency_conflict` 409, `not_failed` 409, `file_too_large` 413,
//! `unsupported_media_type` 415, `invalid_document` 422, `invalid_text` 422, `invalid_query` 422, `invalid_k` 422,
//! `rate_limited` 429, `unavailable` 503, `internal` 500.

use std::time::Instant;

use axum::{
    Json, Router,
    extract::{
        DefaultBodyLimit, FromRequestParts, MatchedPath, Multipart, Path, Query, Request, State,
        multipart::MultipartRejection, rejection::JsonRejection,
    },
    http::{HeaderMap, StatusCode, request::Parts},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};
use uuid::Uuid;

use crate::{
    auth::Auth,
    db::DbError,
    documents::{self, Document, Hit, NewUpload, StageStatus, UploadError, UploadOutcome},
    jobs::{Pipeline, Stage},
    metrics as m,
    parsing::{DocKind, ParseError},
    queue::Broker,
    retry::{FailedDocument, FailureCount, FailureFilter, RetryOutcome},
};

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The document pipeline (database, queues, embedder, settings).
    pub pipeline: Pipeline,
    /// Token verification.
    pub auth: Auth,
    /// Redis, for readiness and queue gauges.
    pub broker: Broker,
    /// The Prometheus registry to render on `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// Uploads per user, fleet-wide.
    pub uploads: crate::ratelimit::RateLimit,
}

/// The stable codes of API errors (the `code` of `{"error": {"code", "message"}}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: a malformed request (parameters, headers, multipart body).
    InvalidRequest,
    /// 400: the body is not valid JSON.
    InvalidJson,
    /// 400: the uploaded file has no bytes.
    EmptyFile,
    /// 400: `metadata` is not a JSON object (or holds a NUL character).
    InvalidMetadata,
    /// 401: missing, malformed, forged or expired bearer token.
    Unauthorized,
    /// 403: an operator endpoint called without the admin claim.
    Forbidden,
    /// 404: no such document (also another user's) or route.
    NotFound,
    /// 409: the `Idempotency-Key` was used for a different file.
    IdempotencyConflict,
    /// 409: a retry of a document that is not failed (or whose failed stage was settled meanwhile).
    NotFailed,
    /// 413: the upload is over `api.max_upload_bytes`.
    FileTooLarge,
    /// 415: a file type the parsers do not read, or a body that is not JSON.
    UnsupportedMediaType,
    /// 422: a PDF or DOCX that is not one.
    InvalidDocument,
    /// 422: binary data or invalid UTF-8 in a text file.
    InvalidText,
    /// 422: an empty or too long search query.
    InvalidQuery,
    /// 422: `k` out of range.
    InvalidK,
    /// 429: too many uploads from this user; `Retry-After` says when to try again.
    RateLimited,
    /// 503: Postgres, Redis or the embedding provider is unavailable; try again.
    Unavailable,
    /// 500: a bug; the details are in the server's logs.
    Internal,
}

/// An error body: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The error inside an [`ErrorBody`].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable code to act on.
    pub code: ErrorCode,
    /// A sentence for people.
    pub message: String,
}

/// An API error: status, stable code, and a message for people.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
    /// Seconds for a `Retry-After` header.
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such document",
        )
    }

    fn not_failed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, ErrorCode::NotFailed, message)
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(serde_json::json!({ "error": { "code": self.code, "message": self.message } })),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from(secs));
        }
        resp
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        if e.is_retryable() {
            tracing::warn!(error = %e, "Database unavailable");
            Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "the database is unavailable; try again",
            )
        } else {
            tracing::error!(error = %e, "Database error");
            Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                "internal error",
            )
        }
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            e.body_text(),
        )
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        match e {
            JsonRejection::MissingJsonContentType(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::UnsupportedMediaType,
                "send Content-Type: application/json",
            ),
            JsonRejection::JsonDataError(e) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::InvalidRequest,
                e.body_text(),
            ),
            other => Self::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidJson,
                other.body_text(),
            ),
        }
    }
}

/// The authenticated caller.
pub struct Caller(pub Uuid);

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        identify(parts, state).map(|id| Self(id.user))
    }
}

/// An authenticated caller whose token carries the admin claim (operator endpoints); others get 403.
pub struct Admin(pub Uuid);

impl FromRequestParts<ApiState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let id = identify(parts, state)?;
        if !id.admin {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                "this endpoint needs a token with the admin claim",
            ));
        }
        Ok(Self(id.user))
    }
}

/// Verifies the bearer token of a request.
fn identify(parts: &Parts, state: &ApiState) -> Result<crate::auth::Identity, ApiError> {
    let header = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let Some(token) = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
    else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "send Authorization: Bearer <token>",
        ));
    };
    match state.auth.verify(token.trim()) {
        Ok(id) => Ok(id),
        Err(e) => {
            tracing::debug!(error = %e, "Token refused");
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "the token is invalid or expired",
            ))
        }
    }
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    let body_limit = state.pipeline.settings.api.max_upload_bytes as usize + 1024 * 1024;
    Router::new()
        .route("/v1/documents", post(upload).get(list))
        .route("/v1/documents/{id}", get(status).delete(remove))
        .route("/v1/documents/{id}/retry", post(retry_document))
        .route("/v1/search", post(search))
        .route("/v1/admin/queues", get(admin_queues))
        .route("/v1/admin/failures", get(admin_failures))
        .route("/v1/admin/dead-letters/{stage}", get(admin_dead_letters))
        .route(
            "/v1/admin/dead-letters/{stage}/{action}",
            post(admin_dead_letter_action),
        )
        .route("/v1/admin/quota", get(admin_quota))
        .route("/v1/admin/quota/{provider}/resume", post(admin_resume))
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such route")
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn(count_responses))
        .with_state(state)
}

async fn count_responses(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_owned(), |p| p.as_str().to_owned());
    let resp = next.run(req).await;
    let class = format!("{}xx", resp.status().as_u16() / 100);
    metrics::counter!(m::API_RESPONSES, "route" => route, "status" => class).increment(1);
    resp
}

/// The base name of an uploaded file, without directories or control characters, at most 255 bytes.
pub fn sanitize_filename(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let clean: String = base.chars().filter(|c| !c.is_control()).collect();
    let clean = clean.trim().trim_start_matches('.').to_owned();
    let mut out = String::new();
    for c in clean.chars() {
        if out.len() + c.len_utf8() > 255 {
            break;
        }
        out.push(c);
    }
    if out.is_empty() { "upload".into() } else { out }
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: u64) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::FileTooLarge,
            format!("uploads are limited to {limit} bytes"),
        )
    } else {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            format!("unreadable multipart body: {}", e.body_text()),
        )
    }
}

/// The multipart body of an upload.
#[derive(ToSchema)]
#[allow(dead_code)]
struct UploadForm {
    /// The document: .txt, .md, .html, .pdf or .docx (its name decides how it is read).
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    file: Vec<u8>,
    /// Free-form metadata, a JSON object (at most 64 KiB).
    metadata: Option<String>,
}

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
    request_body(content = UploadForm, content_type = "multipart/form-data"),
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
async fn upload(
    State(state): State<ApiState>,
    Caller(user): Caller,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    // Before reading the body: a flood costs one Redis call per request, never a buffered file.
    if let Err(wait) = state.uploads.take(user).await {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        let mut err = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            format!(
                "more than {} uploads a minute; try again in {secs} s",
                state.pipeline.settings.api.uploads_per_minute
            ),
        );
        err.retry_after = Some(secs);
        return Err(err);
    }
    let limit = state.pipeline.settings.api.max_upload_bytes;
    let mut multipart = multipart.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            format!(
                "send multipart/form-data with a `file` field: {}",
                e.body_text()
            ),
        )
    })?;
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let key = v
                .to_str()
                .ok()
                .map(str::trim)
                .filter(|k| !k.is_empty() && k.len() <= 255);
            Some(
                key.ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::InvalidRequest,
                        "Idempotency-Key must be 1 to 255 visible characters",
                    )
                })?
                .to_owned(),
            )
        }
    };
    let mut file: Option<(String, Vec<u8>)> = None;
    let mut metadata = serde_json::json!({});
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(e, limit))?
    {
        match field.name() {
            Some("file") => {
                let name = sanitize_filename(field.file_name().unwrap_or("upload"));
                let mut bytes = Vec::new();
                while let Some(chunk) =
                    field.chunk().await.map_err(|e| multipart_error(e, limit))?
                {
                    if (bytes.len() + chunk.len()) as u64 > limit {
                        return Err(ApiError::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            ErrorCode::FileTooLarge,
                            format!("uploads are limited to {limit} bytes"),
                        ));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                file = Some((name, bytes));
            }
            Some("metadata") => {
                let mut raw = Vec::new();
                while let Some(chunk) =
                    field.chunk().await.map_err(|e| multipart_error(e, limit))?
                {
                    raw.extend_from_slice(&chunk);
                    if raw.len() > 64 * 1024 {
                        return Err(ApiError::new(
                            StatusCode::BAD_REQUEST,
                            ErrorCode::InvalidMetadata,
                            "metadata is limited to 64 KiB",
                        ));
                    }
                }
                metadata = serde_json::from_slice::<serde_json::Value>(&raw)
                    .ok()
                    .filter(|v| v.is_object() && !v.to_string().contains("\\u0000"))
                    .ok_or_else(|| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            ErrorCode::InvalidMetadata,
                            "metadata must be a JSON object",
                        )
                    })?;
            }
            _ => {
                while field
                    .chunk()
                    .await
                    .map_err(|e| multipart_error(e, limit))?
                    .is_some()
                {}
            }
        }
    }
    let (filename, bytes) = file.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            "the multipart body has no `file` field",
        )
    })?;
    let kind = DocKind::detect(&filename, &bytes).map_err(|e| match e {
        ParseError::Empty => ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::EmptyFile,
            "the file is empty",
        ),
        ParseError::Unsupported(m) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::UnsupportedMediaType,
            m,
        ),
        ParseError::InvalidText(m) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::InvalidText, m)
        }
        other => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::InvalidDocument,
            other.to_string(),
        ),
    })?;
    let up = NewUpload {
        user_id: user,
        filename,
        kind,
        bytes,
        metadata,
        idempotency_key,
    };
    let outcome = documents::create(&state.pipeline.pool, &up)
        .await
        .map_err(|e| match e {
            UploadError::IdempotencyConflict => ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::IdempotencyConflict,
                e.to_string(),
            ),
            UploadError::Db(e) => e.into(),
        })?;
    let (body, code) = match outcome {
        UploadOutcome::Created(id) => {
            metrics::counter!(m::DOCUMENTS_UPLOADED, "outcome" => "created").increment(1);
            // Durable already: if Redis is down the reconciler pushes the job later.
            if let Err(e) = state.pipeline.push_parse(id, user).await {
                tracing::warn!(document_id = %id, error = %e, "Could not push the parse job; the reconciler will");
            }
            // The state at acceptance, not a read after the push: a fast worker may have moved it on already.
            let body = UploadResponse {
                document_id: id,
                status: "queued".into(),
                duplicate: false,
                requeued: false,
            };
            (body, StatusCode::ACCEPTED)
        }
        UploadOutcome::Replayed(id) => {
            metrics::counter!(m::DOCUMENTS_UPLOADED, "outcome" => "replayed").increment(1);
            let body = UploadResponse {
                document_id: id,
                status: current_status(&state, user, id).await?,
                duplicate: false,
                requeued: false,
            };
            (body, StatusCode::ACCEPTED)
        }
        UploadOutcome::Duplicate(id) => {
            metrics::counter!(m::DOCUMENTS_UPLOADED, "outcome" => "duplicate").increment(1);
            duplicate(&state, user, id).await?
        }
    };
    Ok((code, Json(body)).into_response())
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
        status,
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
async fn current_status(state: &ApiState, user: Uuid, id: Uuid) -> Result<String, ApiError> {
    Ok(documents::get(&state.pipeline.pool, user, id)
        .await?
        .ok_or_else(ApiError::not_found)?
        .status)
}

/// A document id from the path; one that is not a UUID is as unknown as any other (404).
pub struct DocumentId(pub Uuid);

impl FromRequestParts<ApiState> for DocumentId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let Path(id) = Path::<Uuid>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::not_found())?;
        Ok(Self(id))
    }
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
async fn status(
    State(state): State<ApiState>,
    Caller(user): Caller,
    DocumentId(id): DocumentId,
) -> Result<Response, ApiError> {
    let doc = documents::get(&state.pipeline.pool, user, id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(doc).into_response())
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
async fn remove(
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
async fn retry_document(
    State(state): State<ApiState>,
    Caller(user): Caller,
    DocumentId(id): DocumentId,
) -> Result<Response, ApiError> {
    match crate::retry::retry(&state.pipeline, user, id).await? {
        RetryOutcome::Requeued { stage, document } => {
            let body = RetryResponse {
                stage: stage.as_str().to_owned(),
                document: *document,
            };
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
        RetryOutcome::NotFailed { status } => Err(ApiError::not_failed(format!(
            "the document is {status}, not failed: there is nothing to retry"
        ))),
        RetryOutcome::Raced => Err(ApiError::not_failed(
            "the document's failed stage was settled while it was being retried; look at its status",
        )),
        RetryOutcome::NotFound => Err(ApiError::not_found()),
    }
}

/// Filters and paging of a listing.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// Only documents in this status.
    #[param(inline)]
    status: Option<DocumentStatus>,
    /// Page size.
    #[param(minimum = 1, maximum = 100, default = 20)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// A document's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DocumentStatus {
    /// Waiting for the parse stage.
    Queued,
    /// Being parsed.
    Parsing,
    /// Being chunked.
    Chunking,
    /// Being embedded.
    Embedding,
    /// Searchable.
    Ready,
    /// Failed; see `error`.
    Failed,
}

impl DocumentStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Parsing => "parsing",
            Self::Chunking => "chunking",
            Self::Embedding => "embedding",
            Self::Ready => "ready",
            Self::Failed => "failed",
        }
    }
}

/// A page of documents.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DocumentPage {
    /// Newest first.
    pub documents: Vec<Document>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

fn encode_cursor(c: (DateTime<Utc>, Uuid)) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}|{}", c.0.to_rfc3339(), c.1))
}

fn decode_cursor(s: &str) -> Option<(DateTime<Utc>, Uuid)> {
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
async fn list(
    State(state): State<ApiState>,
    Caller(user): Caller,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params?;
    let limit = params.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            "limit must be between 1 and 100",
        ));
    }
    let cursor = match &params.cursor {
        None => None,
        Some(c) => Some(decode_cursor(c).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidRequest,
                "invalid cursor",
            )
        })?),
    };
    let (docs, next) = documents::list(
        &state.pipeline.pool,
        user,
        params.status.map(DocumentStatus::as_str),
        limit,
        cursor,
    )
    .await?;
    Ok(Json(DocumentPage {
        documents: docs,
        next_cursor: next.map(encode_cursor),
    })
    .into_response())
}

/// A search.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// What to look for, in natural language.
    #[schema(min_length = 1, max_length = 4000)]
    pub query: String,
    /// How many chunks to return (at most `api.max_search_k`, 50 by default).
    #[serde(default = "default_k")]
    #[schema(minimum = 1, maximum = 50, default = 5)]
    pub k: i64,
}

/// Search results.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SearchResponse {
    /// Best first.
    pub results: Vec<Hit>,
    /// Time taken in the server, query embedding included.
    pub took_ms: f64,
    /// The model the query and the chunks were embedded with.
    pub embedding_model: String,
}

fn default_k() -> i64 {
    5
}

/// The `k` chunks of the caller's documents nearest to the query (cosine similarity on the model's HNSW index).
#[utoipa::path(
    post, path = "/v1/search", tag = "search",
    request_body = SearchRequest,
    responses(
        (status = 200, description = "Results, best first", body = SearchResponse),
        (status = 400, description = "`invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type` (send application/json)", body = ErrorBody),
        (status = 422, description = "`invalid_query`, `invalid_k`, `invalid_request`", body = ErrorBody),
        (status = 503, description = "`unavailable` (database or embedding provider)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn search(
    State(state): State<ApiState>,
    Caller(user): Caller,
    body: Result<Json<SearchRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let Json(req) = body?;
    let max_k = state.pipeline.settings.api.max_search_k;
    let query = req.query.trim();
    if query.is_empty() || query.chars().count() > 4000 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::InvalidQuery,
            "query must be 1 to 4000 characters",
        ));
    }
    if req.k < 1 || req.k > max_k as i64 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::InvalidK,
            format!("k must be between 1 and {max_k}"),
        ));
    }
    let embedder = &state.pipeline.embedder;
    let vectors = embedder.embed(&[query.to_owned()]).await.map_err(|e| {
        tracing::warn!(error = %e, "Embedding the query failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            format!("the embedding provider is unavailable: {e}"),
        )
    })?;
    let hits = documents::search(
        &state.pipeline.pool,
        user,
        embedder.model(),
        &vectors[0],
        req.k as u32,
    )
    .await?;
    let took = started.elapsed();
    metrics::histogram!(m::SEARCH_DURATION).record(took.as_secs_f64());
    Ok(Json(SearchResponse {
        results: hits,
        took_ms: (took.as_secs_f64() * 1e5).round() / 100.0,
        embedding_model: embedder.model().to_owned(),
    })
    .into_response())
}

/// Liveness.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
}

/// The process answers (it does not look at its dependencies).
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Alive", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Readiness: whether the dependencies answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `unavailable`.
    pub status: String,
    /// `ok` or the error.
    pub postgres: String,
    /// `ok` or the error.
    pub redis: String,
}

/// Ready when Postgres and Redis answer.
#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "A dependency is down", body = Readiness),
    )
)]
async fn readyz(State(state): State<ApiState>) -> Response {
    let db = sqlx::query("SELECT 1")
        .execute(&state.pipeline.pool)
        .await
        .err()
        .map(|e| e.to_string());
    let mut conn = state.broker.connection();
    let redis = redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .err()
        .map(|e| e.to_string());
    let ok = db.is_none() && redis.is_none();
    let body = Json(Readiness {
        status: if ok { "ready" } else { "unavailable" }.into(),
        postgres: db.unwrap_or_else(|| "ok".into()),
        redis: redis.unwrap_or_else(|| "ok".into()),
    });
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        body,
    )
        .into_response()
}

/// Prometheus metrics of this producer, with the stage queues' state read at scrape time.
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain"))
)]
async fn render_metrics(State(state): State<ApiState>) -> Response {
    for stage in Stage::PIPELINE {
        if let Ok(queue) = state.broker.handle(stage.as_str()) {
            m::refresh_queue_gauges(&queue).await;
        }
    }
    m::refresh_document_gauges(&state.pipeline.pool).await;
    let quota =
        crate::quota::Quota::with_connection(state.broker.connection(), &state.pipeline.settings);
    m::refresh_quota_gauges(&quota).await;
    m::collect_process();
    match &state.metrics {
        Some(h) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "metrics are not enabled",
        )
        .into_response(),
    }
}

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
    pub ids: Vec<String>,
}

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

fn stage_queue(state: &ApiState, stage: &str) -> Result<crate::queue::QueueHandle, ApiError> {
    let stage: Stage = stage.parse().map_err(|e: crate::jobs::UnknownStage| {
        ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, e.to_string())
    })?;
    state.broker.handle(stage.as_str()).map_err(queue_error)
}

fn queue_error(e: crate::queue::QueueError) -> ApiError {
    tracing::warn!(error = %e, "Queue operation failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unavailable,
        "Redis is unavailable; try again",
    )
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
async fn admin_queues(
    State(state): State<ApiState>,
    Admin(_): Admin,
) -> Result<Response, ApiError> {
    let mut out = Vec::new();
    for stage in Stage::PIPELINE {
        let q = state.broker.handle(stage.as_str()).map_err(queue_error)?;
        let st = q.stats().await.map_err(queue_error)?;
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
#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct DeadLetterQuery {
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
async fn admin_dead_letters(
    State(state): State<ApiState>,
    Admin(_): Admin,
    Path(stage): Path<String>,
    query: Result<Query<DeadLetterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let limit = query.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::InvalidRequest,
            "limit must be between 1 and 1000",
        ));
    }
    let q = stage_queue(&state, &stage)?;
    let dead = q.dead_letters(limit as usize).await.map_err(queue_error)?;
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
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::UnsupportedMediaType,
                "send Content-Type: application/json",
            ));
        }
        serde_json::from_slice::<DeadLetterIds>(body)
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::InvalidJson,
                    e.to_string(),
                )
            })?
            .ids
    };
    let digits = |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
    let valid = |id: &String| {
        id.split_once('-')
            .is_some_and(|(ms, seq)| digits(ms) && digits(seq))
    };
    if ids.len() > 10_000 || !ids.iter().all(valid) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::InvalidRequest,
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
async fn admin_dead_letter_action(
    State(state): State<ApiState>,
    Admin(user): Admin,
    Path((stage, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let action: DeadLetterAction = serde_json::from_value(serde_json::Value::String(action))
        .map_err(|_| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "no such action: expected replay or purge",
            )
        })?;
    let q = stage_queue(&state, &stage)?;
    let ids = dead_letter_ids(&headers, &body)?;
    let count = match action {
        DeadLetterAction::Replay => q.replay_dead(&ids).await,
        DeadLetterAction::Purge => q.purge_dead(&ids).await,
    }
    .map_err(queue_error)?;
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
struct FailureQuery {
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
async fn admin_failures(
    State(state): State<ApiState>,
    Admin(_): Admin,
    query: Result<Query<FailureQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 1000"));
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
async fn admin_quota(State(state): State<ApiState>, Admin(_): Admin) -> Result<Response, ApiError> {
    let quota =
        crate::quota::Quota::with_connection(state.broker.connection(), &state.pipeline.settings);
    let states = quota.report().await.map_err(|e| queue_error(e.into()))?;
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
async fn admin_resume(
    State(state): State<ApiState>,
    Admin(user): Admin,
    Path(provider): Path<String>,
) -> Result<Response, ApiError> {
    if provider != "openai" && provider != "llamaparse" {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such provider: expected openai or llamaparse",
        ));
    }
    let quota =
        crate::quota::Quota::with_connection(state.broker.connection(), &state.pipeline.settings);
    let was_paused = quota
        .resume(&provider)
        .await
        .map_err(|e| queue_error(e.into()))?;
    tracing::info!(admin = %user, provider, was_paused, "Quota pause ended by an operator");
    Ok(Json(Resumed {
        provider,
        was_paused,
    })
    .into_response())
}

/// The OpenAPI 3.1 document of the API (served at `/openapi.json`, committed as `docs/openapi.json`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "upload-pipeline producer API",
        description = "Upload documents on behalf of users and search their chunks by meaning. Every /v1 call needs \
                       `Authorization: Bearer <JWT>` (HS256, or RS256/ES256 with a JWKS file; `sub` = the user). Errors are \
                       `{\"error\": {\"code\", \"message\"}}` with the codes of `ErrorCode`."
    ),
    paths(upload, list, status, remove, retry_document, search, admin_queues, admin_failures, admin_dead_letters, admin_dead_letter_action, admin_quota, admin_resume, healthz, readyz, render_metrics),
    components(schemas(ErrorBody, ErrorDetail, ErrorCode, UploadResponse, Document, StageStatus, DocumentPage, DocumentStatus, RetryResponse, SearchRequest, SearchResponse, Hit, Health, Readiness, QueueState, PipelineStage, Failures, FailureCount, FailedDocument, DeadLetterEntry, DeadLetterIds, DeadLetterAction, Moved, BudgetEntry, Resumed)),
    modifiers(&BearerAuth),
    tags(
        (name = "documents", description = "Upload, follow, list, retry and delete documents"),
        (name = "search", description = "Search the caller's documents"),
        (name = "admin", description = "Operator endpoints: queues, failures, dead letters, quota (tokens with the admin claim)"),
        (name = "operations", description = "Health, readiness and metrics"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document as pretty JSON with a final newline (the form committed as `docs/openapi.json`).
pub fn openapi_json() -> String {
    let mut doc =
        serde_json::to_string_pretty(&ApiDoc::openapi()).expect("the OpenAPI document serialises");
    doc.push('\n');
    doc
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Shared pieces for binaries and tests; fails when the JWKS file is unusable.
pub fn state(
    pipeline: Pipeline,
    broker: Broker,
    metrics: Option<PrometheusHandle>,
) -> Result<ApiState, crate::auth::AuthError> {
    let api = &pipeline.settings.api;
    let uploads = crate::ratelimit::RateLimit::new(
        broker.connection(),
        &pipeline.settings.queue.key_prefix,
        "uploads",
        api.uploads_per_minute,
        api.upload_burst,
    );
    Ok(ApiState {
        auth: Auth::from_settings(api)?,
        uploads,
        pipeline,
        broker,
        metrics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filenames_lose_paths_and_control_characters() {
        assert_eq!(sanitize_filename("../../etc/passwd"), "passwd");
        assert_eq!(sanitize_filename("C:\\docs\\report.pdf"), "report.pdf");
        assert_eq!(sanitize_filename("a\u{0}b\nc.txt"), "abc.txt");
        assert_eq!(sanitize_filename("..."), "upload");
        assert_eq!(sanitize_filename(&"é".repeat(300)).len(), 254);
    }

    #[test]
    fn the_committed_openapi_document_matches_the_code() {
        let committed = include_str!("../../docs/openapi.json");
        assert!(
            openapi_json() == committed,
            "docs/openapi.json is out of date: run `make openapi` and commit it"
        );
    }

    #[test]
    fn every_error_code_is_in_the_document() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let codes = doc["components"]["schemas"]["ErrorCode"]["enum"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(codes, 18);
    }

    #[test]
    fn cursors_round_trip() {
        let c = (Utc::now(), Uuid::new_v4());
        let back = decode_cursor(&encode_cursor(c)).unwrap();
        assert_eq!(back.1, c.1);
        assert!(decode_cursor("garbage").is_none());
    }
}

/// `producer serve`: listens on `api.listen`, then runs [`run_server_on`].
pub async fn run_server(
    settings: std::sync::Arc<crate::Settings>,
    metrics: Option<PrometheusHandle>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> ServerResult<()> {
    let listener = tokio::net::TcpListener::bind(settings.api.listen)
        .await
        .map_err(|e| {
            ServerError::Setup(format!("cannot listen on {}: {e}", settings.api.listen))
        })?;
    run_server_on(listener, settings, metrics, shutdown).await
}

/// Migrates, then serves the API on `listener` (bound by the caller, as with socket activation or a test's
/// port 0) and runs the reconciler until `shutdown`.
pub async fn run_server_on(
    listener: tokio::net::TcpListener,
    settings: std::sync::Arc<crate::Settings>,
    metrics: Option<PrometheusHandle>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> ServerResult<()> {
    // Migrations as the admin role; requests as the app role, under row-level security. With the app role's
    // credentials only, the migrations were run before (`producer migrate` as the owner).
    if crate::db::can_migrate(&settings)
        .await
        .map_err(ServerError::Db)?
    {
        crate::db::migrate(&settings)
            .await
            .map_err(ServerError::Db)?
            .close()
            .await;
    } else {
        tracing::info!("database_url is the app role's: leaving migrations to `producer migrate`");
    }
    let pool = crate::db::connect(&settings, 16)
        .await
        .map_err(ServerError::Db)?;
    let broker = Broker::connect(settings.redis_url.expose(), settings.queue.clone())
        .await
        .map_err(ServerError::Queue)?;
    let quota = crate::quota::Quota::connect(&settings)
        .await
        .map_err(|e| ServerError::Setup(format!("cannot reach Redis for the quota state: {e}")))?;
    let embedder = crate::providers::embedder(&settings, Some(&quota))
        .map_err(|e| ServerError::Setup(e.to_string()))?;
    // The producer pushes and reconciles stages but never parses: it needs no LlamaParse client (nor its key).
    let parser: std::sync::Arc<dyn crate::providers::Parser> = std::sync::Arc::new(
        crate::providers::local::LocalParser::new(&settings.pipeline),
    );
    let pipeline = Pipeline::new(pool, &broker, embedder, parser, settings.clone())
        .map_err(ServerError::Queue)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let identity = format!(
        "producer-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    );
    let mut rx = stop_rx.clone();
    let reconciler = tokio::spawn(crate::reconciler::run(
        pipeline.clone(),
        identity,
        async move {
            let _ = rx.wait_for(|s| *s).await;
        },
    ));
    if settings.api.jwt_secret.expose() == crate::settings::DEV_JWT_SECRET {
        tracing::warn!(
            "Using the built-in development JWT secret: set JWT_SECRET before exposing the API"
        );
    }
    let local = listener
        .local_addr()
        .map_err(|e| ServerError::Setup(format!("listener has no address: {e}")))?;
    tracing::info!(listen = %local, "Producer API serving");
    let state = state(pipeline, broker, metrics).map_err(|e| ServerError::Setup(e.to_string()))?;
    let served = serve(listener, state, async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    })
    .await;
    let _ = reconciler.await;
    served.map_err(|e| ServerError::Setup(e.to_string()))
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The database.
    #[error(transparent)]
    Db(DbError),
    /// Redis.
    #[error(transparent)]
    Queue(crate::queue::QueueError),
    /// Anything else at start-up.
    #[error("{0}")]
    Setup(String),
}

/// Result of [`run_server`].
pub type ServerResult<T> = Result<T, ServerError>;
