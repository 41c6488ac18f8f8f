//! Tenant-correct recall: a small tenant among a big one gets its exact top k, in SQL and through the API, from a
//! scan of its own chunks (the plan, and the index scans the search really made, show which path it took); a tenant
//! above `upload_pipeline.exact_search_chunks` walks the model's HNSW graph until it has its own index, then that
//! one (built by the maintenance pass, rebuilt when left invalid, dropped when the tenant shrinks, by one replica
//! at a time); a filter that leaves it few chunks scans those exactly.

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

/// `user`'s own index of the test's model (`upload_pipeline.tenant_index_name`).
async fn own_index(app: &TestApp, user: Uuid) -> String {
    sqlx::query_scalar("SELECT upload_pipeline.tenant_index_name($1, $2)")
        .bind(user)
        .bind(&app.settings.embedding.model)
        .fetch_one(app.admin())
        .await
        .unwrap()
}

/// Sets the database's `upload_pipeline.exact_search_chunks` to `limit` and returns a pool of the owner's that
/// sees it (sessions take a database's settings when they start).
async fn owner_pool_at(app: &TestApp, limit: i32) -> sqlx::PgPool {
    sqlx::query(&format!(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET upload_pipeline.exact_search_chunks = {limit}', \
         current_database()); END $$"
    ))
    .execute(app.admin())
    .await
    .unwrap();
    let url = app
        .settings
        .database_admin_url
        .as_ref()
        .unwrap_or(&app.settings.database_url);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(url.expose())
        .await
        .unwrap()
}

