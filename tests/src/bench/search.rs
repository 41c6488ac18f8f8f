//! The `search` scenario: many tenants of very different sizes in one table (1,000,000 chunks of 384 dimensions
//! across 1,000 tenants of 10 to 300,000 chunks by default), their documents drawn from the same topics, and per
//! tenant-size bucket: recall@10 of vector search against an exact scan of the tenant's own chunks (the mean and
//! the worst query), and the latency of vector and hybrid search at concurrency 1.
//!
//! Searches run in SQL, through `upload_pipeline.search_chunks` as the app role under the tenant's row-level
//! security: the function the API calls (which adds the query's embedding and HTTP around it) and agents call.
//! The corpus is in [`super::corpus`]; it is loaded by COPY with the tables' secondary indexes dropped, which are
//! then built once (the model's HNSW index among them).

use std::time::Instant;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use serde::Serialize;
use sqlx::{Connection as _, PgConnection};
use upload_pipeline::Settings;
use uuid::Uuid;

use super::{
    corpus::{self, Corpus, Doc, Latent},
    stats::Distribution,
};
use crate::{TestDb, unique_prefix};

/// What to load and ask.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Chunks stored.
    pub chunks: usize,
    /// Tenants they belong to.
    pub tenants: usize,
    /// Queries per tenant-size bucket.
    pub queries: usize,
}

/// Results of `search`.
#[derive(Debug, Clone, Serialize)]
pub struct Search {
    /// Chunks stored.
    pub chunks: usize,
    /// Tenants.
    pub tenants: usize,
    /// Documents.
    pub documents: usize,
    /// Dimensions.
    pub dimensions: usize,
    /// Seconds to load documents and chunks by COPY, secondary indexes dropped.
    pub load_seconds: f64,
    /// Seconds to build the HNSW index.
    pub hnsw_build_seconds: f64,
    /// Seconds to build the other secondary indexes and analyse.
    pub other_indexes_seconds: f64,
    /// HNSW index size, bytes.
    pub hnsw_bytes: i64,
    /// Chunk table size with TOAST, bytes.
    pub table_bytes: i64,
    /// A search among at most this many chunks scans them exactly (`upload_pipeline.exact_search_chunks()`).
    pub exact_search_chunks: i64,
    /// Tenants given an HNSW index of their own (those above `exact_search_chunks`) by one maintenance pass
    /// (`db::maintain_tenant_indexes`), after the load.
    pub tenant_indexes: i64,
    /// Seconds that pass took (`CREATE INDEX CONCURRENTLY`, one after another).
    pub tenant_index_seconds: f64,
    /// Their size together, bytes.
    pub tenant_index_bytes: i64,
    /// `search_chunks`' own `hnsw.ef_search`, and so on: its `SET` clauses.
    pub search_settings: Vec<String>,
    /// Per tenant-size bucket.
    pub buckets: Vec<Bucket>,
}

/// The tenants of one size range and their queries.
#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    /// Smallest tenant size of the range (chunks).
    pub from: usize,
    /// Largest (inclusive).
    pub to: usize,
    /// Tenants in it.
    pub tenants: usize,
    /// Their chunks.
    pub chunks: usize,
    /// Queries asked (half about a passage of the tenant's own, half about another tenant's).
    pub queries: usize,
    /// Of which the vector list was taken by exact scan (the tenant at or under `exact_search_chunks`; the others
    /// walk their own HNSW index).
    pub exact_queries: usize,
    /// recall@10 of vector search against an exact scan of the tenant's chunks: mean over the queries.
    pub recall_at_10_mean: f64,
    /// The worst query's.
    pub recall_at_10_min: f64,
    /// Queries under 0.9.
    pub queries_under_0_9: usize,
    /// Vector search latency, milliseconds (the `search_chunks` statement).
    pub vector_ms: Distribution,
    /// Hybrid search latency, milliseconds.
    pub hybrid_ms: Distribution,
    /// Hybrid search latency of a short query (the question's first two words with the same vector), which
    /// takes the identifier-like keyword list (BM25 over the terms' capped statistics), milliseconds.
    pub hybrid_short_ms: Distribution,
    /// Raw vector latencies (for the plot).
    pub vector_latencies: Vec<f64>,
    /// Both paths forced on the bucket's first queries (at most [`COMPARED`]), whatever the limit says: what the
    /// choice is made between.
    pub paths: Paths,
}

