//! Only ready documents are searched, by every door; a 3,072-dimension model is indexed and searched as halfvec;
//! `search_chunks` in SQL shows the app role only its own chunks and refuses malformed filters.

use std::collections::BTreeSet;

use sqlx::Connection as _;
use tests::{TestApp, settings, unique_prefix};
use upload_pipeline::{
    client::{SearchMode, SearchRequest},
    providers::hashing::HashingEmbedder,
};
use uuid::Uuid;

use super::{Doc, literal, names, seed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_still_processing_or_failed_are_never_returned() {
    let app = TestApp::spawn(settings(&unique_prefix("ready-only"), &tests::redis_url())).await;
    let user = Uuid::new_v4();
    let text = "The lighthouse keeper trimmed the lamp wick every evening.";
    let ready = seed(&app, user, Doc::ready("ready.txt", &[text])).await;
    for status in ["queued", "parsing", "chunking", "embedding", "failed"] {
        let doc = Doc {
            status,
            ..Doc::ready(&format!("{status}.txt"), &[text])
        };
        seed(&app, user, doc).await;
    }
    let client = app.client(user);
    for mode in [SearchMode::Hybrid, SearchMode::Vector, SearchMode::Keyword] {
        let request = SearchRequest::new("lighthouse keeper").k(20).mode(mode);
        let hits = client.search_with(&request).await.unwrap().results;
        assert_eq!(names(&hits), BTreeSet::from(["ready.txt"]), "{mode}");
    }
    // The agents' older door too.
    let embedder = HashingEmbedder::new(
        &app.settings.embedding.model,
        app.settings.embedding.dimensions as usize,
    );
    let mut tx = upload_pipeline::db::begin_as(app.admin(), user)
        .await
        .unwrap();
    let found: Vec<Uuid> =
        sqlx::query_scalar("SELECT document_id FROM upload_pipeline.match_chunks($1::vector, 20)")
            .bind(literal(&embedder.vector(text)))
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    assert_eq!(found, [ready]);
    tx.rollback().await.unwrap();
}

/// The plan of `search_chunks`' query in vector mode on `model` (the graph's shape, which a caller of more than
/// `upload_pipeline.exact_search_chunks()` chunks gets), as `user` under row-level security, looking in
/// `documents` (the ready documents a filter let through; `None`: no filter). Scans and sorts are off, so that the
/// small test tables do not make reading them whole, or a few documents' chunks sorted, look cheaper than the index:
/// the plan shows whether the HNSW index can serve the query at all.
async fn plan(
    app: &TestApp,
    user: Uuid,
    model: &str,
    dims: u32,
    vector: &str,
    documents: Option<&[Uuid]>,
) -> String {
    let mut conn = sqlx::PgConnection::connect(app.settings.database_url.expose())
        .await
        .unwrap();
    let sql: String =
        sqlx::query_scalar("SELECT upload_pipeline.search_chunks_sql('vector', $1, $2, $3, false)")
            .bind(model)
            .bind(dims as i32)
            .bind(documents.is_some())
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
    for statement in [
        "SET LOCAL enable_seqscan = off",
        "SET LOCAL enable_bitmapscan = off",
        "SET LOCAL enable_sort = off",
        "SET LOCAL ROLE upload_pipeline_app",
    ] {
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
        "EXPLAIN EXECUTE search_q('{vector}', NULL, {documents}, 40, 60, 1, 1, 5)"
    ))
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    rows.join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3072_dimension_model_is_indexed_as_halfvec_and_searched_on_that_index() {
    let mut s = settings(&unique_prefix("wide"), &tests::redis_url());
    s.embedding.model = "hashing-wide".into();
    s.embedding.dimensions = 3072;
    let app = TestApp::spawn(s).await;
    let (dims, vector_type, index): (i32, String, String) = sqlx::query_as(
        "SELECT dimensions, vector_type, index_name FROM upload_pipeline.embedding_models WHERE model = 'hashing-wide'",
    )
    .fetch_one(app.admin())
    .await
    .unwrap();
    assert_eq!((dims, vector_type.as_str()), (3072, "halfvec"));
    let definition: String =
        sqlx::query_scalar("SELECT indexdef FROM pg_indexes WHERE indexname = $1")
            .bind(&index)
            .fetch_one(app.admin())
            .await
            .unwrap();
    assert!(
        definition.contains("USING hnsw (((embedding)::halfvec(3072)) halfvec_cosine_ops)"),
        "{definition}"
    );

    let user = Uuid::new_v4();
    let passages = [
        "Glaciers carve U-shaped valleys as they grind over the bedrock.",
        "Coral reefs grow where warm shallow water lets the algae thrive.",
        "Desert dunes migrate downwind a few metres every year.",
    ];
    let id = seed(&app, user, Doc::ready("geo.txt", &passages)).await;
    let client = app.client(user);
    for mode in [SearchMode::Vector, SearchMode::Hybrid] {
        let request = SearchRequest::new("glaciers carve valleys").k(3).mode(mode);
        let found = client.search_with(&request).await.unwrap();
        assert_eq!(found.embedding_model, "hashing-wide");
        assert_eq!(found.results.len(), 3, "{mode}");
        assert_eq!(
            (found.results[0].document_id, found.results[0].chunk_index),
            (id, 0),
            "{mode}"
        );
        assert_eq!(found.results[0].vector_rank, Some(1));
    }
    let wide = HashingEmbedder::new("hashing-wide", 3072).vector("glaciers carve valleys");
    let plan = plan(&app, user, "hashing-wide", 3072, &literal(&wide), None).await;
    assert!(
        plan.contains(&format!("Index Scan using {index}")),
        "{plan}"
    );
    assert!(plan.contains("::halfvec(3072)"), "{plan}");
    // With a filter, the graph is still walked, keeping the chunks of the documents the filter let through.
    let plan = self::plan(
        &app,
        user,
        "hashing-wide",
        3072,
        &literal(&wide),
        Some(&[id]),
    )
    .await;
    assert!(
        plan.contains(&format!("Index Scan using {index}")),
        "{plan}"
    );
    assert!(plan.contains("(document_id = ANY ('{"), "{plan}");
}

/// Alice's and Bob's documents with the same passage; Alice's id, and the query's vector.
async fn two_users(app: &TestApp, alice: Uuid, bob: Uuid) -> (Uuid, String) {
    let text = "Lighthouse lenses focus the lamp into a beam seen twenty miles out.";
    let mine = seed(app, alice, Doc::ready("alice.txt", &[text])).await;
    seed(
        app,
        bob,
        Doc::ready("bob.txt", &[text, "Fresnel lighthouse lenses."]),
    )
    .await;
    let embedding = &app.settings.embedding;
    let embedder = HashingEmbedder::new(&embedding.model, embedding.dimensions as usize);
    (mine, literal(&embedder.vector("lighthouse lenses")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_chunks_in_sql_shows_the_app_role_only_its_own_ready_chunks() {
    let app = TestApp::spawn(settings(&unique_prefix("sql-search"), &tests::redis_url())).await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let (mine, vector) = two_users(&app, alice, bob).await;
    let mut tx = upload_pipeline::db::begin_as(app.admin(), alice)
        .await
        .unwrap();
    for (mode, embedding) in [
        ("hybrid", Some(&vector)),
        ("vector", Some(&vector)),
        ("keyword", None),
    ] {
        let rows: Vec<(Uuid, String, Option<i32>, Option<i32>)> = sqlx::query_as(
            "SELECT document_id, filename, vector_rank, keyword_rank \
             FROM upload_pipeline.search_chunks('lighthouse lenses', $1::vector, 10, mode => $2)",
        )
        .bind(embedding)
        .bind(mode)
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        assert_eq!(rows.len(), 1, "{mode}: {rows:?}");
        assert_eq!(
            (rows[0].0, rows[0].1.as_str()),
            (mine, "alice.txt"),
            "{mode}"
        );
        assert_eq!(rows[0].2.is_some(), mode != "keyword", "{mode}: {rows:?}");
        assert_eq!(rows[0].3.is_some(), mode != "vector", "{mode}: {rows:?}");
    }
    let bobs: Vec<Uuid> = sqlx::query_scalar(
        "SELECT document_id FROM upload_pipeline.search_chunks('lighthouse', $1::vector, 10, \
         '{\"type\": \"eq\", \"key\": \"filename\", \"value\": \"bob.txt\"}')",
    )
    .bind(&vector)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert!(bobs.is_empty(), "{bobs:?}");
    tx.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_chunks_in_sql_refuses_malformed_filters_and_the_app_role_cannot_change_the_text_config()
 {
    let app = TestApp::spawn(settings(&unique_prefix("sql-refuse"), &tests::redis_url())).await;
    let mut tx = upload_pipeline::db::begin_as(app.admin(), Uuid::new_v4())
        .await
        .unwrap();
    sqlx::query("SAVEPOINT before_error")
        .execute(&mut *tx)
        .await
        .unwrap();
    let refused = sqlx::query(
        "SELECT * FROM upload_pipeline.search_chunks('x', NULL, 5, \
         '{\"type\": \"or\", \"filters\": [{\"type\": \"like\"}]}', 'keyword')",
    )
    .execute(&mut *tx)
    .await
    .unwrap_err();
    let db_error = refused.as_database_error().expect("a database error");
    assert_eq!(db_error.code().as_deref(), Some("22023"));
    let message = db_error.message();
    assert!(
        message.starts_with("filter.filters[0].type: unknown filter type 'like'"),
        "{message}"
    );
    sqlx::query("ROLLBACK TO SAVEPOINT before_error")
        .execute(&mut *tx)
        .await
        .unwrap();
    let admin_only = sqlx::query("SELECT upload_pipeline.set_text_search_config('simple')")
        .execute(&mut *tx)
        .await
        .unwrap_err();
    let code = admin_only.as_database_error().and_then(|e| e.code());
    assert_eq!(code.as_deref(), Some("42501"), "{admin_only}");
    tx.rollback().await.unwrap();
}
