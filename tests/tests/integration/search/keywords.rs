//! Keyword search's own table, `chunk_keywords`: its `(user_id, tsv)` index serves the keyword list on the
//! planner's own choice among many tenants; the backfill fills the table in batches (search skips a chunk until
//! then) and recomputes it after a change of the text configuration without writing a chunk row; a change and its
//! reversal during a pass leave no chunk in the other configuration; a chunk written while a batch runs keeps its
//! newer words; and a migrating role without BYPASSRLS backfills without a lock that would stop readers.

use std::{collections::BTreeMap, time::Duration};

use sqlx::{Connection as _, PgPool, Postgres, Transaction};
use tests::{TestApp, pg_server, settings, unique_prefix, wait_for};
use upload_pipeline::{
    Settings,
    client::{SearchMode, SearchRequest},
    db::{self, BACKFILL_BATCH},
    settings::ConnectionUrl,
};
use uuid::Uuid;

use super::{Doc, seed};

/// Every chunk's id, xmin and ctid: the tuple version that holds it, which a rewrite of the row would change.
async fn chunk_versions(pool: &PgPool) -> Vec<(Uuid, String, String)> {
    sqlx::query_as(
        "SELECT id, xmin::text, ctid::text FROM upload_pipeline.document_chunks ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The rows of `chunk_keywords` counted by configuration.
async fn keyword_configs(pool: &PgPool) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT config::text, count(*) FROM upload_pipeline.chunk_keywords GROUP BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// Adds `count` chunks to `user`'s document `doc` (indices from 1), each `text` and its index.
async fn add_chunks(pool: &PgPool, doc: Uuid, user: Uuid, text: &str, count: i32) {
    sqlx::query(
        "INSERT INTO upload_pipeline.document_chunks (document_id, user_id, chunk_index, content, token_count, \
         content_sha256, metadata) \
         SELECT $1, $2, i, $3 || ' ' || i, 4, md5($3 || i), '{}' FROM generate_series(1, $4) i",
    )
    .bind(doc)
    .bind(user)
    .bind(text)
    .bind(count)
    .execute(pool)
    .await
    .unwrap();
}

/// As the migration that made `chunk_keywords` leaves a database with chunks: none has a row, and a pass is due.
async fn forget_keywords(pool: &PgPool) {
    sqlx::raw_sql(
        "DELETE FROM upload_pipeline.chunk_keywords; \
         UPDATE upload_pipeline.text_search SET indexed_generation = NULL, indexed_config = NULL",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// Whether the last complete pass is of the generation in force.
async fn pass_complete(pool: &PgPool) -> bool {
    sqlx::query_scalar(
        "SELECT indexed_generation IS NOT DISTINCT FROM generation AND indexed_config IS NOT DISTINCT FROM config \
         FROM upload_pipeline.text_search",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The id of the chunk at `offset` in id order: the backfill's batches walk that order.
async fn chunk_at(pool: &PgPool, offset: i64) -> Uuid {
    sqlx::query_scalar(
        "SELECT id FROM upload_pipeline.document_chunks ORDER BY id OFFSET $1 LIMIT 1",
    )
    .bind(offset)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Writes `chunk`'s keyword row in a transaction left open: a backfill batch that reaches that chunk waits for
/// the transaction to end.
async fn hold_keyword_row(pool: &PgPool, chunk: Uuid) -> Transaction<'static, Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO upload_pipeline.chunk_keywords (chunk_id, user_id, document_id, tsv, config) \
         SELECT id, user_id, document_id, to_tsvector('english', content), 'english' \
         FROM upload_pipeline.document_chunks WHERE id = $1",
    )
    .bind(chunk)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx
}

/// Waits until a backfill batch waits for a lock.
async fn wait_for_a_blocked_batch(pool: &PgPool) {
    wait_for(
        "a keyword backfill batch waiting for the held row",
        Duration::from_secs(30),
        || async {
            let waiting: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE '%backfill_chunk_keywords(%')",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            waiting.then_some(())
        },
    )
    .await;
}

/// Runs [`db::backfill_keywords`] on a task of its own.
fn spawn_backfill(pool: &PgPool) -> tokio::task::JoinHandle<Result<u64, db::DbError>> {
    let pool = pool.clone();
    tokio::spawn(async move { db::backfill_keywords(&pool).await })
}

/// The result of a backfill task, within a deadline.
async fn finished(backfill: tokio::task::JoinHandle<Result<u64, db::DbError>>) -> u64 {
    tokio::time::timeout(Duration::from_secs(60), backfill)
        .await
        .expect("the backfill finished within 60 s")
        .expect("the backfill task did not panic")
        .expect("the backfill succeeded")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keyword_list_is_read_from_the_callers_part_of_the_index_on_the_planners_own_choice() {
    let app = TestApp::spawn(settings(&unique_prefix("kw-plan"), &tests::redis_url())).await;
    let pool = app.admin();
    let alice = Uuid::new_v4();
    let mine = seed(
        &app,
        alice,
        Doc::ready(
            "alice.txt",
            &["Lighthouse lenses focus the lamp into a beam."],
        ),
    )
    .await;
    add_chunks(pool, mine, alice, "harbour log", 200).await;
    // Forty other users, 500 chunks each, all with the query's words: found by the words alone, the list would
    // read 20,000 rows for Alice's one.
    sqlx::raw_sql(
        "INSERT INTO upload_pipeline.documents (id, user_id, filename, content_type, size_bytes, sha256, status, \
         ready_at) \
         SELECT gen_random_uuid(), gen_random_uuid(), 'other.txt', 'text/plain', 1, md5(u::text), 'ready', now() \
         FROM generate_series(1, 40) u; \
         INSERT INTO upload_pipeline.document_chunks (document_id, user_id, chunk_index, content, token_count, \
         content_sha256, metadata) \
         SELECT d.id, d.user_id, i, 'lighthouse lenses in harbour log ' || i, 6, md5(d.id::text || i), '{}' \
         FROM upload_pipeline.documents d CROSS JOIN generate_series(1, 500) i WHERE d.filename = 'other.txt'",
    )
    .execute(pool)
    .await
    .unwrap();
    // Statistics, and the index's pending entries merged into it, as autovacuum leaves them; planner settings
    // stay the defaults.
    super::refresh_keyword_statistics(pool).await;
    // keyword_candidates runs as its owner, asking for the caller's rows itself: its own query, explained.
    let source: String = sqlx::query_scalar("SELECT upload_pipeline.keyword_candidates_sql()")
        .fetch_one(pool)
        .await
        .unwrap();
    let mut conn = sqlx::PgConnection::connect(app.settings.database_url.expose())
        .await
        .unwrap();
    sqlx::query(&format!(
        "PREPARE keyword_q(tsquery, uuid[], int) AS {source}"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("SELECT set_config('upload_pipeline.user_id', $1, true)")
        .bind(alice.to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
    for documents in ["NULL", &format!("'{{{mine}}}'")] {
        let plan: Vec<String> = sqlx::query_scalar(&format!(
            "EXPLAIN EXECUTE keyword_q(websearch_to_tsquery('english', 'lighthouse lenses'), {documents}, 40)"
        ))
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        let plan = plan.join("\n");
        assert!(
            plan.contains("Bitmap Index Scan on chunk_keywords_user_tsv"),
            "{plan}"
        );
        // The user and the words are one index condition: the scan meets the other users' rows nowhere.
        assert!(
            plan.lines()
                .any(|l| l.contains("Index Cond: ((user_id = ") && l.contains("AND (tsv @@ ")),
            "{plan}"
        );
    }
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM upload_pipeline.keyword_candidates(websearch_to_tsquery('english', 'lenses'), NULL, 10)",
    )
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert_eq!(
        ids.len(),
        1,
        "20,000 matching chunks are not Alice's: {ids:?}"
    );
    // Only among the documents a filter let through, as search_chunks passes them.
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM upload_pipeline.keyword_candidates(websearch_to_tsquery('english', 'lenses'), $1, 10)",
    )
    .bind(vec![Uuid::new_v4()])
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert!(ids.is_empty(), "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_without_keywords_are_backfilled_in_batches_and_skipped_until_then() {
    let app = TestApp::spawn(settings(&unique_prefix("kw-backfill"), &tests::redis_url())).await;
    let pool = app.admin();
    let user = Uuid::new_v4();
    let doc = seed(
        &app,
        user,
        Doc::ready("old.txt", &["The ferry leaves the quay at dawn."]),
    )
    .await;
    // More chunks than one batch holds, all about ferries.
    let extra = BACKFILL_BATCH + 500;
    add_chunks(pool, doc, user, "ferry timetable page", extra).await;
    forget_keywords(pool).await;
    let versions = chunk_versions(pool).await;
    let client = app.client(user);
    let keyword = SearchRequest::new("ferry").k(50).mode(SearchMode::Keyword);
    let found = client.search_with(&keyword).await.unwrap().results;
    assert!(found.is_empty(), "skipped until backfilled: {found:?}");
    let hybrid = client
        .search_with(&SearchRequest::new("ferry quay").k(5))
        .await
        .unwrap()
        .results;
    assert_eq!(
        (hybrid[0].vector_rank, hybrid[0].keyword_rank),
        (Some(1), None),
        "the vector list still answers: {hybrid:?}"
    );

    // One batch: the first BACKFILL_BATCH chunks in id order, and no more.
    let (last, written, generation): (Option<Uuid>, i32, i64) = sqlx::query_as(
        "SELECT b.last_id, b.recomputed, b.current_generation FROM upload_pipeline.text_search t, \
         upload_pipeline.backfill_chunk_keywords(NULL, $1, t.generation) b",
    )
    .bind(BACKFILL_BATCH)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(written, BACKFILL_BATCH);
    assert_eq!(last, Some(chunk_at(pool, BACKFILL_BATCH as i64 - 1).await));
    assert_eq!(
        keyword_configs(pool).await,
        BTreeMap::from([("english".to_owned(), BACKFILL_BATCH as i64)])
    );
    assert!(!pass_complete(pool).await);

    // The rest, by the pass (which walks the first batch again and finds nothing to write there).
    assert_eq!(
        db::backfill_keywords(pool).await.unwrap(),
        (extra + 1 - BACKFILL_BATCH) as u64
    );
    assert_eq!(
        keyword_configs(pool).await,
        BTreeMap::from([("english".to_owned(), extra as i64 + 1)])
    );
    let generation_now: i64 =
        sqlx::query_scalar("SELECT indexed_generation FROM upload_pipeline.text_search")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(generation_now, generation);
    assert!(pass_complete(pool).await);
    assert_eq!(
        chunk_versions(pool).await,
        versions,
        "no chunk row was rewritten"
    );
    assert_eq!(
        client.search_with(&keyword).await.unwrap().results.len(),
        50
    );
    assert_eq!(
        db::backfill_keywords(pool).await.unwrap(),
        0,
        "marked complete: nothing to walk"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_text_config_recomputes_the_keywords_without_writing_a_chunk_row() {
    let app = TestApp::spawn(settings(&unique_prefix("kw-config"), &tests::redis_url())).await;
    let pool = app.admin();
    let user = Uuid::new_v4();
    seed(
        &app,
        user,
        Doc::ready("dogs.txt", &["The running dogs chased geese."]),
    )
    .await;
    let client = app.client(user);
    let found = |q: &'static str| {
        let client = client.clone();
        async move {
            let request = SearchRequest::new(q).mode(SearchMode::Keyword);
            client.search_with(&request).await.unwrap().results.len()
        }
    };
    // english stems: "run" finds "running".
    assert_eq!(found("run").await, 1);
    assert!(!db::set_text_search_config(pool, "english").await.unwrap());
    let versions = chunk_versions(pool).await;
    // Storing another configuration recomputes nothing by itself; the backfill does, once.
    assert!(db::set_text_search_config(pool, "simple").await.unwrap());
    assert!(!pass_complete(pool).await);
    assert_eq!(db::backfill_keywords(pool).await.unwrap(), 1);
    assert_eq!(db::backfill_keywords(pool).await.unwrap(), 0);
    assert_eq!(
        keyword_configs(pool).await,
        BTreeMap::from([("simple".to_owned(), 1)])
    );
    assert_eq!(
        chunk_versions(pool).await,
        versions,
        "the chunk's row (and every index of the table) was left alone"
    );
    assert_eq!(found("run").await, 0, "simple does not stem");
    assert_eq!(found("running").await, 1);
    // New chunks are read with the configuration in force.
    seed(&app, user, Doc::ready("cats.txt", &["Sleeping cats."])).await;
    assert_eq!(found("sleeping").await, 1);
    assert_eq!(found("sleep").await, 0);
    let err = db::set_text_search_config(pool, "klingon")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("klingon"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_config_changed_and_changed_back_during_a_pass_leaves_every_chunk_in_the_config_in_force()
 {
    let app = TestApp::spawn(settings(&unique_prefix("kw-aba"), &tests::redis_url())).await;
    let pool = app.admin();
    let user = Uuid::new_v4();
    let doc = seed(&app, user, Doc::ready("log.txt", &["Harbour log."])).await;
    add_chunks(pool, doc, user, "harbour log page", BACKFILL_BATCH + 500).await;
    forget_keywords(pool).await;
    // The pass stops at the first chunk of its second batch, its first batch done in english.
    let held = hold_keyword_row(pool, chunk_at(pool, BACKFILL_BATCH as i64).await).await;
    let backfill = spawn_backfill(pool);
    wait_for_a_blocked_batch(pool).await;
    // Meanwhile: simple, a chunk written in it where the pass has been already, and english again.
    assert!(db::set_text_search_config(pool, "simple").await.unwrap());
    let early = Uuid::nil();
    sqlx::query(
        "INSERT INTO upload_pipeline.document_chunks (id, document_id, user_id, chunk_index, content, token_count, \
         content_sha256) VALUES ($1, $2, $3, 100000, 'The running dogs chased geese.', 5, 'dogs')",
    )
    .bind(early)
    .bind(doc)
    .bind(user)
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(
        keyword_configs(pool).await.get("simple"),
        Some(&1),
        "written in the configuration in force"
    );
    assert!(db::set_text_search_config(pool, "english").await.unwrap());
    held.rollback().await.unwrap();
    finished(backfill).await;

    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM upload_pipeline.document_chunks")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(
        keyword_configs(pool).await,
        BTreeMap::from([("english".to_owned(), chunks)])
    );
    assert!(pass_complete(pool).await);
    // english stems: "run" finds the chunk written in simple, now recomputed.
    let request = SearchRequest::new("run").mode(SearchMode::Keyword);
    let hits = app
        .client(user)
        .search_with(&request)
        .await
        .unwrap()
        .results;
    assert_eq!(hits.iter().map(|h| h.chunk_id).collect::<Vec<_>>(), [early]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_written_while_a_backfill_batch_runs_keeps_its_newer_words() {
    let app = TestApp::spawn(settings(&unique_prefix("kw-race"), &tests::redis_url())).await;
    let pool = app.admin();
    let user = Uuid::new_v4();
    let doc = seed(&app, user, Doc::ready("log.txt", &["Harbour log."])).await;
    add_chunks(pool, doc, user, "harbour log page", BACKFILL_BATCH + 500).await;
    forget_keywords(pool).await;
    // The second batch stops at its first chunk, having read the text of the rest of its chunks already.
    let held = hold_keyword_row(pool, chunk_at(pool, BACKFILL_BATCH as i64).await).await;
    let rewritten = chunk_at(pool, BACKFILL_BATCH as i64 + 10).await;
    let backfill = spawn_backfill(pool);
    wait_for_a_blocked_batch(pool).await;
    // Meanwhile the chunk stage rewrites a chunk of that batch, and adds one.
    sqlx::query(
        "UPDATE upload_pipeline.document_chunks SET content = 'An albatross glides over the swell.', \
         content_sha256 = 'albatross' WHERE id = $1",
    )
    .bind(rewritten)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO upload_pipeline.document_chunks (document_id, user_id, chunk_index, content, token_count, \
         content_sha256) VALUES ($1, $2, 100000, 'A cormorant dries its wings.', 5, 'cormorant')",
    )
    .bind(doc)
    .bind(user)
    .execute(pool)
    .await
    .unwrap();
    held.rollback().await.unwrap();
    finished(backfill).await;

    let (albatross, harbour): (bool, bool) = sqlx::query_as(
        "SELECT tsv @@ to_tsquery('english', 'albatross'), tsv @@ to_tsquery('english', 'harbour') \
         FROM upload_pipeline.chunk_keywords WHERE chunk_id = $1",
    )
    .bind(rewritten)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        (albatross, harbour),
        (true, false),
        "the batch's older reading of the chunk did not overwrite the row its write made"
    );
    let client = app.client(user);
    let found = |query: &'static str| {
        let client = client.clone();
        async move {
            let request = SearchRequest::new(query).mode(SearchMode::Keyword);
            client.search_with(&request).await.unwrap().results
        }
    };
    let hits = found("albatross").await;
    assert_eq!(
        hits.iter().map(|h| h.chunk_id).collect::<Vec<_>>(),
        [rewritten]
    );
    assert_eq!(
        found("cormorant").await.len(),
        1,
        "the chunk added meanwhile"
    );
    assert!(pass_complete(pool).await);
}

/// A database owned and migrated by a role of its own that neither is a superuser nor bypasses row-level
/// security (as on managed Postgres), with the superuser's pool beside it; both dropped with this value.
struct OwnedDatabase {
    name: String,
    role: String,
    /// The superuser's pool.
    admin: PgPool,
    /// The owner's pool, as `db::migrate` returned it.
    owner: PgPool,
}

impl OwnedDatabase {
    async fn create() -> Self {
        let suffix = format!("{:016x}", rand::random::<u64>());
        let (name, role) = (format!("up_test_{suffix}"), format!("up_owner_{suffix}"));
        let mut maintenance = sqlx::PgConnection::connect(&format!("{}/postgres", pg_server()))
            .await
            .unwrap();
        // pgvector is not a trusted extension: the superuser creates it. Loading it in every session defines its
        // settings, which the migrations set on functions (a role that is not a superuser may not set a setting
        // of a library not loaded).
        for statement in [
            format!("CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS"),
            format!("CREATE DATABASE {name} OWNER {role}"),
            format!("ALTER DATABASE {name} SET session_preload_libraries = 'vector'"),
        ] {
            sqlx::raw_sql(&statement)
                .execute(&mut maintenance)
                .await
                .unwrap();
        }
        let _ = maintenance.close().await;
        let admin = PgPool::connect(&format!("{}/{name}", pg_server()))
            .await
            .unwrap();
        sqlx::raw_sql("CREATE EXTENSION vector")
            .execute(&admin)
            .await
            .unwrap();
        let mut url = reqwest::Url::parse(&pg_server()).unwrap();
        url.set_username(&role).unwrap();
        url.set_password(None).unwrap();
        url.set_path(&name);
        let settings = Settings {
            database_url: ConnectionUrl(url.to_string()),
            ..Default::default()
        };
        let owner = db::migrate(&settings).await.expect("the owner migrates");
        Self {
            name,
            role,
            admin,
            owner,
        }
    }
}

impl Drop for OwnedDatabase {
    fn drop(&mut self) {
        let (name, role) = (
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.role),
        );
        tests::block_on_thread(move || async move {
            let Ok(mut conn) =
                sqlx::PgConnection::connect(&format!("{}/postgres", pg_server())).await
            else {
                return;
            };
            for statement in [
                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                format!("DROP ROLE IF EXISTS {role}"),
            ] {
                let _ = sqlx::raw_sql(&statement).execute(&mut conn).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrating_role_without_bypassrls_backfills_while_readers_hold_the_chunks() {
    let owned = OwnedDatabase::create().await;
    let policy: Vec<String> = sqlx::query_scalar(
        "SELECT polroles::regrole[]::text FROM pg_policy \
         WHERE polrelid = 'upload_pipeline.document_chunks'::regclass AND polname = 'keyword_backfill'",
    )
    .fetch_all(&owned.admin)
    .await
    .unwrap();
    assert_eq!(policy, [format!("{{{}}}", owned.role)]);
    assert!(
        db::keyword_search_uses_its_index(&owned.owner)
            .await
            .unwrap(),
        "the owner of chunk_keywords reads it whole without BYPASSRLS"
    );
    let (user, doc) = (Uuid::new_v4(), Uuid::new_v4());
    sqlx::query(
        "INSERT INTO upload_pipeline.documents (id, user_id, filename, content_type, size_bytes, sha256, status) \
         VALUES ($1, $2, 'log.txt', 'text/plain', 1, 'log', 'ready')",
    )
    .bind(doc)
    .bind(user)
    .execute(&owned.admin)
    .await
    .unwrap();
    add_chunks(
        &owned.admin,
        doc,
        user,
        "harbour log page",
        BACKFILL_BATCH + 500,
    )
    .await;
    forget_keywords(&owned.admin).await;
    // A reader in the middle of a long transaction over the chunks: a batch that asked for the table's ACCESS
    // EXCLUSIVE lock (to lift row-level security) would wait for it, and every later reader behind that.
    let mut reader = owned.admin.begin().await.unwrap();
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM upload_pipeline.document_chunks")
        .fetch_one(&mut *reader)
        .await
        .unwrap();
    assert_eq!(finished(spawn_backfill(&owned.owner)).await, chunks as u64);
    reader.commit().await.unwrap();
    assert_eq!(
        keyword_configs(&owned.admin).await,
        BTreeMap::from([("english".to_owned(), chunks)])
    );
    assert!(pass_complete(&owned.admin).await);
    owned.owner.close().await;
    owned.admin.close().await;
}
