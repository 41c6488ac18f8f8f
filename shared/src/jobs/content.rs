//! The SQL of what the stages read and write besides their state: the uploaded bytes, the parsed sections
//! (`document_parsed`), the chunks and their vectors (`document_chunks`), and the provider caches (`parse_cache`,
//! `embedding_cache`). Writes are upserts keyed by document, chunk index or content hash, so a job that runs
//! twice writes the same rows.

use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::{
    chunking::Chunk,
    db::{self, DbError},
    parsing::Section,
};

/// What the parse stage reads of a document.
pub(crate) struct Source {
    pub filename: String,
    pub content_type: String,
    pub sha256: String,
    pub bytes: Vec<u8>,
}

/// The document's name, type, hash and bytes; `None` when its bytes are missing.
pub(crate) async fn source(
    pool: &PgPool,
    user: Uuid,
    doc: Uuid,
) -> Result<Option<Source>, DbError> {
    let mut tx = db::begin_as(pool, user).await?;
    let row: Option<(String, String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT d.filename, d.content_type, d.sha256, b.bytes FROM upload_pipeline.documents d \
         JOIN upload_pipeline.document_bytes b ON b.document_id = d.id WHERE d.id = $1",
    )
    .bind(doc)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row.map(|(filename, content_type, sha256, bytes)| Source {
        filename,
        content_type,
        sha256,
        bytes,
    }))
}

/// The cached sections of a file for `parser`.
pub(crate) async fn cached_sections(
    pool: &PgPool,
    sha256: &str,
    parser: &str,
) -> Result<Option<Vec<Section>>, sqlx::Error> {
    let row: Option<(sqlx::types::Json<Vec<Section>>,)> = sqlx::query_as(
        "SELECT sections FROM upload_pipeline.parse_cache WHERE file_sha256 = $1 AND parser = $2",
    )
    .bind(sha256)
    .bind(parser)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(s,)| s.0))
}

/// Stores the document's parsed sections, and caches them by file hash when `cache`.
pub(crate) async fn save_parsed(
    tx: &mut Transaction<'_, Postgres>,
    (doc, user): (Uuid, Uuid),
    (sha256, parser): (&str, &str),
    sections: &[Section],
    cache: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO upload_pipeline.document_parsed (document_id, user_id, parser, sections) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (document_id) DO UPDATE SET parser = excluded.parser, sections = excluded.sections, created_at = now()",
    )
    .bind(doc)
    .bind(user)
    .bind(parser)
    .bind(sqlx::types::Json(sections))
    .execute(&mut **tx)
    .await?;
    if cache {
        sqlx::query(
            "INSERT INTO upload_pipeline.parse_cache (file_sha256, parser, sections) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(sha256)
        .bind(parser)
        .bind(sqlx::types::Json(sections))
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// The document's parsed sections; `None` before it is parsed.
pub(crate) async fn parsed(
    pool: &PgPool,
    user: Uuid,
    doc: Uuid,
) -> Result<Option<Vec<Section>>, DbError> {
    let mut tx = db::begin_as(pool, user).await?;
    let sections: Option<(sqlx::types::Json<Vec<Section>>,)> = sqlx::query_as(
        "SELECT sections FROM upload_pipeline.document_parsed WHERE document_id = $1",
    )
    .bind(doc)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(sections.map(|(sqlx::types::Json(sections),)| sections))
}

/// Indices of the document's chunks still without a vector of `model`, in order.
pub(crate) async fn unembedded(
    pool: &PgPool,
    user: Uuid,
    doc: Uuid,
    model: &str,
) -> Result<Vec<u32>, DbError> {
    let mut tx = db::begin_as(pool, user).await?;
    let rows: Vec<(i32,)> = sqlx::query_as(
        "SELECT chunk_index FROM upload_pipeline.document_chunks \
         WHERE document_id = $1 AND (embedding IS NULL OR embedding_model IS DISTINCT FROM $2) ORDER BY chunk_index",
    )
    .bind(doc)
    .bind(model)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows.into_iter().map(|(i,)| i as u32).collect())
}

/// Stores the document's chunks: upserted by index (an unchanged chunk keeps its vector), those past the end
/// deleted, and the count recorded on the document.
pub(crate) async fn save_chunks(
    tx: &mut Transaction<'_, Postgres>,
    doc: Uuid,
    user: Uuid,
    chunks: &[Chunk],
) -> Result<(), sqlx::Error> {
    let indices: Vec<i32> = chunks.iter().map(|c| c.index as i32).collect();
    let contents: Vec<&str> = chunks.iter().map(|c| c.content.as_str()).collect();
    let tokens: Vec<i32> = chunks.iter().map(|c| c.token_count as i32).collect();
    let hashes: Vec<&str> = chunks.iter().map(|c| c.content_sha256.as_str()).collect();
    let metadata: Vec<serde_json::Value> = chunks.iter().map(|c| c.metadata.clone()).collect();
    sqlx::query(
        "INSERT INTO upload_pipeline.document_chunks (document_id, user_id, chunk_index, content, token_count, content_sha256, metadata) \
         SELECT $1, $2, * FROM UNNEST($3::int[], $4::text[], $5::int[], $6::text[], $7::jsonb[]) \
         ON CONFLICT (document_id, chunk_index) DO UPDATE SET \
           embedding = CASE WHEN document_chunks.content_sha256 = excluded.content_sha256 THEN document_chunks.embedding END, \
           embedding_model = CASE WHEN document_chunks.content_sha256 = excluded.content_sha256 THEN document_chunks.embedding_model END, \
           content = excluded.content, token_count = excluded.token_count, content_sha256 = excluded.content_sha256, \
           metadata = excluded.metadata",
    )
    .bind(doc)
    .bind(user)
    .bind(&indices)
    .bind(&contents)
    .bind(&tokens)
    .bind(&hashes)
    .bind(&metadata)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "DELETE FROM upload_pipeline.document_chunks WHERE document_id = $1 AND chunk_index >= $2",
    )
    .bind(doc)
    .bind(chunks.len() as i32)
    .execute(&mut **tx)
    .await?;
    sqlx::query("UPDATE upload_pipeline.documents SET chunks_total = $2 WHERE id = $1")
        .bind(doc)
        .bind(chunks.len() as i32)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A batch of a document's chunks: indices `first..end`, embedded with `model` of `dimensions`.
pub(crate) struct Batch<'a> {
    pub doc: Uuid,
    pub first: i32,
    pub end: i32,
    pub model: &'a str,
    pub dimensions: i32,
}