/// Vector search by each path, forced (`upload_pipeline.exact_search_chunks` set very high, then to 0).
#[derive(Debug, Clone, Serialize)]
pub struct Paths {
    /// Queries compared.
    pub queries: usize,
    /// The exact scan's latency, milliseconds.
    pub exact_ms: Distribution,
    /// The graph walk's latency, milliseconds.
    pub graph_ms: Distribution,
    /// The graph walk's recall@10: mean over the queries.
    pub graph_recall_mean: f64,
    /// The worst query's.
    pub graph_recall_min: f64,
}

/// Queries per bucket on which both paths are forced.
pub const COMPARED: usize = 20;

/// The buckets' bounds: 10-100, 100-1k, 1k-10k, 10k-100k, 100k-300k chunks.
const BUCKETS: [(usize, usize); 5] = [
    (10, 99),
    (100, 999),
    (1_000, 9_999),
    (10_000, 99_999),
    (100_000, 300_000),
];

const DIMS: usize = 384;
const MODEL: &str = "bench-tenants-384";

/// What one query measured: vector, hybrid and two-word hybrid latency (ms), and vector recall@10.
struct Found {
    vector_ms: f64,
    hybrid_ms: f64,
    recall: f64,
    short_ms: f64,
}

/// One query: whose, and about what.
struct Question {
    tenant: usize,
    text: String,
    /// The first two words of `text`: a short query, read as identifiers.
    short: String,
    vector: String,
    /// The true top 10, and any chunk within [`TIE`] of the 10th's distance (a near-tie the search may rank in its
    /// place): a hit among these counts.
    exact: Vec<Uuid>,
    /// The size of the true top (10, or the tenant's chunks if fewer).
    exact_k: usize,
}

/// Distances this close to the 10th are ties: pgvector sums in an order of its compiler's choosing (vectorised),
/// so its distances differ from these in the 7th digit.
const TIE: f64 = 1e-6;

/// Runs the scenario.
pub async fn run(config: Config) -> Result<Search> {
    let mut s = crate::settings(&unique_prefix("bench-search"), &crate::redis_url());
    s.embedding.model = MODEL.into();
    s.embedding.dimensions = DIMS as u32;
    let db = TestDb::create(&mut s).await;
    let result = measure(s.clone(), config).await;
    if std::env::var_os("BENCH_SEARCH_KEEP").is_some() {
        // For experiments on the loaded tables: the database stays (drop it by hand).
        eprintln!("search: database {} kept (BENCH_SEARCH_KEEP)", db.name);
        std::mem::forget(db);
    } else {
        drop(db);
    }
    crate::cleanup(&s).await;
    result
}

