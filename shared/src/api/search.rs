//! The search handler: the caller's chunks of ready documents for a query, hybrid (by default), vector or keyword,
//! narrowed by filters on the documents. The search itself is [`crate::search`].

use std::{fmt, time::Instant};

use axum::{
    Json,
    extract::{State, rejection::JsonRejection},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Deserializer, Serialize, de};
use serde_json::Value;
use utoipa::ToSchema;

use super::{
    ApiState,
    error::{ApiError, ErrorBody, ErrorCode},
    extract::Caller,
    types::Hit,
};
use crate::{
    metrics as m,
    search::{self, Filter, SearchMode},
};

/// A search.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// What to look for: natural language for the vector list; for the keyword list, words that must all appear,
    /// `"a quoted phrase"`, `or`, and `-word` to exclude (Postgres `websearch_to_tsquery`).
    #[schema(min_length = 1, max_length = 4000)]
    pub query: String,
    /// How many chunks to return (at most `api.max_search_k`, 50 by default).
    #[serde(default = "default_k", deserialize_with = "integer")]
    #[schema(minimum = 1, maximum = 50, default = 5)]
    pub k: i64,
    /// `hybrid` (default: both lists fused by reciprocal rank), `vector` (by meaning) or `keyword` (by words; the
    /// query is not embedded).
    #[serde(default)]
    #[schema(default = "hybrid")]
    pub mode: SearchMode,
    /// Only chunks of documents that pass this filter (OpenAI's vector store `filters`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<Filter>,
}

impl SearchRequest {
    /// A hybrid search for `query`, 5 hits, no filter.
    pub fn new(query: impl Into<String>) -> Self {
        Self {
            query: query.into(),
            k: default_k(),
            mode: SearchMode::default(),
            filters: None,
        }
    }

    /// Returns `k` hits.
    pub fn k(mut self, k: u32) -> Self {
        self.k = k.into();
        self
    }

    /// Ranks by `mode`.
    pub fn mode(mut self, mode: SearchMode) -> Self {
        self.mode = mode;
        self
    }

    /// Looks only in documents that pass `filter`.
    pub fn filters(mut self, filter: Filter) -> Self {
        self.filters = Some(filter);
        self
    }
}

/// The body as read before `mode` and `filters` are checked, so that those answer `invalid_mode` and
/// `invalid_filter` with the part at fault rather than serde's `invalid_request`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSearchRequest {
    query: String,
    #[serde(default = "default_k", deserialize_with = "integer")]
    k: i64,
    /// `Some(Value::Null)` for `"mode": null`, which is refused: the schema does not make `mode` nullable.
    #[serde(default, deserialize_with = "present")]
    mode: Option<Value>,
    #[serde(default)]
    filters: Option<Value>,
}

/// A field that is present, `null` included (plain `Option` reads `null` as absent).
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

impl RawSearchRequest {
    /// The request, with its mode and filter checked.
    fn check(self) -> Result<SearchRequest, ApiError> {
        let mode = match self.mode {
            None => SearchMode::default(),
            Some(mode) => serde_json::from_value(mode).map_err(|_| {
                ApiError::new(
                    ErrorCode::InvalidMode,
                    "mode must be \"hybrid\", \"vector\" or \"keyword\"",
                )
            })?,
        };
        let filters = match self.filters {
            None | Some(Value::Null) => None,
            Some(filters) => Some(
                Filter::parse(&filters)
                    .map_err(|e| ApiError::new(ErrorCode::InvalidFilter, e.to_string()))?,
            ),
        };
        Ok(SearchRequest {
            query: self.query,
            k: self.k,
            mode,
            filters,
        })
    }
}

/// Search results.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SearchResponse {
    /// Best first.
    pub results: Vec<Hit>,
    /// Time taken in the server, query embedding included.
    pub took_ms: f64,
    /// How the results were ranked.
    pub mode: SearchMode,
    /// The model the query and the chunks were embedded with (in `keyword` mode, the configured model, unused).
    pub embedding_model: String,
}

fn default_k() -> i64 {
    5
}

/// The longest query, in characters, as sent and once normalised.
const MAX_QUERY_CHARS: usize = 4000;

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

