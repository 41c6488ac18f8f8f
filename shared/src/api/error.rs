//! The API's errors: the stable codes, the `{"error": {"code", "message"}}` body, and the conversions from the
//! library's errors.

use axum::{
    Json,
    extract::rejection::{JsonRejection, QueryRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    db::DbError, documents::UploadError, parsing::ParseError, queue::QueueError,
    search::SearchError,
};

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
    /// 422: a search `mode` other than `hybrid`, `vector` or `keyword`.
    InvalidMode,
    /// 422: a search `filters` that is malformed; the message names the part (`filters.filters[1].type`).
    InvalidFilter,
    /// 422: a search asked for `rerank` where no reranker is configured (`search.rerank.model`).
    RerankNotConfigured,
    /// 429: too many uploads from this user; `Retry-After` says when to try again.
    RateLimited,
    /// 503: Postgres, Redis or the embedding provider is unavailable; try again.
    Unavailable,
    /// 504: the search took longer than `search.timeout` in Postgres (a narrower filter or a shorter query may
    /// help; the same search again will likely take as long).
    SearchTimeout,
    /// 500: a bug; the details are in the server's logs.
    Internal,
}

impl ErrorCode {
    /// The status the code is answered with; `invalid_request` is also answered with 422 when a request that
    /// parses holds a value of the wrong type or out of range.
    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidRequest | Self::InvalidJson | Self::EmptyFile | Self::InvalidMetadata => {
                StatusCode::BAD_REQUEST
            }
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::IdempotencyConflict | Self::NotFailed => StatusCode::CONFLICT,
            Self::FileTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::InvalidDocument
            | Self::InvalidText
            | Self::InvalidQuery
            | Self::InvalidK
            | Self::InvalidMode
            | Self::InvalidFilter
            | Self::RerankNotConfigured => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::SearchTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
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
    /// An error answered with its code's status.
    pub(super) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: code.status(),
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 422 `invalid_request`: the request parses, but a value in it is of the wrong type or out of range.
    pub(super) fn unprocessable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            ..Self::new(ErrorCode::InvalidRequest, message)
        }
    }

    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The message for people.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// 404 `not_found` for a document that does not exist or is another user's.
    pub(super) fn not_found() -> Self {
        Self::new(ErrorCode::NotFound, "no such document")
    }

    /// Adds a `Retry-After` header of `secs` seconds.
    pub(super) fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
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
                ErrorCode::Unavailable,
                "the database is unavailable; try again",
            )
        } else {
            tracing::error!(error = %e, "Database error");
            Self::new(ErrorCode::Internal, "internal error")
        }
    }
}

impl From<SearchError> for ApiError {
    fn from(e: SearchError) -> Self {
        match e {
            SearchError::Timeout(_) => {
                tracing::warn!(error = %e, "Search timed out");
                Self::new(ErrorCode::SearchTimeout, e.to_string())
            }
            // The SQL check's paths start at `filter`, the request's at `filters`.
            SearchError::Invalid(ref message) if e.is_filter() => {
                tracing::warn!(error = %e, "search_chunks refused a filter the API had accepted");
                let part = message.strip_prefix("filter").unwrap_or(message);
                Self::new(ErrorCode::InvalidFilter, format!("filters{part}"))
            }
            SearchError::Invalid(message) => {
                tracing::warn!(error = %message, "search_chunks refused an argument the API had accepted");
                Self::unprocessable(message)
            }
            SearchError::Db(e) => e.into(),
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        tracing::warn!(error = %e, "Queue operation failed");
        Self::new(ErrorCode::Unavailable, "Redis is unavailable; try again")
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
        match e {
            UploadError::IdempotencyConflict => {
                Self::new(ErrorCode::IdempotencyConflict, e.to_string())
            }
            UploadError::Db(e) => e.into(),
        }
    }
}

impl From<ParseError> for ApiError {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::Empty => Self::new(ErrorCode::EmptyFile, "the file is empty"),
            ParseError::Unsupported(m) => Self::new(ErrorCode::UnsupportedMediaType, m),
            ParseError::InvalidText(m) => Self::new(ErrorCode::InvalidText, m),
            other => Self::new(ErrorCode::InvalidDocument, other.to_string()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self::new(ErrorCode::InvalidRequest, e.body_text())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        match e {
            JsonRejection::MissingJsonContentType(_) => Self::new(
                ErrorCode::UnsupportedMediaType,
                "send Content-Type: application/json",
            ),
            JsonRejection::JsonDataError(e) => Self::unprocessable(e.body_text()),
            other => Self::new(ErrorCode::InvalidJson, other.body_text()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn search_errors_are_a_timeout_or_the_part_of_the_filter_at_fault() {
        let timeout = ApiError::from(SearchError::Timeout(Duration::from_secs(10)));
        assert_eq!(
            (timeout.code(), timeout.status, timeout.message()),
            (
                ErrorCode::SearchTimeout,
                StatusCode::GATEWAY_TIMEOUT,
                "the search took longer than 10s"
            )
        );
        // search_chunks names the filter's parts from `filter`, the API from `filters`.
        let filter = ApiError::from(SearchError::Invalid(
            "filter.filters[2].value: document_id is compared with UUID strings".into(),
        ));
        assert_eq!(
            (filter.code(), filter.status, filter.message()),
            (
                ErrorCode::InvalidFilter,
                StatusCode::UNPROCESSABLE_ENTITY,
                "filters.filters[2].value: document_id is compared with UUID strings"
            )
        );
        let other = ApiError::from(SearchError::Invalid(
            "match_count must be between 1 and 100, got 0".into(),
        ));
        assert_eq!(
            (other.code(), other.status),
            (ErrorCode::InvalidRequest, StatusCode::UNPROCESSABLE_ENTITY)
        );
    }
}
