//! Search: the caller's chunks of ready documents for a query, by meaning (`vector`), by words (`keyword`), or
//! both fused by reciprocal rank (`hybrid`), narrowed by [`Filter`]s on the documents, with what a citation needs.
//!
//! Every door ends in one SQL function, `upload_pipeline.search_chunks` (migration `20261201000001`), which
//! agents call in SQL too: the REST handler only checks the request, embeds the query (not in keyword mode) and
//! calls [`search`], which runs it under the caller's row-level security.

mod filter;
mod parse;
mod schema;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

pub use self::filter::{
    ComparisonFilter, ComparisonOp, CompoundFilter, CompoundOp, DOCUMENT_FIELDS, Filter,
    FilterError, FilterValue, MAX_DEPTH, MAX_FILTERS, MAX_KEY_CHARS, MAX_STRING_CHARS,
    MAX_TOTAL_VALUES, MAX_VALUES, Scalar,
};
use crate::{
    db::{self, DbError},
    settings::SearchSettings,
};

/// How a search ranks chunks.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// Both lists below, fused by reciprocal rank: `score` is the sum of `weight / (rrf_k + rank)` over the lists
    /// the chunk is in (the keyword list's weight times `search.identifier_boost` for an identifier-like query).
    #[default]
    Hybrid,
    /// Nearest in meaning (cosine similarity on the model's HNSW index): `score` is the similarity, 1 = same
    /// direction.
    Vector,
    /// Matching the words (Postgres full text, `websearch_to_tsquery` syntax: `"a phrase"`, `or`, `-word`): `score`
    /// is BM25 scaled to 0..1, the chunks holding every word above 0.5 and those holding some below; for a query
    /// of more than 16 terms, or whose every word is in over 1,000 of the user's chunks, `ts_rank_cd` scaled to
    /// 0..1 over the chunks holding every word. The query is not embedded.
    Keyword,
}

impl SearchMode {
    /// The name on the wire and in SQL.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Hybrid => "hybrid",
            Self::Vector => "vector",
            Self::Keyword => "keyword",
        }
    }

    /// Whether the query must be embedded (every mode but `keyword`).
    pub const fn needs_embedding(self) -> bool {
        !matches!(self, Self::Keyword)
    }
}

impl std::fmt::Display for SearchMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One search, checked by the caller.
#[derive(Debug, Clone)]
pub struct Query<'a> {
    /// The query's text (keyword and hybrid modes).
    pub text: &'a str,
    /// Its vector (vector and hybrid modes; `None` in keyword mode).
    pub embedding: Option<&'a [f32]>,
    /// The model the vector and the chunks were embedded with.
    pub model: &'a str,
    /// How many hits, 1 to 100.
    pub k: u32,
    /// How they are ranked.
    pub mode: SearchMode,
    /// Which documents to look in (checked: [`Filter::parse`]).
    pub filter: Option<&'a Filter>,
}

/// A hit, with what a citation needs.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Hit {
    /// The chunk.
    #[sqlx(rename = "id")]
    pub chunk_id: Uuid,
    /// Its document.
    pub document_id: Uuid,
    /// The document's file name.
    pub filename: String,
    /// The document's MIME type.
    pub content_type: String,
    /// The chunk's position in the document.
    pub chunk_index: i32,
    /// The chunk's text.
    pub content: String,
    /// The chunk's metadata: `page`, `headings`, `span`.
    pub metadata: serde_json::Value,
    /// The document's metadata, as uploaded.
    pub document_metadata: serde_json::Value,
    /// The page the chunk starts on, when the format has pages.
    pub page: Option<i32>,
    /// The heading path above the chunk.
    pub headings: Vec<String>,
    /// The chunk's characters in the document's normalised text, `[start, end)`, when recorded.
    pub span: Option<Vec<i64>>,
    /// The mode's score (see [`SearchMode`]).
    pub score: f64,
    /// Its place in the vector list, from 1 (vector and hybrid modes; `None`: not in it).
    pub vector_rank: Option<i32>,
    /// Its place in the keyword list, from 1 (keyword and hybrid modes; `None`: not in it).
    pub keyword_rank: Option<i32>,
}