/// A chunk still to embed: its id, text and text hash.
pub(crate) type Pending = (Uuid, String, String);

/// Gives the batch's chunks without a vector of the model the cached vector of their text; returns how many.
pub(crate) async fn vectors_from_cache(
    tx: &mut Transaction<'_, Postgres>,
    b: &Batch<'_>,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE upload_pipeline.document_chunks c SET embedding = e.embedding, embedding_model = $4 \
         FROM upload_pipeline.embedding_cache e \
         WHERE c.document_id = $1 AND c.chunk_index >= $2 AND c.chunk_index < $3 \
         AND (c.embedding IS NULL OR c.embedding_model IS DISTINCT FROM $4) \
         AND e.model = $4 AND e.dimensions = $5 AND e.text_sha256 = c.content_sha256",
    )
    .bind(b.doc)
    .bind(b.first)
    .bind(b.end)
    .bind(b.model)
    .bind(b.dimensions)
    .execute(&mut **tx)
    .await?
    .rows_affected())
}

/// The batch's chunks still without a vector of the model, in order.
pub(crate) async fn pending(
    tx: &mut Transaction<'_, Postgres>,
    b: &Batch<'_>,
) -> Result<Vec<Pending>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, content, content_sha256 FROM upload_pipeline.document_chunks WHERE document_id = $1 AND chunk_index >= $2 AND chunk_index < $3 \
         AND (embedding IS NULL OR embedding_model IS DISTINCT FROM $4) ORDER BY chunk_index",
    )
    .bind(b.doc)
    .bind(b.first)
    .bind(b.end)
    .bind(b.model)
    .fetch_all(&mut **tx)
    .await
}

/// Stores the vectors of `rows` (`literals`, pgvector text, in the same order), and caches them by text hash
/// when `cache`.
pub(crate) async fn save_vectors(
    tx: &mut Transaction<'_, Postgres>,
    b: &Batch<'_>,
    rows: &[Pending],
    literals: &[String],
    cache: bool,
) -> Result<(), sqlx::Error> {
    let ids: Vec<Uuid> = rows.iter().map(|(id, _, _)| *id).collect();
    let hashes: Vec<&str> = rows.iter().map(|(_, _, h)| h.as_str()).collect();
    // A vector lands only on the text it was computed from: a chunk re-chunked meanwhile keeps no stale vector.
    sqlx::query(
        "UPDATE upload_pipeline.document_chunks c SET embedding = v.e::vector, embedding_model = $3 \
         FROM UNNEST($1::uuid[], $2::text[], $4::text[]) AS v(id, e, h) WHERE c.id = v.id AND c.content_sha256 = v.h",
    )
    .bind(&ids)
    .bind(literals)
    .bind(b.model)
    .bind(&hashes)
    .execute(&mut **tx)
    .await?;
    if cache {
        sqlx::query(
            "INSERT INTO upload_pipeline.embedding_cache (model, dimensions, text_sha256, embedding) \
             SELECT $1, $2, v.h, v.e::vector FROM UNNEST($3::text[], $4::text[]) AS v(h, e) \
             ON CONFLICT DO NOTHING",
        )
        .bind(b.model)
        .bind(b.dimensions)
        .bind(&hashes)
        .bind(literals)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}
