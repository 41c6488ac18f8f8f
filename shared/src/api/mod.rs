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
//! | `POST /v1/search` | `{query, k, mode, filters, rerank}` | 200 `{results, took_ms, mode, embedding_model, reranked}`; hits of ready documents with citations |
//! | `GET /v1/admin/failures?stage=&since=&user=&limit=` | admin claim: failed documents of every user | 200 `{counts, documents}` |
//! | `GET /healthz`, `/readyz`, `/metrics` | liveness; Postgres and Redis reachable; Prometheus | |
//!
//! Error codes: `invalid_request` 400, `invalid_json` 400, `empty_file` 400, `invalid_metadata` 400,
//! `unauthorized` 401, `forbidden` 403, `not_found` 404, `idempotency_conflict` 409, `not_failed` 409, `file_too_large` 413,
//! `unsupported_media_type` 415, `invalid_document` 422, `invalid_text` 422, `invalid_query` 422, `invalid_k` 422,
//! `invalid_mode` 422, `invalid_filter` 422, `rerank_not_configured` 422, `rate_limited` 429, `unavailable` 503,
//! `search_timeout` 504, `internal` 500.
//!
//! Each concern has its file: `error` the codes and the error body, `extract` the caller and path extractors,
//! `documents` (with `upload` for reading the form), `search`, `admin` and `ops` the handlers, `types` the wire
//! shapes of stored records, `openapi` the document, `server` the bootstrap.

mod admin;
mod documents;
mod error;
mod extract;
mod openapi;
mod ops;
mod search;
mod server;
mod types;
mod upload;

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, MatchedPath, Request},
    middleware::{self, Next},
    response::Response,
    routing::{get, post},
};
use metrics_exporter_prometheus::PrometheusHandle;
use utoipa::OpenApi as _;

pub use self::{
    admin::{
        BudgetEntry, DeadLetterAction, DeadLetterEntry, DeadLetterIds, Failures, Moved,
        PipelineStage, QueueState, Resumed,
    },
    documents::{DocumentPage, DocumentStatus, RetryResponse, UploadResponse},
    error::{ApiError, ErrorBody, ErrorCode, ErrorDetail},
    extract::{Admin, Caller, DocumentId},
    openapi::{ApiDoc, openapi_json},
    ops::{Health, Readiness},
    search::{SearchRequest, SearchResponse},
    server::{ServerError, ServerResult, run_server, run_server_on, serve},
    types::{Document, Hit, StageStatus},
    upload::sanitize_filename,
};
/// The wire types of a search request that the search module defines: its mode and its filters.
pub use crate::search::{
    ComparisonFilter, ComparisonOp, CompoundFilter, CompoundOp, Filter, FilterError, FilterValue,
    Scalar, SearchMode,
};
use crate::{auth::Auth, jobs::Pipeline, metrics as m, queue::Broker};

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
    /// The search reranker, when one is configured (`search.rerank.model`).
    pub reranker: Option<std::sync::Arc<dyn crate::providers::Reranker>>,
}

/// Shared pieces for binaries and tests, without a reranker; fails when the JWKS file is unusable.
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
        reranker: None,
    })
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    let body_limit = state.pipeline.settings.api.max_upload_bytes as usize + 1024 * 1024;
    Router::new()
        .route(
            "/v1/documents",
            post(documents::upload).get(documents::list),
        )
        .route(
            "/v1/documents/{id}",
            get(documents::status).delete(documents::remove),
        )
        .route("/v1/documents/{id}/retry", post(documents::retry_document))
        .route("/v1/search", post(search::search))
        .route("/v1/admin/queues", get(admin::admin_queues))
        .route("/v1/admin/failures", get(admin::admin_failures))
        .route(
            "/v1/admin/dead-letters/{stage}",
            get(admin::admin_dead_letters),
        )
        .route(
            "/v1/admin/dead-letters/{stage}/{action}",
            post(admin::admin_dead_letter_action),
        )
        .route("/v1/admin/quota", get(admin::admin_quota))
        .route(
            "/v1/admin/quota/{provider}/resume",
            post(admin::admin_resume),
        )
        .route("/healthz", get(ops::healthz))
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::render_metrics))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route") })
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