/// The index scans of `user`'s vector search (limit 1,000) made of `indexes`, and its hits.
async fn scans_of(app: &TestApp, user: Uuid, indexes: &[&str]) -> (Vec<Uuid>, Vec<i64>) {
    search_sql(app, user, json!({}), Some("1000"), indexes).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_above_the_limit_gets_its_own_index_which_its_searches_walk_until_it_shrinks() {
    let app = TestApp::spawn(settings(&unique_prefix("tenant-own"), &tests::redis_url())).await;
    let (big, small) = (Uuid::new_v4(), Uuid::new_v4());
    two_tenants(&app, big, small).await;
    let hnsw = hnsw_index(&app).await;
    let own = own_index(&app, big).await;
    let owner = owner_pool_at(&app, 1000).await;

    // The pass builds the big tenant's index (2,000 chunks, above 1,000) and not the small one's (40).
    let pass = upload_pipeline::db::maintain_tenant_indexes(&owner, 64)
        .await
        .unwrap()
        .expect("no other process holds the lock");
    assert_eq!(pass.limit, 1000);
    assert_eq!(pass.changes.len(), 1, "{pass:?}");
    let change = &pass.changes[0];
    assert_eq!(
        (
            change.action.as_str(),
            change.index_name.as_str(),
            change.user_id,
            change.chunks
        ),
        ("build", own.as_str(), big, 2000)
    );
    assert_eq!(change.error, None);
    assert_eq!(pass.indexes, 1);
    // A second pass has nothing to do.
    let again = upload_pipeline::db::maintain_tenant_indexes(&owner, 64)
        .await
        .unwrap()
        .unwrap();
    assert!(again.changes.is_empty(), "{again:?}");

    // The big tenant's searches walk its own graph, never the model's; their hits are its own chunks.
    let (found, scans) = scans_of(&app, big, &[&own, &hnsw]).await;
    assert_eq!(found.len(), 5);
    assert!(scans[0] >= 1, "the big tenant's own index was not walked");
    assert_eq!(scans[1], 0, "the big tenant walked the model's graph");
    let owners: Vec<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT user_id FROM upload_pipeline.document_chunks WHERE id = ANY ($1)",
    )
    .bind(&found)
    .fetch_all(app.admin())
    .await
    .unwrap();
    assert_eq!(owners, [big]);
    // The plan names it, the statement the caller as a constant.
    let embedding = &app.settings.embedding;
    let sql: String = sqlx::query_scalar(
        "SELECT upload_pipeline.search_chunks_sql('vector', $1, $2, false, false, 'keyword', $3)",
    )
    .bind(&embedding.model)
    .bind(embedding.dimensions as i32)
    .bind(big)
    .fetch_one(app.admin())
    .await
    .unwrap();
    assert!(sql.contains(&format!("c.user_id = '{big}'::uuid")), "{sql}");
    let query = HashingEmbedder::new(&embedding.model, embedding.dimensions as usize).vector(QUERY);
    let mut tx = upload_pipeline::db::begin_as(app.admin(), big)
        .await
        .unwrap();
    sqlx::query("SET LOCAL enable_sort = off")
        .execute(&mut *tx)
        .await
        .unwrap();
    let explained: Vec<String> = sqlx::query_scalar(&format!(
        "EXPLAIN {}",
        sql.replace("$1", &format!("'{}'::vector", literal(&query)))
            .replace("$4", "40")
            .replace("$8", "5")
    ))
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    let explained = explained.join("\n");
    assert!(
        explained.contains(&format!("Index Scan using {own}")),
        "{explained}"
    );
    // The agents' older door walks it too.
    let mut tx = upload_pipeline::db::begin_as(app.admin(), big)
        .await
        .unwrap();
    sqlx::query("SET LOCAL upload_pipeline.exact_search_chunks = 1000")
        .execute(&mut *tx)
        .await
        .unwrap();
    let matched: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM upload_pipeline.match_chunks($1::vector, 5)")
            .bind(literal(&query))
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    let walked: i64 = sqlx::query_scalar(
        "SELECT pg_stat_get_xact_numscans(format('upload_pipeline.%I', $1::text)::regclass)",
    )
    .bind(&own)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(matched.len(), 5);
    assert!(walked >= 1, "match_chunks did not walk the tenant's index");
    // The small tenant is scanned exactly, as before.
    let (found, scans) = scans_of(&app, small, &[&own, &hnsw]).await;
    assert_eq!(found, exact_top(&app, small, None, 5).await);
    assert_eq!(scans, [0, 0]);

    // A build that failed (or was cancelled by a restart) leaves an invalid index: never searched; the next pass
    // drops it and builds it again.
    sqlx::query(
        "UPDATE pg_catalog.pg_index SET indisvalid = false \
         WHERE indexrelid = format('upload_pipeline.%I', $1::text)::regclass",
    )
    .bind(&own)
    .execute(app.admin())
    .await
    .unwrap();
    let (found, scans) = scans_of(&app, big, &[&own, &hnsw]).await;
    assert_eq!(found.len(), 5);
    assert_eq!(scans[0], 0, "an invalid index was searched");
    assert!(
        scans[1] >= 1,
        "without its own index, not the model's graph"
    );
    let rebuilt = upload_pipeline::db::maintain_tenant_indexes(&owner, 64)
        .await
        .unwrap()
        .unwrap();
    let done: Vec<(&str, &str, Option<&str>)> = rebuilt
        .changes
        .iter()
        .map(|c| (c.action.as_str(), c.index_name.as_str(), c.error.as_deref()))
        .collect();
    assert_eq!(
        done,
        [("drop", own.as_str(), None), ("build", own.as_str(), None)]
    );
    assert_eq!(rebuilt.indexes, 1);
    let (_, scans) = scans_of(&app, big, &[&own, &hnsw]).await;
    assert!(scans[0] >= 1 && scans[1] == 0, "{scans:?}");

    // Down to 499 chunks (under half the limit): the index goes, and the tenant is scanned exactly.
    sqlx::query(
        "DELETE FROM upload_pipeline.document_chunks \
         WHERE id IN (SELECT id FROM upload_pipeline.document_chunks WHERE user_id = $1 ORDER BY id LIMIT 1501)",
    )
    .bind(big)
    .execute(app.admin())
    .await
    .unwrap();
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM upload_pipeline.document_chunks WHERE user_id = $1",
    )
    .bind(big)
    .fetch_one(app.admin())
    .await
    .unwrap();
    assert!(left < 500, "{left} chunks left");
    let dropped = upload_pipeline::db::maintain_tenant_indexes(&owner, 64)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dropped.changes.len(), 1, "{dropped:?}");
    assert_eq!(
        (
            dropped.changes[0].action.as_str(),
            dropped.changes[0].index_name.as_str()
        ),
        ("drop", own.as_str())
    );
    assert_eq!(dropped.indexes, 0);
    let gone: Option<String> =
        sqlx::query_scalar("SELECT to_regclass(format('upload_pipeline.%I', $1::text))::text")
            .bind(&own)
            .fetch_one(app.admin())
            .await
            .unwrap();
    assert_eq!(gone, None);
    let (found, _) = scans_of(&app, big, &[&hnsw]).await;
    assert_eq!(found, exact_top(&app, big, None, 5).await);
    owner.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_builds_a_growing_tenants_index_on_its_interval_one_replica_at_a_time() {
    let mut s = settings(&unique_prefix("tenant-serve"), &tests::redis_url());
    s.search.tenant_index_interval = std::time::Duration::from_secs(1);
    let app = TestApp::spawn(s).await;
    let (big, small) = (Uuid::new_v4(), Uuid::new_v4());
    two_tenants(&app, big, small).await;
    let own = own_index(&app, big).await;
    // The limit moves under the server: each of its passes reads it in a session of its own.
    let owner = owner_pool_at(&app, 1000).await;
    // Nothing here runs a pass: the index turns valid only if the server's loop builds it.
    tests::wait_for(
        "the server to build the tenant's index",
        std::time::Duration::from_secs(120),
        || async {
            let valid: Option<bool> = sqlx::query_scalar(
                "SELECT i.indisvalid FROM pg_catalog.pg_index i \
                 WHERE i.indexrelid = to_regclass(format('upload_pipeline.%I', $1::text))",
            )
            .bind(&own)
            .fetch_optional(app.admin())
            .await
            .unwrap();
            (valid == Some(true)).then_some(())
        },
    )
    .await;
    let hnsw = hnsw_index(&app).await;
    let (found, scans) = scans_of(&app, big, &[&own, &hnsw]).await;
    assert_eq!(found.len(), 5);
    assert!(scans[0] >= 1 && scans[1] == 0, "{scans:?}");

    // One replica at a time: while another session holds the lock (taken between two of the server's passes, which
    // hold it for milliseconds a second), a pass returns at once and does nothing.
    let mut holder = owner.acquire().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(upload_pipeline::db::TENANT_INDEX_LOCK)
            .fetch_one(&mut *holder)
            .await
            .unwrap();
        if locked {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server's passes held the lock for 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pass = upload_pipeline::db::maintain_tenant_indexes(&owner, 64)
        .await
        .unwrap();
    assert!(pass.is_none(), "{pass:?}");
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(upload_pipeline::db::TENANT_INDEX_LOCK)
        .execute(&mut *holder)
        .await
        .unwrap();
    drop(holder);
    owner.close().await;
}