async fn measure(s: Settings, config: Config) -> Result<Search> {
    let mut rng = SmallRng::seed_from_u64(42);
    let corpus = Corpus::new(&mut rng);
    let latent = Latent::new(DIMS, &mut rng);
    let sizes = corpus::tenant_sizes(config.chunks, config.tenants);
    let users: Vec<Uuid> = sizes.iter().map(|_| Uuid::new_v4()).collect();
    let docs = latent.documents(&sizes, &mut rng);

    let mut connection = PgConnection::connect(s.database_url.expose()).await?;
    let conn = &mut connection;
    let indexes = drop_indexes(conn).await?;
    let t = Instant::now();
    load(conn, &corpus, &latent, &docs, &users, &mut rng).await?;
    let load_seconds = t.elapsed().as_secs_f64();
    let (hnsw_build_seconds, other_indexes_seconds) = build_indexes(conn, &indexes).await?;
    let (hnsw_bytes, table_bytes): (i64, i64) = sqlx::query_as(
        "SELECT pg_relation_size(format('upload_pipeline.%I', m.index_name)::regclass), \
                pg_table_size('upload_pipeline.document_chunks') \
         FROM upload_pipeline.embedding_models m WHERE m.model = $1",
    )
    .bind(MODEL)
    .fetch_one(&mut *conn)
    .await?;
    let exact_search_chunks: i64 =
        sqlx::query_scalar("SELECT upload_pipeline.exact_search_chunks()::bigint")
            .fetch_one(&mut *conn)
            .await?;
    // The large tenants' own indexes, as a producer's maintenance pass builds them.
    let owner = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(s.database_url.expose())
        .await?;
    let t = Instant::now();
    let pass = upload_pipeline::db::maintain_tenant_indexes(&owner, 4096)
        .await?
        .context("another process holds the tenant index lock")?;
    let tenant_index_seconds = t.elapsed().as_secs_f64();
    owner.close().await;
    if let Some(failed) = pass.changes.iter().find(|c| c.error.is_some()) {
        anyhow::bail!("a tenant index failed: {failed:?}");
    }
    let tenant_index_bytes: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(pg_relation_size(i.indexrelid)), 0)::bigint FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid = 'upload_pipeline.document_chunks'::regclass AND c.relname LIKE 'chunks\\_tenant\\_%'",
    )
    .fetch_one(&mut *conn)
    .await?;
    let search_settings: Vec<String> = sqlx::query_scalar(
        "SELECT unnest(proconfig) FROM pg_proc WHERE proname = 'search_chunks' \
         AND pronamespace = 'upload_pipeline'::regnamespace",
    )
    .fetch_all(&mut *conn)
    .await?;

    let mut questions = ask(&corpus, &latent, &docs, &sizes, config.queries, &mut rng);
    exact_tops(conn, &users, &mut questions).await?;
    // Warm-up: every query once in each form, so that the passes below read from memory alike.
    for q in &questions {
        search(conn, users[q.tenant], q, "vector", None).await?;
        search(conn, users[q.tenant], q, "hybrid", None).await?;
        timed_search(conn, users[q.tenant], q, &q.short, "hybrid", None).await?;
    }
    let mut found = Vec::with_capacity(questions.len());
    for q in &questions {
        let (vector_ms, hits) = search(conn, users[q.tenant], q, "vector", None).await?;
        let (hybrid_ms, _) = search(conn, users[q.tenant], q, "hybrid", None).await?;
        let (short_ms, _) =
            timed_search(conn, users[q.tenant], q, &q.short, "hybrid", None).await?;
        found.push(Found {
            vector_ms,
            hybrid_ms,
            recall: q.recall(&hits),
            short_ms,
        });
    }
    // Both paths, forced, on each bucket's first queries.
    let mut forced = Vec::new();
    for (n, q) in questions.iter().enumerate() {
        let earlier = questions[..n]
            .iter()
            .filter(|o| bucket_of(sizes[o.tenant]) == bucket_of(sizes[q.tenant]));
        if earlier.count() >= COMPARED {
            continue;
        }
        let (exact_ms, _) = search(conn, users[q.tenant], q, "vector", Some(100_000_000)).await?;
        let (graph_ms, hits) = search(conn, users[q.tenant], q, "vector", Some(0)).await?;
        forced.push((
            bucket_of(sizes[q.tenant]),
            exact_ms,
            graph_ms,
            q.recall(&hits),
        ));
    }
    let buckets = BUCKETS
        .iter()
        .filter_map(|&(from, to)| {
            let in_bucket = |t: usize| (from..=to).contains(&sizes[t]);
            let tenants = (0..sizes.len()).filter(|&t| in_bucket(t)).count();
            if tenants == 0 {
                return None;
            }
            let rows: Vec<(&Question, &Found)> = questions
                .iter()
                .zip(&found)
                .filter(|(q, _)| in_bucket(q.tenant))
                .collect();
            let recalls: Vec<f64> = rows.iter().map(|(_, f)| f.recall).collect();
            let vector: Vec<f64> = rows.iter().map(|(_, f)| f.vector_ms).collect();
            let hybrid: Vec<f64> = rows.iter().map(|(_, f)| f.hybrid_ms).collect();
            let short: Vec<f64> = rows.iter().map(|(_, f)| f.short_ms).collect();
            Some(Bucket {
                from,
                to,
                tenants,
                chunks: (0..sizes.len())
                    .filter(|&t| in_bucket(t))
                    .map(|t| sizes[t])
                    .sum(),
                queries: rows.len(),
                exact_queries: rows
                    .iter()
                    .filter(|(q, _)| sizes[q.tenant] as i64 <= exact_search_chunks)
                    .count(),
                recall_at_10_mean: recalls.iter().sum::<f64>() / recalls.len().max(1) as f64,
                recall_at_10_min: min(&recalls),
                queries_under_0_9: recalls.iter().filter(|r| **r < 0.9).count(),
                vector_ms: Distribution::of(&vector),
                hybrid_ms: Distribution::of(&hybrid),
                hybrid_short_ms: Distribution::of(&short),
                vector_latencies: vector,
                paths: paths(&forced, bucket_of(from)),
            })
        })
        .collect();
    Ok(Search {
        chunks: config.chunks,
        tenants: config.tenants,
        documents: docs.len(),
        dimensions: DIMS,
        load_seconds,
        hnsw_build_seconds,
        other_indexes_seconds,
        hnsw_bytes,
        table_bytes,
        exact_search_chunks,
        tenant_indexes: pass.indexes,
        tenant_index_seconds,
        tenant_index_bytes,
        search_settings,
        buckets,
    })
}

