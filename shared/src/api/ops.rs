//! The operations endpoints: liveness, readiness and Prometheus metrics.

use axum::{
    Json,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    ApiState,
    error::{ApiError, ErrorCode},
};
use crate::{gauges, jobs::Stage};

/// Liveness.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
}

/// The process answers (it does not look at its dependencies).
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Alive", body = Health)))]
pub(super) async fn healthz() -> Json<Health> {
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
pub(super) async fn readyz(State(state): State<ApiState>) -> Response {
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
pub(super) async fn render_metrics(State(state): State<ApiState>) -> Response {
    for stage in Stage::PIPELINE {
        if let Ok(queue) = state.broker.handle(stage.as_str()) {
            gauges::refresh_queue_gauges(&queue).await;
        }
    }
    gauges::refresh_document_gauges(&state.pipeline.pool).await;
    let quota =
        crate::quota::Quota::with_connection(state.broker.connection(), &state.pipeline.settings);
    gauges::refresh_quota_gauges(&quota).await;
    gauges::collect_process();
    match &state.metrics {
        Some(h) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => ApiError::new(ErrorCode::NotFound, "metrics are not enabled").into_response(),
    }
}
