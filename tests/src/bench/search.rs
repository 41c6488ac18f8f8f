//! The `search` scenario: 100,000 chunks of 384 dimensions for one user, searched through the API at concurrency
//! 1 and 8, and the API's top 10 compared with an exact scan (recall@10).
//!
//! The corpus is synthetic but not uniform noise (see [`Corpus`]): 1,000 documents on 200 subjects, embedded with
//! the hashing embedder (the offline default). Queries are new texts about passages of the stored documents,
//! embedded by the API as a user's would be.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use serde::Serialize;
use upload_pipeline::{
    Settings,
    client::{Client, SearchMode, SearchRequest},
    settings::{EmbedderKind, Secret},
};
use uuid::Uuid;

use super::stats::{Distribution, Spread};
use crate::{Api, TestDb, unique_prefix};

/// One load level.
#[derive(Debug, Clone, Serialize)]
pub struct Load {
    /// Clients searching at once.
    pub concurrency: usize,
    /// Queries answered.
    pub queries: usize,
    /// Queries a second over the run.
    pub queries_per_second: f64,
    /// Request latency seen by the client, milliseconds.
    pub latency_ms: Distribution,
    /// Raw latencies, milliseconds (for the plot).
    pub latencies: Vec<f64>,
}

/// Results of `search`.
#[derive(Debug, Clone, Serialize)]
pub struct Search {
    /// Chunks stored.
    pub chunks: usize,
    /// Documents they belong to.
    pub documents: usize,
    /// Dimensions.
    pub dimensions: usize,
    /// Seconds to load the chunks (COPY) without the index.
    pub load_seconds: f64,
    /// Seconds to build the HNSW index over them.
    pub index_build_seconds: f64,
    /// Index size, bytes.
    pub index_bytes: i64,
    /// Table size with TOAST, bytes.
    pub table_bytes: i64,
    /// `hnsw.ef_search` in effect.
    pub ef_search: String,
    /// Per load level.
    pub loads: Vec<Load>,
    /// recall@10 against an exact scan, per query: mean and spread over the queries.
    pub recall_at_10_mean: f64,
    /// Its spread over the queries.
    pub recall_at_10: Spread,
    /// Queries compared.
    pub recall_queries: usize,
    /// The index alone, in SQL (the query `match_chunks` runs), at several `hnsw.ef_search`: what recall costs.
    pub ef_sweep: Vec<EfPoint>,
}

/// recall@10 and latency of the index at one `hnsw.ef_search`.
#[derive(Debug, Clone, Serialize)]
pub struct EfPoint {
    /// `hnsw.ef_search`.
    pub ef_search: u32,
    /// Mean recall@10 over the queries.
    pub recall_at_10_mean: f64,
    /// Query latency in SQL, milliseconds.
    pub latency_ms: Distribution,
}

/// Synthetic text with the shape of real documents: a document follows a subject (a topic's vocabulary) and
/// drifts through it, so neighbouring chunks share more words than distant ones and similarity is graded, not a
/// cluster of interchangeable bags of words. Function words come from a common Zipf-weighted vocabulary.
struct Corpus {
    topics: Vec<Vec<String>>,
    common: Vec<String>,
}

/// Words of a topic a chunk draws from: a window that slides `DRIFT` words a chunk.
const WINDOW: usize = 80;
const DRIFT: usize = 2;
const TOPIC_WORDS: usize = 600;

impl Corpus {
    fn new(rng: &mut SmallRng) -> Self {
        const SYLLABLES: &[&str] = &[
            "ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zi", "bra", "cho", "dre", "fli",
            "gro", "hu", "jin", "kel", "mar", "nor", "pel", "qua", "ros", "sul", "tor", "ulm",
            "vex", "wen", "yar",
        ];
        let word = |rng: &mut SmallRng| {
            let n = rng.random_range(2..=4);
            (0..n)
                .map(|_| SYLLABLES[rng.random_range(0..SYLLABLES.len())])
                .collect::<String>()
        };
        let common = (0..2000).map(|_| word(rng)).collect();
        let topics = (0..200)
            .map(|_| (0..TOPIC_WORDS).map(|_| word(rng)).collect())
            .collect();
        Self { topics, common }
    }