/// The bucket of a tenant of `size` chunks (an index of [`BUCKETS`]).
fn bucket_of(size: usize) -> usize {
    BUCKETS
        .iter()
        .position(|&(from, to)| (from..=to).contains(&size))
        .unwrap_or(BUCKETS.len())
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::min)
}

/// Both paths' figures in bucket `bucket`, from `forced`: (bucket, exact ms, graph ms, graph recall) per query.
fn paths(forced: &[(usize, f64, f64, f64)], bucket: usize) -> Paths {
    let rows: Vec<_> = forced.iter().filter(|f| f.0 == bucket).collect();
    let recalls: Vec<f64> = rows.iter().map(|f| f.3).collect();
    Paths {
        queries: rows.len(),
        exact_ms: Distribution::of(&rows.iter().map(|f| f.1).collect::<Vec<_>>()),
        graph_ms: Distribution::of(&rows.iter().map(|f| f.2).collect::<Vec<_>>()),
        graph_recall_mean: recalls.iter().sum::<f64>() / recalls.len().max(1) as f64,
        graph_recall_min: min(&recalls),
    }
}

impl Question {
    /// recall@10 of `hits` against the exact top 10.
    fn recall(&self, hits: &[Uuid]) -> f64 {
        let found = hits.iter().filter(|id| self.exact.contains(id)).count();
        found.min(self.exact_k) as f64 / self.exact_k.max(1) as f64
    }
}

/// `queries` questions per bucket, in random order across buckets: each about a random tenant of the bucket,
/// alternately about a passage of one of its own documents and about a passage of anyone's (whose nearest chunks
/// are mostly other tenants': the tenant's best answers are then far down the list for everyone).
fn ask(
    corpus: &Corpus,
    latent: &Latent,
    docs: &[Doc],
    sizes: &[usize],
    queries: usize,
    rng: &mut SmallRng,
) -> Vec<Question> {
    let mut own: Vec<Vec<usize>> = vec![Vec::new(); sizes.len()];
    for (i, d) in docs.iter().enumerate() {
        own[d.tenant].push(i);
    }
    let mut out = Vec::new();
    for (from, to) in BUCKETS {
        let tenants: Vec<usize> = (0..sizes.len())
            .filter(|&t| (from..=to).contains(&sizes[t]))
            .collect();
        if tenants.is_empty() {
            continue;
        }
        for n in 0..queries {
            let tenant = tenants[rng.random_range(0..tenants.len())];
            let doc = if n % 2 == 0 {
                &docs[own[tenant][rng.random_range(0..own[tenant].len())]]
            } else {
                &docs[rng.random_range(0..docs.len())]
            };
            let i = rng.random_range(0..doc.chunks);
            let mut vector = String::new();
            corpus::write_vector(&mut vector, &latent.passage(doc, i, rng));
            let text = corpus::question(corpus, doc, i, rng);
            out.push(Question {
                tenant,
                short: text
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" "),
                text,
                vector,
                exact: Vec::new(),
                exact_k: 0,
            });
        }
    }
    for i in (1..out.len()).rev() {
        out.swap(i, rng.random_range(0..=i));
    }
    out
}

