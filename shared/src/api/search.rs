//! The search handler: the caller's chunks of ready documents for a query, hybrid (by default), vector or keyword,
//! narrowed by filters on the documents, and optionally reranked. The search itself is [`crate::search`].
//!
//! The query's vector is asked for up to three times when the provider fails in a way worth retrying (a 5xx, a
//! timeout, a 429), as OpenAI's own clients do, within five seconds of the search's start; then the answer is 503
//! `unavailable`.
//!
//! A reranker that fails never fails the search: the answer is the fused order with `reranked: false`, the failure
//! logged and counted (`upload_pipeline_search_rerank_failures_total`). Search is what agents depend on, and the
//! fused order is a good answer; a reranker that stays refused (a bad key, a wrong model) shows on that counter,
//! by reason, and in the logs, and a refused key pauses it fleet-wide instead of being asked on every search.

use std::{
    fmt,
    time::{Duration, Instant},
};

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
    providers::{ProviderError, Reranker},
    search::{self, Filter, SearchMode},
};

/// A search.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// What to look for: natural language for the vector list; for the keyword list, words: the chunks holding
    /// all of them first, then (a query of at most about 15 words) those holding some, ranked by BM25;
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
    /// Rerank the best hits with the configured reranker (`true`) or not (`false`); absent or null: as
    /// `search.rerank.enabled` says (off by default). `true` where no reranker is configured is refused with 422
    /// `rerank_not_configured`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerank: Option<bool>,
}

