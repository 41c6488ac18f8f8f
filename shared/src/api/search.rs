//! The search handler: the caller's chunks nearest to a query in meaning.

use std::{fmt, time::Instant};

use axum::{
    Json,
    extract::{State, rejection::JsonRejection},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Deserializer, Serialize, de};
use utoipa::ToSchema;

use super::{
    ApiState,
    error::{ApiError, ErrorBody, ErrorCode},
    extract::Caller,
    types::Hit,
};
use crate::{documents, metrics as m};

/// A search.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// What to look for, in natural language.
    #[schema(min_length = 1, max_length = 4000)]
    pub query: String,
    /// How many chunks to return (at most `api.max_search_k`, 50 by default).
    #[serde(default = "default_k", deserialize_with = "integer")]
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

/// An `i64` that also reads a float without a fraction (`39.0`): JSON Schema counts it as an integer, so clients
/// that spell numbers as floats send valid requests.
fn integer<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    struct Integer;

    impl de::Visitor<'_> for Integer {
        type Value = i64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("i64")
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
            // `i64::MAX as f64` rounds up to 2^63, one past the largest i64: hence the open end.
            let in_range = (i64::MIN as f64..i64::MAX as f64).contains(&v);
            if v.fract() == 0.0 && in_range {
                Ok(v as i64)
            } else {
                Err(E::invalid_type(de::Unexpected::Float(v), &self))
            }
        }
    }

    deserializer.deserialize_i64(Integer)
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
pub(super) async fn search(
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
            ErrorCode::InvalidQuery,
            "query must be 1 to 4000 characters",
        ));
    }
    if req.k < 1 || req.k > max_k as i64 {
        return Err(ApiError::new(
            ErrorCode::InvalidK,
            format!("k must be between 1 and {max_k}"),
        ));
    }
    let embedder = &state.pipeline.embedder;
    let vectors = embedder.embed(&[query.to_owned()]).await.map_err(|e| {
        tracing::warn!(error = %e, "Embedding the query failed");
        ApiError::new(
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
        results: hits.into_iter().map(Hit::from).collect(),
        took_ms: (took.as_secs_f64() * 1e5).round() / 100.0,
        embedding_model: embedder.model().to_owned(),
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(body: &str) -> Result<i64, String> {
        serde_json::from_str::<SearchRequest>(body)
            .map(|r| r.k)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn k_reads_integers_and_floats_without_a_fraction() {
        assert_eq!(k(r#"{"query": "q", "k": 39}"#), Ok(39));
        assert_eq!(k(r#"{"query": "q", "k": 39.0}"#), Ok(39));
        assert_eq!(k(r#"{"query": "q", "k": 1e1}"#), Ok(10));
        assert_eq!(k(r#"{"query": "q"}"#), Ok(5));
    }

    #[test]
    fn k_refuses_fractions_and_other_types_as_an_i64_would() {
        let refused = k(r#"{"query": "q", "k": 39.5}"#).unwrap_err();
        assert!(refused.starts_with("invalid type: floating point `39.5`, expected i64"));
        let refused = k(r#"{"query": "q", "k": "5"}"#).unwrap_err();
        assert!(refused.starts_with("invalid type: string \"5\", expected i64"));
        assert!(k(r#"{"query": "q", "k": 1e300}"#).is_err());
        assert!(k(r#"{"query": "q", "k": 18446744073709551615}"#).is_err());
    }
}