    /// `words` words at position `at` of `topic`'s drift, `common` of them (a share) function words.
    fn text(
        &self,
        topic: usize,
        at: usize,
        words: usize,
        common: f64,
        rng: &mut SmallRng,
    ) -> String {
        let mut out = String::new();
        for i in 0..words {
            let w = if rng.random::<f64>() < common {
                // Zipf-like: index n * u^3 favours the first words.
                let u: f64 = rng.random();
                &self.common[((self.common.len() as f64) * u * u * u) as usize]
            } else {
                &self.topics[topic][(at + rng.random_range(0..WINDOW)) % TOPIC_WORDS]
            };
            if i > 0 {
                out.push(' ');
            }
            out.push_str(w);
        }
        out
    }
}

/// Vectors with the structure of a real embedding model's: subjects (200 centres), documents scattered around
/// their subject, passages drifting along a path within their document, and every direction's variance falling
/// off as a power law (as the principal components of real sentence embeddings do), so the data has a low
/// intrinsic dimension in 384. A query is a fresh paraphrase of one passage: the passage's point plus new noise.
///
/// Why not the hashing embedder's own vectors: they hash words, word pairs and trigrams into 384 signed buckets,
/// which spreads every text over all directions alike; nearest neighbours in such data are near-ties, and no
/// index finds them reliably (HNSW recall@10 0.47 at ef_search 40, 0.87 at 400, measured on 2026-11-24). The
/// hashing embedder is for tests and offline demos, not for a production index.
struct Latent {
    topics: Vec<Vec<f32>>,
    scale: Vec<f32>,
}

/// A document's place: its centre and the two directions its passages drift along.
struct DocPath {
    centre: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
}