impl SearchRequest {
    /// A hybrid search for `query`, 5 hits, no filter.
    pub fn new(query: impl Into<String>) -> Self {
        Self {
            query: query.into(),
            k: default_k(),
            mode: SearchMode::default(),
            filters: None,
            rerank: None,
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

    /// Reranks the best hits (`true`) or not (`false`), whatever `search.rerank.enabled` says.
    pub fn rerank(mut self, rerank: bool) -> Self {
        self.rerank = Some(rerank);
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
    #[serde(default)]
    rerank: Option<bool>,
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
            rerank: self.rerank,
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
    /// Whether `results` are in the reranker's order (each with its `rerank_score`). False when reranking was not
    /// asked for, and when the reranker failed: then `results` are the mode's order, as without reranking.
    #[serde(default)]
    pub reranked: bool,
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
///
/// Reranked when asked (`rerank`, else `search.rerank.enabled`): the best `search.rerank.candidates`, and at least
/// `k`, reordered by the reranker; when it fails, the mode's order with `reranked: false`.
#[utoipa::path(
    post, path = "/v1/search", tag = "search",
    request_body = SearchRequest,
    responses(
        (status = 200, description = "Results, best first", body = SearchResponse),
        (status = 400, description = "`invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type` (send application/json)", body = ErrorBody),
        (status = 422, description = "`invalid_query`, `invalid_k`, `invalid_mode`, `invalid_filter` (the message \
                                      names the part, e.g. `filters.filters[1].type`), `rerank_not_configured` \
                                      (`rerank: true` where no reranker is configured), `invalid_request`", body = ErrorBody),
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
    let reranker = chosen_reranker(&state, req.rerank)?;
    let embedder = &state.pipeline.embedder;
    let embedding = if req.mode.needs_embedding() {
        let mut vectors = embed_query(embedder.as_ref(), &query).await.map_err(|e| {
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
            // The reranker chooses among the best candidates, and at least k.
            k: match reranker {
                Some(_) => (req.k as u32).max(state.pipeline.settings.search.rerank.candidates),
                None => req.k as u32,
            },
            mode: req.mode,
            filter: req.filters.as_ref(),
        },
    )
    .await?;
    let (results, reranked) = match reranker {
        Some(reranker) => rerank(reranker.as_ref(), &query, hits, req.k as usize).await,
        None => (hits.into_iter().map(Hit::from).collect(), false),
    };
    let took = started.elapsed();
    metrics::histogram!(m::SEARCH_DURATION, "mode" => req.mode.as_str()).record(took.as_secs_f64());
    Ok(Json(SearchResponse {
        results,
        took_ms: (took.as_secs_f64() * 1e5).round() / 100.0,
        mode: req.mode,
        embedding_model: embedder.model().to_owned(),
        reranked,
    })
    .into_response())
}

/// How many times a search asks for its query's vector when the provider fails in a way worth retrying.
const QUERY_EMBED_ATTEMPTS: u32 = 3;
/// Asking again happens only within this long of the search's start, every later attempt cut off at its end: a
/// caller is waiting, so retries add at most this to a search (the first attempt is bounded by the provider
/// client's own timeout, as without them), and a provider that names a longer delay, or a fleet budget spoken for
/// longer, gets the 503 at once.
const QUERY_EMBED_RETRY_WINDOW: Duration = Duration::from_secs(5);

/// The query's vector, asked for again after a retryable failure (a 5xx, a timeout, a 429, the fleet's budget
/// busy), as OpenAI's own clients do: up to [`QUERY_EMBED_ATTEMPTS`] in all, waiting what the provider asked for,
/// else 100 ms then 300 ms (a fifth either way at random, so that searches failed together do not ask again
/// together), all within [`QUERY_EMBED_RETRY_WINDOW`]. A refused key or an exhausted quota is not asked again.
async fn embed_query(
    embedder: &dyn crate::providers::Embedder,
    query: &str,
) -> Result<Vec<Vec<f32>>, ProviderError> {
    let texts = [query.to_owned()];
    let deadline = tokio::time::Instant::now() + QUERY_EMBED_RETRY_WINDOW;
    let mut last = match embedder.embed(&texts).await {
        Ok(vectors) => return Ok(vectors),
        Err(e) => e,
    };
    for attempt in 1..QUERY_EMBED_ATTEMPTS {
        if !last.is_retryable() {
            break;
        }
        let backoff = Duration::from_millis(100 * 3u64.pow(attempt - 1))
            .mul_f64(rand::random_range(0.8..1.2));
        let pause = last.retry_after().unwrap_or(backoff);
        if tokio::time::Instant::now() + pause >= deadline {
            break;
        }
        tracing::debug!(error = %last, attempt, "Embedding the query failed; asking again");
        tokio::time::sleep(pause).await;
        match tokio::time::timeout_at(deadline, embedder.embed(&texts)).await {
            Ok(Ok(vectors)) => return Ok(vectors),
            Ok(Err(e)) => last = e,
            // Out of time: the failure the caller hears of is the last answer's.
            Err(_) => break,
        }
    }
    Err(last)
}

/// The reranker a search uses: the request's `rerank`, else `search.rerank.enabled`; asking for one where none is
/// configured is refused.
fn chosen_reranker(
    state: &ApiState,
    asked: Option<bool>,
) -> Result<Option<std::sync::Arc<dyn Reranker>>, ApiError> {
    if !asked.unwrap_or(state.pipeline.settings.search.rerank.enabled) {
        return Ok(None);
    }
    match &state.reranker {
        Some(reranker) => Ok(Some(reranker.clone())),
        None => Err(ApiError::new(
            ErrorCode::RerankNotConfigured,
            "no reranker is configured (search.rerank.model): leave rerank out, or set it to false",
        )),
    }
}

/// The `k` best of `hits` (in the mode's order) in the reranker's order, each with its score, and `true`; when the
/// reranker fails, the first `k` in the mode's order and `false`, the failure logged and counted.
async fn rerank(
    reranker: &dyn Reranker,
    query: &str,
    mut hits: Vec<search::Hit>,
    k: usize,
) -> (Vec<Hit>, bool) {
    if hits.is_empty() {
        return (Vec::new(), true);
    }
    let documents: Vec<String> = hits.iter().map(|h| h.content.clone()).collect();
    match reranker.rerank(query, &documents, k).await {
        Ok(ranked) => {
            let mut slots: Vec<Option<search::Hit>> = hits.into_iter().map(Some).collect();
            let results = ranked
                .into_iter()
                .filter_map(|r| {
                    let hit = slots.get_mut(r.index)?.take()?;
                    Some(Hit {
                        rerank_score: Some(r.score),
                        ..Hit::from(hit)
                    })
                })
                .collect();
            (results, true)
        }
        Err(e) => {
            let (provider, reason) = (reranker.provider(), e.outcome());
            match e {
                // Not something the next search's luck changes: an operator has to act.
                ProviderError::Permanent { .. }
                | ProviderError::Unauthorized { .. }
                | ProviderError::QuotaExhausted { .. } => {
                    tracing::error!(provider, reason, error = %e, "Reranking failed; the search answers in fused order")
                }
                _ => {
                    tracing::warn!(provider, reason, error = %e, "Reranking failed; the search answers in fused order")
                }
            }
            metrics::counter!(m::SEARCH_RERANK_FAILURES, "reason" => reason).increment(1);
            hits.truncate(k);
            (hits.into_iter().map(Hit::from).collect(), false)
        }
    }
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
            .filters(Filter::compare(search::ComparisonOp::Gte, "year", 2024))
            .rerank(false);
        let raw: RawSearchRequest =
            serde_json::from_value(serde_json::to_value(&req).unwrap()).unwrap();
        let back = raw.check().unwrap();
        assert_eq!(
            (back.k, back.mode, back.filters, back.rerank),
            (7, SearchMode::Vector, req.filters, Some(false))
        );
        let plain = serde_json::to_value(SearchRequest::new("q")).unwrap();
        assert!(plain.get("rerank").is_none(), "{plain}");
        assert_eq!(
            checked(r#"{"query": "q", "rerank": null}"#).unwrap().rerank,
            None
        );
        assert_eq!(
            checked(r#"{"query": "q", "rerank": true}"#).unwrap().rerank,
            Some(true)
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
