//! The wire shapes of stored records (a document, its stages, a search hit): what the API serializes and its
//! clients read, so that neither depends on the storage layer's structs, which follow the database.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{documents, search};

/// The progress of one stage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct StageStatus {
    /// `parse`, `chunk` or `embed`.
    pub stage: String,
    /// `queued`, `running`, `done`, `failed` (will retry) or `dead` (gave up).
    pub state: String,
    /// Attempts so far.
    pub attempts: i32,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// When it was queued.
    pub queued_at: DateTime<Utc>,
    /// When it started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<documents::StageStatus> for StageStatus {
    fn from(s: documents::StageStatus) -> Self {
        Self {
            stage: s.stage.to_string(),
            state: s.state.to_string(),
            attempts: s.attempts,
            last_error: s.last_error,
            queued_at: s.queued_at,
            started_at: s.started_at,
            finished_at: s.finished_at,
        }
    }
}

/// A document with its progress.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Document {
    /// Its id.
    pub id: Uuid,
    /// The file name.
    pub filename: String,
    /// Its MIME type.
    pub content_type: String,
    /// Size in bytes.
    pub size_bytes: i64,
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
    /// `queued`, `parsing`, `chunking`, `embedding`, `ready` or `failed`.
    pub status: String,
    /// Why it failed.
    pub error: Option<String>,
    /// The caller's metadata.
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    /// Chunks made (once chunked).
    pub chunks_total: Option<i32>,
    /// Chunks with a vector.
    pub chunks_embedded: i64,
    /// Per-stage progress.
    pub stages: Vec<StageStatus>,
    /// Upload time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// When it became searchable.
    pub ready_at: Option<DateTime<Utc>>,
}

impl From<documents::Document> for Document {
    fn from(d: documents::Document) -> Self {
        Self {
            id: d.id,
            filename: d.filename,
            content_type: d.content_type,
            size_bytes: d.size_bytes,
            sha256: d.sha256,
            status: d.status.to_string(),
            error: d.error,
            metadata: d.metadata,
            chunks_total: d.chunks_total,
            chunks_embedded: d.chunks_embedded,
            stages: d.stages.into_iter().map(StageStatus::from).collect(),
            created_at: d.created_at,
            updated_at: d.updated_at,
            ready_at: d.ready_at,
        }
    }
}

/// A search hit, with what a citation needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Hit {
    /// By mode: `hybrid`, the reciprocal rank fusion `sum of weight / (rrf_k + rank)` over the lists the chunk is
    /// in (with the default settings at most 2/61, about 0.033, or 4/61 for an identifier-like query, whose
    /// keyword list weighs `search.identifier_boost` = 3 times more); `vector`, the cosine similarity (1 = same
    /// direction); `keyword`, BM25 scaled to 0..1, the chunks holding every word above 0.5 (`ts_rank_cd` scaled to
    /// 0..1 for a query of more than 16 terms or of common words only). Higher is better; compare scores within
    /// one search.
    pub score: f64,
    /// The chunk.
    pub chunk_id: Uuid,
    /// The document.
    pub document_id: Uuid,
    /// Its file name.
    pub filename: String,
    /// Its MIME type.
    pub content_type: String,
    /// The chunk's position in the document, from 0.
    pub chunk_index: i32,
    /// The chunk's text.
    pub content: String,
    /// The page the chunk starts on, when the format has pages (PDF, DOCX page breaks).
    pub page: Option<i32>,
    /// The heading path above the chunk, outermost first.
    pub headings: Vec<String>,
    /// The chunk's characters `[start, end)` in the document's normalised text, when recorded.
    #[schema(value_type = Option<Vec<u64>>, min_items = 2, max_items = 2)]
    pub span: Option<[u64; 2]>,
    /// The chunk's metadata as stored (`page`, `headings`, `span`).
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    /// The document's metadata, as uploaded.
    #[schema(value_type = Object)]
    pub document_metadata: serde_json::Value,
    /// The chunk's place in the vector list, from 1 (`vector` and `hybrid`; null: not among its candidates).
    #[schema(minimum = 1)]
    pub vector_rank: Option<u32>,
    /// The chunk's place in the keyword list, from 1 (`keyword` and `hybrid`; null: its words do not match).
    #[schema(minimum = 1)]
    pub keyword_rank: Option<u32>,
    /// The reranker's relevance score when the search was reranked (`reranked` true; Cohere, Jina and TEI answer
    /// 0 to 1, higher is better), the order of `results`; null otherwise. `score` stays the mode's.
    #[serde(default)]
    pub rerank_score: Option<f64>,
}

impl From<search::Hit> for Hit {
    fn from(h: search::Hit) -> Self {
        let rank = |r: Option<i32>| r.and_then(|r| u32::try_from(r).ok());
        let span = h.span.and_then(|s| match s.as_slice() {
            [start, end] => Some([u64::try_from(*start).ok()?, u64::try_from(*end).ok()?]),
            _ => None,
        });
        Self {
            score: h.score,
            chunk_id: h.chunk_id,
            document_id: h.document_id,
            filename: h.filename,
            content_type: h.content_type,
            chunk_index: h.chunk_index,
            content: h.content,
            page: h.page,
            headings: h.headings,
            span,
            metadata: h.metadata,
            document_metadata: h.document_metadata,
            vector_rank: rank(h.vector_rank),
            keyword_rank: rank(h.keyword_rank),
            rerank_score: None,
        }
    }
}