/// Why a search failed.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// Postgres spent `search.timeout` on it and gave up (its statement timeout).
    #[error("the search took longer than {0:?}")]
    Timeout(Duration),
    /// `search_chunks` refused an argument (SQLSTATE 22023): a filter the checks in Rust let through (a filter
    /// built in code and not validated, or a rule of the SQL check that Rust does not share), or a bound.
    #[error("{0}")]
    Invalid(String),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl SearchError {
    /// Whether an invalid argument is the filter (the SQL check's messages start with `filter`).
    pub fn is_filter(&self) -> bool {
        matches!(self, Self::Invalid(m) if m.starts_with("filter"))
    }
}

impl From<sqlx::Error> for SearchError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(DbError::Sqlx(e))
    }
}

/// The `k` best chunks of `user`'s ready documents for `query`, best first, through
/// `upload_pipeline.search_chunks` under the user's row-level security, within `settings.timeout`.
#[tracing::instrument(skip_all, fields(mode = %query.mode, k = query.k), err)]
pub async fn search(
    pool: &PgPool,
    user: Uuid,
    settings: &SearchSettings,
    query: &Query<'_>,
) -> Result<Vec<Hit>, SearchError> {
    let embedding = query.embedding.map(vector_literal);
    let filter = query
        .filter
        .map(serde_json::to_value)
        .transpose()
        .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let mut tx = db::begin_as(pool, user).await?;
    // Bounds the search's statement (a filter is matched against every ready document of the user's), and gives
    // `search_chunks` the keyword list's boost for identifier-like queries (`upload_pipeline.identifier_boost()`).
    sqlx::query(
        "SELECT set_config('statement_timeout', $1, true), \
         set_config('upload_pipeline.identifier_boost', $2, true)",
    )
    .bind(format!("{}ms", settings.timeout.as_millis().max(1)))
    .bind(settings.identifier_boost.to_string())
    .execute(&mut *tx)
    .await?;
    let hits: Result<Vec<Hit>, sqlx::Error> = sqlx::query_as(
        "SELECT id, document_id, filename, content_type, chunk_index, content, metadata, document_metadata, page, \
         headings, span, score, vector_rank, keyword_rank \
         FROM upload_pipeline.search_chunks(query_text => $1, query_embedding => $2::vector, match_count => $3, \
           filter => coalesce($4, '{}'::jsonb), mode => $5, candidates => $6, rrf_k => $7, vector_weight => $8, \
           keyword_weight => $9, embedding_model => $10)",
    )
    .bind(query.text)
    .bind(embedding)
    .bind(query.k as i32)
    .bind(filter)
    .bind(query.mode.as_str())
    .bind(settings.candidates as i32)
    .bind(settings.rrf_k as i32)
    .bind(settings.vector_weight)
    .bind(settings.keyword_weight)
    .bind(query.embedding.map(|_| query.model))
    .fetch_all(&mut *tx)
    .await;
    let hits = hits.map_err(|e| {
        match e.as_database_error().and_then(|d| d.code()).as_deref() {
            // query_canceled: the statement timeout (nothing else cancels a request's statement).
            Some("57014") => SearchError::Timeout(settings.timeout),
            Some("22023") => SearchError::Invalid(
                e.as_database_error()
                    .map_or_else(String::new, |d| d.message().to_owned()),
            ),
            _ => e.into(),
        }
    })?;
    tx.commit().await?;
    Ok(hits)
}

/// pgvector's text form of a vector: `[0.1,0.2,...]`.
fn vector_literal(v: &[f32]) -> String {
    let items: Vec<String> = v.iter().map(f32::to_string).collect();
    format!("[{}]", items.join(","))
}