fn gaussian(rng: &mut SmallRng) -> f32 {
    let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

fn normalised(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

impl Latent {
    fn new(dims: usize, topics: usize, rng: &mut SmallRng) -> Self {
        let scale: Vec<f32> = (0..dims).map(|j| (1.0 + j as f32).powf(-0.5)).collect();
        let mut l = Self {
            topics: Vec::new(),
            scale,
        };
        l.topics = (0..topics).map(|_| l.noise(rng)).collect();
        l
    }

    fn noise(&self, rng: &mut SmallRng) -> Vec<f32> {
        self.scale.iter().map(|s| s * gaussian(rng)).collect()
    }

    fn document(&self, topic: usize, rng: &mut SmallRng) -> DocPath {
        let n = self.noise(rng);
        DocPath {
            centre: self.topics[topic]
                .iter()
                .zip(n)
                .map(|(t, n)| t + 0.7 * n)
                .collect(),
            a: self.noise(rng),
            b: self.noise(rng),
        }
    }

    /// Passage `i` of `doc`, with fresh noise.
    fn passage(&self, doc: &DocPath, i: usize, rng: &mut SmallRng) -> Vec<f32> {
        let phase = i as f32 / 8.0;
        let n = self.noise(rng);
        normalised(
            (0..self.scale.len())
                .map(|j| {
                    doc.centre[j]
                        + 0.6 * (doc.a[j] * phase.cos() + doc.b[j] * phase.sin())
                        + 0.5 * n[j]
                })
                .collect(),
        )
    }
}

fn literal(v: &[f32]) -> String {
    let mut s = String::with_capacity(v.len() * 8);
    s.push('[');
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        if *x == 0.0 {
            s.push('0');
        } else {
            let _ = write!(s, "{x:.6}");
        }
    }
    s.push(']');
    s
}

/// Runs the scenario over `chunks` chunks (100 a document).
pub async fn run(chunks: usize, queries: usize) -> Result<Search> {
    const DIMS: usize = 384;
    const PER_DOC: usize = 100;
    let mut s = crate::settings(&unique_prefix("bench-search"), &crate::redis_url());
    // Queries are embedded by an OpenAI-compatible server (the fake, answering with the corpus's query vectors).
    s.embedding.embedder = EmbedderKind::Openai;
    s.embedding.model = "text-embedding-3-small".into();
    s.embedding.dimensions = DIMS as u32;
    s.embedding.openai.api_key = Secret("sk-bench".into());
    // No provider quota in the way: at OpenAI tier 1 (3,000 requests a minute, shared by the fleet) query
    // embeddings alone would cap search at 50 a second, whatever the index does.
    s.quota.openai.requests_per_minute = 0;
    s.quota.openai.tokens_per_minute = 0;
    let db = TestDb::create(&mut s).await;
    let result = measure(&mut s, &db, chunks, PER_DOC, DIMS, queries).await;
    crate::cleanup(&s).await;
    result
}

async fn measure(
    s: &mut Settings,
    db: &TestDb,
    chunks: usize,
    per_doc: usize,
    dims: usize,
    queries: usize,
) -> Result<Search> {
    let model = s.embedding.model.clone();
    let mut rng = SmallRng::seed_from_u64(42);
    let corpus = Corpus::new(&mut rng);
    let latent = Latent::new(dims, corpus.topics.len(), &mut rng);
    let user = Uuid::new_v4();
    let documents = chunks.div_ceil(per_doc);
    let index: String = sqlx::query_scalar(
        "SELECT index_name FROM upload_pipeline.embedding_models WHERE model = $1",
    )
    .bind(&model)
    .fetch_one(&db.admin)
    .await
    .context("the configured model is registered by the migration")?;
    sqlx::query(&format!("DROP INDEX upload_pipeline.{index}"))
        .execute(&db.admin)
        .await?;
    let t = Instant::now();
    let mut conn = db.admin.acquire().await?;
    let mut doc_ids = Vec::new();
    for d in 0..documents {
        let id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO upload_pipeline.documents (id, user_id, filename, content_type, size_bytes, sha256, \
             status, chunks_total, ready_at) VALUES ($1, $2, $3, 'text/plain', 0, $4, 'ready', $5, now())",
        )
        .bind(id)
        .bind(user)
        .bind(format!("doc-{d}.txt"))
        .bind(format!("{:064x}", d))
        .bind(per_doc as i32)
        .execute(&mut *conn)
        .await?;
        let (topic, start) = (
            rng.random_range(0..corpus.topics.len()),
            rng.random_range(0..TOPIC_WORDS),
        );
        let path = latent.document(topic, &mut rng);
        doc_ids.push((id, topic, start, path));
    }
    let mut copy = conn
        .copy_in_raw(
            "COPY upload_pipeline.document_chunks (document_id, user_id, chunk_index, content, token_count, \
             content_sha256, embedding, embedding_model) FROM STDIN",
        )
        .await?;
    let mut buf = String::new();
    for c in 0..chunks {
        let (doc, topic, start, path) = &doc_ids[c / per_doc];
        let at = start + (c % per_doc) * DRIFT;
        let text = corpus.text(*topic, at, rng.random_range(250..350), 0.3, &mut rng);
        let v = latent.passage(path, c % per_doc, &mut rng);
        let _ = writeln!(
            buf,
            "{doc}\t{user}\t{}\t{text}\t{}\t{:064x}\t{}\t{model}",
            c % per_doc,
            text.split(' ').count(),
            c,
            literal(&v)
        );
        if buf.len() > 4 << 20 {
            copy.send(std::mem::take(&mut buf).into_bytes()).await?;
        }
    }
    copy.send(buf.into_bytes()).await?;
    copy.finish().await?;
    drop(conn);
    let load_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut conn = db.admin.acquire().await?;
    sqlx::query("SET maintenance_work_mem = '1GB'")
        .execute(&mut *conn)
        .await?;
    sqlx::query("SELECT upload_pipeline.register_embedding_model($1, $2)")
        .bind(&model)
        .bind(dims as i32)
        .execute(&mut *conn)
        .await?;
    sqlx::query("ANALYZE upload_pipeline.document_chunks")
        .execute(&mut *conn)
        .await?;
    drop(conn);
    let index_build_seconds = t.elapsed().as_secs_f64();
    let (index_bytes, table_bytes): (i64, i64) = sqlx::query_as(
        "SELECT pg_relation_size(format('upload_pipeline.%I', $1::text)::regclass), \
                pg_table_size('upload_pipeline.document_chunks')",
    )
    .bind(&index)
    .fetch_one(&db.admin)
    .await?;
    // What match_chunks runs with: its own setting, else the server's.
    let ef_search: String = sqlx::query_scalar(
        "SELECT coalesce((SELECT split_part(c, '=', 2) FROM pg_proc p, unnest(p.proconfig) c \
           WHERE p.proname = 'match_chunks' AND c LIKE 'hnsw.ef_search=%'), current_setting('hnsw.ef_search'))",
    )
    .fetch_one(&db.admin)
    .await?;

    // A user asks about what they uploaded: each query about one passage of a stored document, in words of
    // its own (drawn afresh from that passage's vocabulary), with few function words.
    let mut vectors = std::collections::HashMap::new();
    let texts: Vec<String> = (0..queries)
        .map(|n| {
            let (_, topic, start, path) = &doc_ids[rng.random_range(0..doc_ids.len())];
            let i = rng.random_range(0..per_doc);
            let words = rng.random_range(8..16);
            let text = format!(
                "question {n}: {}",
                corpus.text(*topic, start + i * DRIFT, words, 0.15, &mut rng)
            );
            vectors.insert(text.clone(), latent.passage(path, i, &mut rng));
            text
        })
        .collect();
    let fake = crate::fake::FakeProviders::start_with_vectors(
        crate::fake::FakeConfig::default(),
        std::sync::Arc::new(vectors.clone()),
    )
    .await;
    s.embedding.openai.base_url = fake.openai_url();

    let api = Api::start(s).await;
    let client = api.client(s, user);
    let outcome = async {
        // Warm-up: the index and the table into the page cache, the API's pool filled.
        for q in texts.iter().take(200) {
            vector_search(&client, q).await?;
        }
        let mut loads = Vec::new();
        for concurrency in [1usize, 8] {
            loads.push(load(&client, &texts, concurrency).await?);
        }
        // recall@10: the API's answer against an exact scan of the same vector (no index).
        let recall_queries = texts.len().min(200);
        let mut recalls = Vec::new();
        let mut exacts = Vec::new();
        for q in texts.iter().take(recall_queries) {
            let got: Vec<(Uuid, i32)> = vector_search(&client, q)
                .await?
                .results
                .iter()
                .map(|h| (h.document_id, h.chunk_index))
                .collect();
            let vector = literal(&vectors[q]);
            let mut tx = db.admin.begin().await?;
            sqlx::query("SET LOCAL enable_indexscan = off")
                .execute(&mut *tx)
                .await?;
            let exact: Vec<(Uuid, i32)> = sqlx::query_as(&format!(
                "SELECT document_id, chunk_index FROM upload_pipeline.document_chunks WHERE embedding_model = $2 \
                 ORDER BY embedding::vector({dims}) <=> $1::vector({dims}) LIMIT 10"
            ))
            .bind(&vector)
            .bind(&model)
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            recalls.push(recall(&exact, &got));
            exacts.push((vector, exact));
        }
        let mut ef_sweep = Vec::new();
        for ef in [40u32, 100, 200, 400] {
            ef_sweep.push(sweep_point(db, &model, dims, ef, &exacts).await?);
        }
        Ok::<_, anyhow::Error>((loads, recalls, recall_queries, ef_sweep))
    }
    .await;
    api.stop().await;
    let (loads, recalls, recall_queries, ef_sweep) = outcome?;
    Ok(Search {
        chunks,
        documents,
        dimensions: dims,
        load_seconds,
        index_build_seconds,
        index_bytes,
        table_bytes,
        ef_search,
        loads,
        recall_at_10_mean: recalls.iter().sum::<f64>() / recalls.len().max(1) as f64,
        recall_at_10: Spread::of(&recalls),
        recall_queries,
        ef_sweep,
    })
}