/// The `k` best chunks of the caller's ready documents for the query: hybrid (vector and keyword lists fused by
/// reciprocal rank), vector or keyword, among the documents that pass `filters`.
#[utoipa::path(
    post, path = "/v1/search", tag = "search",
    request_body = SearchRequest,
    responses(
        (status = 200, description = "Results, best first", body = SearchResponse),
        (status = 400, description = "`invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type` (send application/json)", body = ErrorBody),
        (status = 422, description = "`invalid_query`, `invalid_k`, `invalid_mode`, `invalid_filter` (the message \
                                      names the part, e.g. `filters.filters[1].type`), `invalid_request`", body = ErrorBody),
        (status = 503, description = "`unavailable` (database or embedding provider)", body = ErrorBody),
        (status = 504, description = "`search_timeout` (longer than `search.timeout` in Postgres)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn search(
    State(state): State<ApiState>,
    Caller(user): Caller,
    body: Result<Json<RawSearchRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let Json(raw) = body?;
    let req = raw.check()?;
    let max_k = state.pipeline.settings.api.max_search_k;
    let query = req.query.trim();
    // Matched in the form chunks are stored in (ligatures, full-width forms, invisible characters), without the
    // NUL characters Postgres cannot take in text (the keyword list reads the query there). The limit holds after
    // normalising too: NFKC makes up to 18 characters of one (U+FDFA), so 4,000 could become 72,000.
    let fits = |q: &str| q.chars().count() <= MAX_QUERY_CHARS;
    let query = fits(query)
        .then(|| crate::text::normalize(query).replace('\0', " "))
        .filter(|q| !q.trim().is_empty() && fits(q));
    let Some(query) = query else {
        return Err(ApiError::new(
            ErrorCode::InvalidQuery,
            format!(
                "query must be 1 to {MAX_QUERY_CHARS} characters, also in Unicode compatibility form (NFKC)"
            ),
        ));
    };
    if req.k < 1 || req.k > max_k as i64 {
        return Err(ApiError::new(
            ErrorCode::InvalidK,
            format!("k must be between 1 and {max_k}"),
        ));
    }
    let embedder = &state.pipeline.embedder;
    let embedding = if req.mode.needs_embedding() {
        let mut vectors = embedder
            .embed(std::slice::from_ref(&query))
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "Embedding the query failed");
                ApiError::new(
                    ErrorCode::Unavailable,
                    format!("the embedding provider is unavailable: {e}"),
                )
            })?;
        vectors.pop()
    } else {
        None
    };
    let hits = search::search(
        &state.pipeline.pool,
        user,
        &state.pipeline.settings.search,
        &search::Query {
            text: &query,
            embedding: embedding.as_deref(),
            model: embedder.model(),
            k: req.k as u32,
            mode: req.mode,
            filter: req.filters.as_ref(),
        },
    )
    .await?;
    let took = started.elapsed();
    metrics::histogram!(m::SEARCH_DURATION).record(took.as_secs_f64());
    Ok(Json(SearchResponse {
        results: hits.into_iter().map(Hit::from).collect(),
        took_ms: (took.as_secs_f64() * 1e5).round() / 100.0,
        mode: req.mode,
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

    fn checked(body: &str) -> Result<SearchRequest, (ErrorCode, String)> {
        let raw: RawSearchRequest = serde_json::from_str(body).expect("parses");
        raw.check().map_err(|e| (e.code(), e.message().to_owned()))
    }

    #[test]
    fn mode_and_filters_default_to_hybrid_and_none_and_are_checked() {
        let req = checked(r#"{"query": "q"}"#).unwrap();
        assert_eq!((req.mode, req.filters), (SearchMode::Hybrid, None));
        let req = checked(r#"{"query": "q", "mode": "keyword", "filters": null}"#).unwrap();
        assert_eq!((req.mode, req.filters), (SearchMode::Keyword, None));
        let filter = r#"{"type": "eq", "key": "team", "value": "ops"}"#;
        let req = checked(&format!(r#"{{"query": "q", "filters": {filter}}}"#)).unwrap();
        assert_eq!(
            req.filters,
            Some(Filter::compare(search::ComparisonOp::Eq, "team", "ops"))
        );
        let (code, _) = checked(r#"{"query": "q", "mode": "fuzzy"}"#).unwrap_err();
        assert_eq!(code, ErrorCode::InvalidMode);
        let (code, _) = checked(r#"{"query": "q", "mode": null}"#).unwrap_err();
        assert_eq!(code, ErrorCode::InvalidMode);
        let bad = r#"{"type": "or", "filters": [{"type": "eq", "key": "a", "value": 1}, {"type": "like"}]}"#;
        let (code, message) =
            checked(&format!(r#"{{"query": "q", "filters": {bad}}}"#)).unwrap_err();
        assert_eq!(code, ErrorCode::InvalidFilter);
        assert!(
            message.starts_with("filters.filters[1].type: unknown filter type 'like'"),
            "{message}"
        );
    }

    #[test]
    fn the_typed_request_writes_what_the_handler_reads() {
        let req = SearchRequest::new("q")
            .k(7)
            .mode(SearchMode::Vector)
            .filters(Filter::compare(search::ComparisonOp::Gte, "year", 2024));
        let raw: RawSearchRequest =
            serde_json::from_value(serde_json::to_value(&req).unwrap()).unwrap();
        let back = raw.check().unwrap();
        assert_eq!(
            (back.k, back.mode, back.filters),
            (7, SearchMode::Vector, req.filters)
        );
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
