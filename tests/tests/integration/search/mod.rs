//! Search against the real Postgres: hybrid, vector and keyword modes, filters, ready documents only, citations,
//! a 3,072-dimension model on its halfvec index, and `search_chunks` in SQL under row-level security.
//!
//! Documents are seeded behind the pipeline's back (rows and hashing-embedder vectors written as the embed stage
//! writes them), so each test controls exactly what is searchable and in which state; the pipeline's own path
//! to `ready` is covered in `pipeline`.
//!
//! `ranking`: what each mode puts first, and citations; `filters`: every operator, applied before the top hits are
//! taken, and the errors of malformed ones; `sql`: ready documents only, the halfvec index of a wide model,
//! `search_chunks` for agents under row-level security; `keywords`: the keyword table's index and its backfill;
//! `bounds`: what bounds a search's cost (a filter matched once per document, 500 values, the timeout, the HNSW
//! scan's reach) and who may call the schema's functions; `rerank`: the fused hits reordered by the fake rerankers,
//! and what a failing one answers; `tenants`: a small tenant among a big one gets its exact top k, by a scan of its
//! own chunks, and a big one walks the HNSW graph; `identifiers`: identifier-like queries' keyword list (BM25, every
//! word then some, boosted in the fusion), sentences' (the same list, not boosted), and longer ones as before.

mod bounds;
mod cli;
mod filters;
mod identifiers;
mod keywords;
mod ranking;
mod rerank;
mod sql;
mod tenants;

use std::collections::BTreeSet;

use serde_json::{Value, json};
use tests::TestApp;
use upload_pipeline::{client::Hit, providers::hashing::HashingEmbedder};
use uuid::Uuid;

/// A document to seed, with its chunks.
pub(crate) struct Doc {
    pub(crate) filename: String,
    pub(crate) content_type: &'static str,
    pub(crate) status: &'static str,
    pub(crate) metadata: Value,
    pub(crate) created_at: &'static str,
    pub(crate) chunks: Vec<(String, Value)>,
}

impl Doc {
    /// A ready text document with these chunks and no metadata.
    pub(crate) fn ready(filename: &str, chunks: &[&str]) -> Self {
        Self {
            filename: filename.to_owned(),
            content_type: "text/plain",
            status: "ready",
            metadata: json!({}),
            created_at: "2026-01-01T00:00:00Z",
            chunks: chunks
                .iter()
                .map(|c| ((*c).to_owned(), json!({})))
                .collect(),
        }
    }
}

/// Writes `doc` for `user` as the pipeline leaves it: the document in its status with its number of chunks, its
/// chunks with vectors of the app's model (the hashing embedder, which the fake OpenAI server also answers with);
/// returns its id.
pub(crate) async fn seed(app: &TestApp, user: Uuid, doc: Doc) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO upload_pipeline.documents (id, user_id, filename, content_type, size_bytes, sha256, status, \
         metadata, created_at, ready_at, chunks_total) \
         VALUES ($1, $2, $3, $4, 100, $5, $6, $7, $8::timestamptz, CASE WHEN $6 = 'ready' THEN now() END, $9)",
    )
    .bind(id)
    .bind(user)
    .bind(&doc.filename)
    .bind(doc.content_type)
    .bind(id.simple().to_string())
    .bind(doc.status)
    .bind(&doc.metadata)
    .bind(doc.created_at)
    .bind(doc.chunks.len() as i32)
    .execute(app.admin())
    .await
    .expect("insert the document");
    let embedding = &app.settings.embedding;
    let embedder = HashingEmbedder::new(&embedding.model, embedding.dimensions as usize);
    for (i, (content, metadata)) in doc.chunks.iter().enumerate() {
        sqlx::query(
            "INSERT INTO upload_pipeline.document_chunks (document_id, user_id, chunk_index, content, token_count, \
             content_sha256, embedding, embedding_model, metadata) \
             VALUES ($1, $2, $3, $4, 10, md5($4), $5::vector, $6, $7)",
        )
        .bind(id)
        .bind(user)
        .bind(i as i32)
        .bind(content)
        .bind(literal(&embedder.vector(content)))
        .bind(&embedding.model)
        .bind(metadata)
        .execute(app.admin())
        .await
        .expect("insert a chunk");
    }
    id
}

/// pgvector's text form of `v`.
pub(crate) fn literal(v: &[f32]) -> String {
    let items: Vec<String> = v.iter().map(f32::to_string).collect();
    format!("[{}]", items.join(","))
}

/// The file names of `hits`.
pub(crate) fn names(hits: &[Hit]) -> BTreeSet<&str> {
    hits.iter().map(|h| h.filename.as_str()).collect()
}

/// `POST /v1/search` with `body` as `user`: the status and the JSON answer.
pub(crate) async fn post_search(app: &TestApp, user: Uuid, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/search", app.api.url))
        .bearer_auth(app.token(user))
        .json(&body)
        .send()
        .await
        .expect("search");
    (resp.status().as_u16(), resp.json().await.expect("JSON"))
}

/// Statistics, and the keyword index's pending entries merged into it, as autovacuum leaves them after a bulk
/// write: planner settings stay the defaults.
async fn refresh_keyword_statistics(pool: &sqlx::PgPool) {
    for statement in [
        "VACUUM ANALYZE upload_pipeline.chunk_keywords",
        "ANALYZE upload_pipeline.documents",
    ] {
        sqlx::raw_sql(statement).execute(pool).await.unwrap();
    }
}