/// The secondary indexes of the chunk tables (all but those of constraints): dropped for the load, each with its
/// definition, to be built again once the rows are in.
async fn drop_indexes(conn: &mut PgConnection) -> Result<Vec<(String, String)>> {
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i \
         WHERE i.indrelid IN ('upload_pipeline.document_chunks'::regclass, \
                              to_regclass('upload_pipeline.chunk_keywords')) \
           AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)",
    )
    .fetch_all(&mut *conn)
    .await?;
    for (name, _) in &indexes {
        sqlx::query(&format!("DROP INDEX {name}"))
            .execute(&mut *conn)
            .await?;
    }
    Ok(indexes)
}

/// Builds `indexes` again, with the memory an HNSW build of this size needs to stay in memory; returns the seconds
/// the HNSW index took and the seconds the others and `VACUUM ANALYZE` took.
async fn build_indexes(
    conn: &mut PgConnection,
    indexes: &[(String, String)],
) -> Result<(f64, f64)> {
    sqlx::query("SET maintenance_work_mem = '4GB'")
        .execute(&mut *conn)
        .await?;
    let (mut hnsw, mut other) = (0.0, 0.0);
    for (_, definition) in indexes {
        let t = Instant::now();
        sqlx::query(definition)
            .execute(&mut *conn)
            .await
            .with_context(|| format!("building {definition}"))?;
        if definition.contains("USING hnsw") {
            hnsw += t.elapsed().as_secs_f64();
        } else {
            other += t.elapsed().as_secs_f64();
        }
    }
    let t = Instant::now();
    // As autovacuum leaves a table at rest: statistics, and a visibility map for index-only scans.
    let keywords: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('upload_pipeline.chunk_keywords')::text")
            .fetch_one(&mut *conn)
            .await?;
    let tables = [
        "upload_pipeline.documents",
        "upload_pipeline.document_chunks",
    ];
    for table in tables.iter().copied().chain(keywords.as_deref()) {
        sqlx::query(&format!("VACUUM ANALYZE {table}"))
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("RESET maintenance_work_mem")
        .execute(&mut *conn)
        .await?;
    Ok((hnsw, other + t.elapsed().as_secs_f64()))
}

/// COPYs the documents (all ready) and their chunks, in the documents' arrival order.
async fn load(
    conn: &mut PgConnection,
    corpus: &Corpus,
    latent: &Latent,
    docs: &[Doc],
    users: &[Uuid],
    rng: &mut SmallRng,
) -> Result<()> {
    let ids: Vec<Uuid> = docs.iter().map(|_| Uuid::new_v4()).collect();
    let mut copy = conn
        .copy_in_raw(
            "COPY upload_pipeline.documents (id, user_id, filename, content_type, size_bytes, sha256, status, \
             chunks_total, ready_at) FROM STDIN",
        )
        .await?;
    let mut buf = String::new();
    for (n, (doc, id)) in docs.iter().zip(&ids).enumerate() {
        buf.push_str(&format!(
            "{id}\t{}\tdoc-{n}.txt\ttext/plain\t0\t{n:064x}\tready\t{}\tnow\n",
            users[doc.tenant], doc.chunks
        ));
    }
    copy.send(buf.into_bytes()).await?;
    copy.finish().await?;
    let mut copy = conn
        .copy_in_raw(
            "COPY upload_pipeline.document_chunks (document_id, user_id, chunk_index, content, token_count, \
             content_sha256, embedding, embedding_model) FROM STDIN",
        )
        .await?;
    let mut buf = String::new();
    let mut n = 0u64;
    for (doc, id) in docs.iter().zip(&ids) {
        for i in 0..doc.chunks {
            buf.push_str(&format!("{id}\t{}\t{i}\t", users[doc.tenant]));
            let words = corpus::chunk_text(corpus, doc, i, &mut buf, rng);
            buf.push_str(&format!("\t{words}\t{n:064x}\t"));
            corpus::write_vector(&mut buf, &latent.passage(doc, i, rng));
            buf.push('\t');
            buf.push_str(MODEL);
            buf.push('\n');
            n += 1;
            if buf.len() > 4 << 20 {
                copy.send(std::mem::take(&mut buf).into_bytes()).await?;
            }
        }
    }
    copy.send(buf.into_bytes()).await?;
    copy.finish().await?;
    Ok(())
}

/// Every question's true top 10 (and the near-ties of its 10th, see [`TIE`]): each asking tenant's chunks of the
/// model in ready documents read once (their vectors in pgvector's binary form), and every distance computed here
/// as pgvector defines cosine distance (single-precision sums, then 1 - dot / sqrt(|a|^2 |b|^2) in double).
/// Independent of the search's own SQL, and one read of each tenant where a query per question re-read it.
async fn exact_tops(
    conn: &mut PgConnection,
    users: &[Uuid],
    questions: &mut [Question],
) -> Result<()> {
    let mut asking: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (n, q) in questions.iter().enumerate() {
        asking.entry(q.tenant).or_default().push(n);
    }
    for (tenant, asked) in asking {
        let rows: Vec<(Uuid, pgvector::Vector)> = sqlx::query_as(
            "SELECT c.id, c.embedding FROM upload_pipeline.document_chunks c \
             JOIN upload_pipeline.documents d ON d.id = c.document_id \
             WHERE c.user_id = $1 AND c.embedding_model = $2 AND d.status = 'ready'",
        )
        .bind(users[tenant])
        .bind(MODEL)
        .fetch_all(&mut *conn)
        .await?;
        for n in asked {
            let query = parse_vector(&questions[n].vector)?;
            let mut scored: Vec<(f64, Uuid)> = rows
                .iter()
                .map(|(id, v)| (cosine_distance(&query, v.as_slice()), *id))
                .collect();
            let k = scored.len().min(10);
            let by = |a: &(f64, Uuid), b: &(f64, Uuid)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
            if k > 0 {
                scored.select_nth_unstable_by(k - 1, by);
            }
            // The top k, then the near-ties of the k-th beyond it.
            let tenth = scored.get(k.wrapping_sub(1)).map_or(f64::INFINITY, |s| s.0);
            let ties = scored[k..]
                .iter()
                .filter(|s| s.0 <= tenth + TIE)
                .map(|s| s.1);
            questions[n].exact = scored[..k].iter().map(|s| s.1).chain(ties).collect();
            questions[n].exact_k = k;
        }
    }
    Ok(())
}

/// A vector's text form (`[0.1,-0.2,...]`), read as Postgres reads it (each number rounded to the nearest `f32`).
fn parse_vector(text: &str) -> Result<Vec<f32>> {
    text.trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|x| {
            x.parse::<f32>()
                .with_context(|| format!("not a number: {x}"))
        })
        .collect()
}

