//! Tenant-correct recall: a small tenant among a big one gets its exact top k, in SQL and through the API, from a
//! scan of its own chunks (the plan, and the index scans the search really made, show which path it took); a tenant
//! above `upload_pipeline.exact_search_chunks` walks the model's HNSW graph; a filter that leaves it few chunks scans
//! those exactly.

use serde_json::json;
use sqlx::{Connection as _, PgConnection};
use tests::{TestApp, settings, unique_prefix};
use upload_pipeline::{
    client::{SearchMode, SearchRequest},
    providers::hashing::HashingEmbedder,
};
use uuid::Uuid;

use super::{Doc, literal, seed};

/// What the tenants are asked.
const QUERY: &str = "tide tables for the harbour entrance";
/// The index of the exact path (migration 20261202000000).
const USER_INDEX: &str = "document_chunks_user_model";

/// Adds `n` chunks to `docs` (round robin) for `user`, their vectors `toward` times the query's plus noise of
/// `spread`: near the query's direction for 1, unrelated to it for 0.
async fn chunks(app: &TestApp, user: Uuid, docs: &[Uuid], n: i32, toward: f32, spread: f32) {
    let embedding = &app.settings.embedding;
    let query = HashingEmbedder::new(&embedding.model, embedding.dimensions as usize).vector(QUERY);
    let mut tx = app.admin().begin().await.unwrap();
    sqlx::query("SELECT setseed(0.42)")
        .execute(&mut *tx)
        .await
        .unwrap();
    // `i * 0` ties the vector's subquery to the row, so that each row draws its own noise.
    sqlx::query(
        "INSERT INTO upload_pipeline.document_chunks (document_id, user_id, chunk_index, content, token_count, \
         content_sha256, embedding, embedding_model) \
         SELECT $1[1 + i % cardinality($1)], $2, i, 'chunk ' || i, 2, md5($2::text || i), \
           (SELECT array_agg($4 * q + (random() - 0.5) * $5 + i * 0) FROM unnest($3::real[]) q)::vector, $6 \
         FROM generate_series(0, $7 - 1) i",
    )
    .bind(docs)
    .bind(user)
    .bind(&query)
    .bind(toward)
    .bind(spread)
    .bind(&embedding.model)
    .bind(n)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// `user`'s true top `k` among the chunks of `docs` (all their ready ones: `None`): every distance computed, with
/// index scans off so the HNSW index cannot answer.
async fn exact_top(app: &TestApp, user: Uuid, docs: Option<&[Uuid]>, k: i64) -> Vec<Uuid> {
    let embedding = &app.settings.embedding;
    let query = HashingEmbedder::new(&embedding.model, embedding.dimensions as usize).vector(QUERY);
    let mut tx = app.admin().begin().await.unwrap();
    sqlx::query("SET LOCAL enable_indexscan = off")
        .execute(&mut *tx)
        .await
        .unwrap();
    let top = sqlx::query_scalar(
        "SELECT c.id FROM upload_pipeline.document_chunks c JOIN upload_pipeline.documents d ON d.id = c.document_id \
         WHERE c.user_id = $1 AND d.status = 'ready' AND ($2::uuid[] IS NULL OR c.document_id = ANY ($2)) \
         ORDER BY c.embedding <=> $3::vector LIMIT $4",
    )
    .bind(user)
    .bind(docs)
    .bind(literal(&query))
    .bind(k)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    top
}

/// What `search_chunks` answers `user` in vector mode (`filter`: none if `{}`), at the exact-scan limit `limit`
/// (None: the default), and the index scans it made of each of `indexes` (counted before and after: a backend's
/// counts of a transaction are kept until they are flushed, which may be after the next one).
async fn search_sql(
    app: &TestApp,
    user: Uuid,
    filter: serde_json::Value,
    limit: Option<&str>,
    indexes: &[&str],
) -> (Vec<Uuid>, Vec<i64>) {
    let embedding = &app.settings.embedding;
    let query = HashingEmbedder::new(&embedding.model, embedding.dimensions as usize).vector(QUERY);
    let mut tx = upload_pipeline::db::begin_as(app.admin(), user)
        .await
        .unwrap();
    if let Some(limit) = limit {
        sqlx::query("SELECT set_config('upload_pipeline.exact_search_chunks', $1, true)")
            .bind(limit)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    let count = "SELECT array_agg(pg_stat_get_xact_numscans(format('upload_pipeline.%I', i)::regclass) ORDER BY n) \
                 FROM unnest($1::text[]) WITH ORDINALITY AS x (i, n)";
    let before: Vec<i64> = sqlx::query_scalar(count)
        .bind(indexes)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let ids = sqlx::query_scalar(
        "SELECT id FROM upload_pipeline.search_chunks(NULL, $1::vector, 5, $2, 'vector')",
    )
    .bind(literal(&query))
    .bind(filter)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    let after: Vec<i64> = sqlx::query_scalar(count)
        .bind(indexes)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    (ids, after.iter().zip(&before).map(|(a, b)| a - b).collect())
}

/// The plan of `search_chunks`' vector-mode query of either shape (`exact`, else the graph), as `user` under row-level security, with the planner setting `search_chunks` gives that shape
/// (sequential scans off for the exact one, sorts off for the graph).
async fn plan(app: &TestApp, user: Uuid, exact: bool, documents: Option<&[Uuid]>) -> String {
    let embedding = &app.settings.embedding;
    let query = HashingEmbedder::new(&embedding.model, embedding.dimensions as usize).vector(QUERY);
    let mut conn = PgConnection::connect(app.settings.database_url.expose())
        .await
        .unwrap();
    let sql: String =
        sqlx::query_scalar("SELECT upload_pipeline.search_chunks_sql('vector', $1, $2, $3, $4)")
            .bind(&embedding.model)
            .bind(embedding.dimensions as i32)
            .bind(documents.is_some())
            .bind(exact)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    sqlx::query(&format!(
        "PREPARE search_q(vector, tsquery, uuid[], int, int, float8, float8, int) AS {sql}"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let mut tx = conn.begin().await.unwrap();
    let shape = if exact {
        "SET LOCAL enable_seqscan = off"
    } else {
        "SET LOCAL enable_sort = off"
    };
    for statement in [shape, "SET LOCAL ROLE upload_pipeline_app"] {
        sqlx::query(statement).execute(&mut *tx).await.unwrap();
    }
    sqlx::query("SELECT set_config('upload_pipeline.user_id', $1, true)")
        .bind(user.to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
    // As search_chunks runs it (EXECUTE ... USING): the documents are a constant of the plan.
    let documents = documents.map_or_else(
        || "NULL".to_owned(),
        |ids| {
            let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
            format!("'{{{}}}'", ids.join(","))
        },
    );
    let rows: Vec<String> = sqlx::query_scalar(&format!(
        "EXPLAIN EXECUTE search_q('{}', NULL, {documents}, 40, 60, 1, 1, 5)",
        literal(&query)
    ))
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    rows.join("\n")
}

/// The model's HNSW index.
async fn hnsw_index(app: &TestApp) -> String {
    sqlx::query_scalar("SELECT index_name FROM upload_pipeline.embedding_models WHERE model = $1")
        .bind(&app.settings.embedding.model)
        .fetch_one(app.admin())
        .await
        .unwrap()
}

/// A big tenant of 2,000 chunks around the query, in four documents, and a small one of 40 chunks further off, in
/// two: a walk of the graph meets the big one's first. Returns the big tenant's documents.
async fn two_tenants(app: &TestApp, big: Uuid, small: Uuid) -> Vec<Uuid> {
    let mut big_docs = Vec::new();
    for i in 0..4 {
        big_docs.push(seed(app, big, Doc::ready(&format!("crowd-{i}.txt"), &[])).await);
    }
    let mut small_docs = Vec::new();
    for i in 0..2 {
        small_docs.push(seed(app, small, Doc::ready(&format!("small-{i}.txt"), &[])).await);
    }
    chunks(app, big, &big_docs, 2000, 1.0, 0.1).await;
    chunks(app, small, &small_docs, 40, 0.2, 0.3).await;
    sqlx::query("ANALYZE upload_pipeline.document_chunks")
        .execute(app.admin())
        .await
        .unwrap();
    big_docs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_tenant_among_a_big_one_gets_its_exact_top_k_in_sql_and_through_the_api() {
    let app = TestApp::spawn(settings(
        &unique_prefix("tenant-exact"),
        &tests::redis_url(),
    ))
    .await;
    let (big, small) = (Uuid::new_v4(), Uuid::new_v4());
    two_tenants(&app, big, small).await;
    let truth = exact_top(&app, small, None, 5).await;
    assert_eq!(truth.len(), 5);

    // In SQL: the exact top 5, by a scan of the tenant's chunks through its index, never the graph.
    let hnsw = hnsw_index(&app).await;
    let (found, scans) = search_sql(&app, small, json!({}), None, &[&hnsw, USER_INDEX]).await;
    assert_eq!(found, truth);
    assert_eq!(scans[0], 0, "the small tenant's search walked the graph");
    // A limit set to what is not a number is the default's, not an error in every search.
    for bad in ["lots", " ", "99999999999999"] {
        let (found, _) = search_sql(&app, small, json!({}), Some(bad), &[&hnsw]).await;
        assert_eq!(found, truth, "with exact_search_chunks = {bad:?}");
    }
    assert!(
        scans[1] >= 1,
        "the small tenant's chunks were not read by their index"
    );
    // The agents' older door chooses alike.
    let embedding = &app.settings.embedding;
    let query = HashingEmbedder::new(&embedding.model, embedding.dimensions as usize).vector(QUERY);
    let mut tx = upload_pipeline::db::begin_as(app.admin(), small)
        .await
        .unwrap();
    let matched: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM upload_pipeline.match_chunks($1::vector, 5)")
            .bind(literal(&query))
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(matched, truth);

    // Through the API, which embeds the query and calls search_chunks.
    let request = SearchRequest::new(QUERY).k(5).mode(SearchMode::Vector);
    let hits = app
        .client(small)
        .search_with(&request)
        .await
        .unwrap()
        .results;
    let api: Vec<Uuid> = hits.iter().map(|h| h.chunk_id).collect();
    assert_eq!(api, truth);

    // The plan of that path: the tenant's rows by the users' index, every distance sorted; no graph.
    let exact = plan(&app, small, true, None).await;
    assert!(exact.contains(USER_INDEX), "{exact}");
    assert!(!exact.contains(&hnsw), "{exact}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_above_the_limit_walks_the_graph_and_a_filter_leaving_it_few_chunks_scans_them() {
    let app = TestApp::spawn(settings(
        &unique_prefix("tenant-graph"),
        &tests::redis_url(),
    ))
    .await;
    let (big, small) = (Uuid::new_v4(), Uuid::new_v4());
    let big_docs = two_tenants(&app, big, small).await;
    let hnsw = hnsw_index(&app).await;

    // 2,000 chunks, above a limit of 1,000: the model's graph (approximate: its recall is the benchmark's to
    // measure, not a test's to pin).
    let (found, scans) = search_sql(&app, big, json!({}), Some("1000"), &[&hnsw]).await;
    assert_eq!(found.len(), 5);
    assert!(
        scans[0] >= 1,
        "the big tenant's search did not walk the graph"
    );
    let graph = plan(&app, big, false, None).await;
    assert!(
        graph.contains(&format!("Index Scan using {hnsw}")),
        "{graph}"
    );

    // A filter that leaves one document of 500 chunks, under the limit: those, exactly.
    let filter = json!({"type": "eq", "key": "filename", "value": "crowd-2.txt"});
    let (found, scans) = search_sql(&app, big, filter, Some("1000"), &[&hnsw]).await;
    assert_eq!(found, exact_top(&app, big, Some(&big_docs[2..3]), 5).await);
    assert_eq!(scans, [0], "the filtered search walked a graph");
    let exact = plan(&app, big, true, Some(&big_docs[2..3])).await;
    assert!(!exact.contains("hnsw"), "{exact}");
}