fn recall(exact: &[(Uuid, i32)], got: &[(Uuid, i32)]) -> f64 {
    exact.iter().filter(|e| got.contains(e)).count() as f64 / exact.len().max(1) as f64
}

/// The top 10 for `query` by vector alone: the scenario measures the HNSW index, which hybrid search would blend
/// with the keyword list.
async fn vector_search(
    client: &Client,
    query: &str,
) -> Result<upload_pipeline::client::SearchResults, upload_pipeline::client::ClientError> {
    let request = SearchRequest::new(query).k(10).mode(SearchMode::Vector);
    client.search_with(&request).await
}

/// The index's recall and latency at `ef`, running `match_chunks`' own query (`match_chunks_sql`) in SQL.
async fn sweep_point(
    db: &TestDb,
    model: &str,
    dims: usize,
    ef: u32,
    exacts: &[(String, Vec<(Uuid, i32)>)],
) -> Result<EfPoint> {
    let sql: String = sqlx::query_scalar("SELECT upload_pipeline.match_chunks_sql($1, $2, false)")
        .bind(model)
        .bind(dims as i32)
        .fetch_one(&db.admin)
        .await?;
    let mut conn = db.admin.acquire().await?;
    for set in [
        format!("SET hnsw.ef_search = {ef}"),
        "SET hnsw.iterative_scan = 'relaxed_order'".to_owned(),
    ] {
        sqlx::query(&set).execute(&mut *conn).await?;
    }
    let (mut recalls, mut latencies) = (Vec::new(), Vec::new());
    for (vector, exact) in exacts {
        let t = Instant::now();
        let rows: Vec<(Uuid, Uuid, i32)> = sqlx::query_as(&format!(
            "SELECT m.id, m.document_id, m.chunk_index FROM ({sql}) m"
        ))
        .bind(vector)
        .bind(serde_json::json!({}))
        .bind(10i32)
        .fetch_all(&mut *conn)
        .await?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        let got: Vec<(Uuid, i32)> = rows.into_iter().map(|r| (r.1, r.2)).collect();
        recalls.push(recall(exact, &got));
    }
    for reset in ["RESET hnsw.ef_search", "RESET hnsw.iterative_scan"] {
        sqlx::query(reset).execute(&mut *conn).await?;
    }
    Ok(EfPoint {
        ef_search: ef,
        recall_at_10_mean: recalls.iter().sum::<f64>() / recalls.len().max(1) as f64,
        latency_ms: Distribution::of(&latencies),
    })
}

async fn load(
    client: &upload_pipeline::client::Client,
    texts: &[String],
    concurrency: usize,
) -> Result<Load> {
    let per_client = (texts.len() * if concurrency > 1 { 2 } else { 1 }).div_ceil(concurrency);
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..concurrency {
        let (client, texts) = (client.clone(), texts.to_vec());
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let q = &texts[(c * 7919 + i) % texts.len()];
                let start = Instant::now();
                vector_search(&client, q).await?;
                lat.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<_, anyhow::Error>(lat)
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done??);
    }
    let elapsed = t.elapsed().max(Duration::from_micros(1)).as_secs_f64();
    Ok(Load {
        concurrency,
        queries: latencies.len(),
        queries_per_second: latencies.len() as f64 / elapsed,
        latency_ms: Distribution::of(&latencies),
        latencies,
    })
}