/// pgvector's cosine distance (`<=>`): sums in single precision, the quotient in double (a zero vector, NaN in
/// pgvector, which the corpus never makes, as 1 here).
fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f32, 0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    let similarity = f64::from(dot) / (f64::from(na) * f64::from(nb)).sqrt();
    if similarity.is_nan() {
        1.0
    } else {
        1.0 - similarity.clamp(-1.0, 1.0)
    }
}

/// `search_chunks` in `mode` for `q` as `user` under row-level security, at the exact-scan limit `limit` (`None`:
/// the database's): the statement's milliseconds and the hits' chunk ids.
async fn search(
    conn: &mut PgConnection,
    user: Uuid,
    q: &Question,
    mode: &str,
    limit: Option<i64>,
) -> Result<(f64, Vec<Uuid>)> {
    timed_search(conn, user, q, &q.text, mode, limit).await
}

/// [`search`] with `text` in place of the question's own words.
async fn timed_search(
    conn: &mut PgConnection,
    user: Uuid,
    q: &Question,
    text: &str,
    mode: &str,
    limit: Option<i64>,
) -> Result<(f64, Vec<Uuid>)> {
    let mut tx = conn.begin().await?;
    sqlx::query("SET LOCAL ROLE upload_pipeline_app")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT set_config('upload_pipeline.user_id', $1, true)")
        .bind(user.to_string())
        .execute(&mut *tx)
        .await?;
    if let Some(limit) = limit {
        sqlx::query("SELECT set_config('upload_pipeline.exact_search_chunks', $1, true)")
            .bind(limit.to_string())
            .execute(&mut *tx)
            .await?;
    }
    let t = Instant::now();
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM upload_pipeline.search_chunks($1, $2::vector, 10, mode => $3)",
    )
    .bind(text)
    .bind(&q.vector)
    .bind(mode)
    .fetch_all(&mut *tx)
    .await?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    tx.commit().await?;
    Ok((ms, ids))
}
