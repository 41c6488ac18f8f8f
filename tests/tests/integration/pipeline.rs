//! The document pipeline end to end against the real Postgres and Redis: uploads through the HTTP API, worker
//! processes running the stages, searches through the API and in SQL.

use std::{path::PathBuf, time::Duration};

use tests::TestApp;
use tests::fake::{FakeConfig, FakeProviders, Latency, OpenAiConfig};
use tests::{RedisServer, TestDb, WorkerProcess, settings, unique_prefix, wait_for, wait_ready};
use upload_pipeline::client::ClientError;
use uuid::Uuid;

fn corpus(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/corpus")
        .join(name)
}

fn api_error(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Api { status, code, .. } => (
            status,
            serde_json::to_value(code)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned(),
        ),
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_file_type_becomes_searchable_and_its_passage_is_the_best_hit() {
    let s = settings(&unique_prefix("types"), &tests::redis_url());
    let app = TestApp::spawn(s).await;
    let _worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let user = Uuid::new_v4();
    let client = app.client(user);

    let files = [
        "tides.txt",
        "sourdough.md",
        "volcanoes.html",
        "honeybees.pdf",
        "lighthouses.docx",
    ];
    let mut ids = Vec::new();
    for f in files {
        let up = client.upload_file(&corpus(f), None).await.unwrap();
        assert_eq!(up.status, "queued");
        assert!(!up.duplicate);
        ids.push(up.document_id);
    }
    let docs = wait_ready(&client, &ids, Duration::from_secs(60)).await;
    for doc in &docs {
        assert_eq!(
            doc.chunks_total.map(i64::from),
            Some(doc.chunks_embedded),
            "{doc:?}"
        );
        let stages: Vec<(&str, &str)> = doc
            .stages
            .iter()
            .map(|st| (st.stage.as_str(), st.state.as_str()))
            .collect();
        assert_eq!(
            stages,
            [("parse", "done"), ("chunk", "done"), ("embed", "done")]
        );
        assert!(doc.ready_at.is_some());
    }

    // (query, file of the best hit, text the hit must contain, page if the format has pages)
    let cases = [
        (
            "spring tides and neap tides with the moon",
            "tides.txt",
            "neap tides",
            None,
        ),
        (
            "feeding a sourdough starter flour and water",
            "sourdough.md",
            "starter",
            None,
        ),
        (
            "pyroclastic flow from Vesuvius buried Pompeii",
            "volcanoes.html",
            "Pompeii",
            None,
        ),
        (
            "forager waggle dance direction of flowers",
            "honeybees.pdf",
            "waggle",
            Some(1),
        ),
        (
            "bees shiver flight muscles to keep the cluster warm in winter",
            "honeybees.pdf",
            "shiver",
            Some(2),
        ),
        (
            "Fresnel lens glass prisms beam",
            "lighthouses.docx",
            "Fresnel",
            Some(1),
        ),
        (
            "lighthouse keepers trimmed the wicks",
            "lighthouses.docx",
            "keepers",
            Some(2),
        ),
    ];
    for (query, file, text, page) in cases {
        let found = client.search(query, 3).await.unwrap();
        let best = &found.results[0];
        assert_eq!(best.filename, file, "best hit for {query:?}: {found:?}");
        assert!(best.content.contains(text), "{query:?}: {}", best.content);
        assert_eq!(
            best.metadata.get("page").and_then(|p| p.as_u64()),
            page.map(|p: u64| p),
            "{query:?}: {:?}",
            best.metadata
        );
        assert!(found.results.windows(2).all(|w| w[0].score >= w[1].score));
    }
    let headings =
        client.search("Fresnel lens", 1).await.unwrap().results[0].metadata["headings"].clone();
    assert_eq!(
        headings,
        serde_json::json!(["Lighthouses", "The Fresnel lens"])
    );
    let script = client
        .search("tracking script should not be indexed", 5)
        .await
        .unwrap();
    assert!(
        script
            .results
            .iter()
            .all(|h| !h.content.contains("tracking script")),
        "HTML scripts are not indexed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_idempotent_retries_and_deletes_behave() {
    let s = settings(&unique_prefix("dedupe"), &tests::redis_url());
    let app = TestApp::spawn(s).await;
    let _worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let user = Uuid::new_v4();
    let client = app.client(user);

    let first = client
        .upload_file(&corpus("tides.txt"), None)
        .await
        .unwrap();
    let again = client
        .upload_file(&corpus("tides.txt"), None)
        .await
        .unwrap();
    assert_eq!(again.document_id, first.document_id);
    assert!(again.duplicate);

    // An Idempotency-Key makes a retried upload return what the first one did.
    let http = reqwest::Client::new();
    let token = app.token(user);
    let post = |bytes: &'static [u8], key: &'static str| {
        let form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(bytes).file_name("note.txt"),
        );
        http.post(format!("{}/v1/documents", app.api.url))
            .bearer_auth(&token)
            .header("Idempotency-Key", key)
            .multipart(form)
            .send()
    };
    let r1 = post(b"a note about ferns and mosses", "upload-1")
        .await
        .unwrap();
    assert_eq!(r1.status(), 202);
    let id1 = r1.json::<serde_json::Value>().await.unwrap()["document_id"].clone();
    let r2 = post(b"a note about ferns and mosses", "upload-1")
        .await
        .unwrap();
    assert_eq!(r2.status(), 202);
    assert_eq!(
        r2.json::<serde_json::Value>().await.unwrap()["document_id"],
        id1
    );
    let r3 = post(b"different bytes under the same key", "upload-1")
        .await
        .unwrap();
    assert_eq!(r3.status(), 409);
    assert_eq!(
        r3.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "idempotency_conflict"
    );

    wait_ready(&client, &[first.document_id], Duration::from_secs(60)).await;
    let chunks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM upload_pipeline.document_chunks WHERE document_id = $1",
    )
    .bind(first.document_id)
    .fetch_one(app.admin())
    .await
    .unwrap();
    assert!(chunks > 0);
    let del = http
        .delete(format!(
            "{}/v1/documents/{}",
            app.api.url, first.document_id
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 204);
    for table in [
        "documents",
        "document_bytes",
        "document_parsed",
        "upload_jobs",
        "document_chunks",
    ] {
        let col = if table == "documents" {
            "id"
        } else {
            "document_id"
        };
        let left: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM upload_pipeline.{table} WHERE {col} = $1"
        ))
        .bind(first.document_id)
        .fetch_one(app.admin())
        .await
        .unwrap();
        assert_eq!(left, 0, "{table} still holds rows of the deleted document");
    }
    assert_eq!(
        api_error(client.status(first.document_id).await.unwrap_err()),
        (404, "not_found".into())
    );
    let del = http
        .delete(format!(
            "{}/v1/documents/{}",
            app.api.url, first.document_id
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_during_embedding_leaves_a_ready_document_with_exact_chunks() {
    let fake = FakeProviders::start(FakeConfig {
        openai: OpenAiConfig {
            latency: Latency::fixed(400.0),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let mut s = settings(&unique_prefix("kill-embed"), &tests::redis_url());
    fake.embed_with(&mut s);
    s.embedding.batch_size = 2;
    s.chunking.max_tokens = 48;
    s.chunking.overlap_tokens = 8;
    s.worker.concurrency.embed = 1;
    let app = TestApp::spawn(s).await;
    let user = Uuid::new_v4();
    let client = app.client(user);
    let text: String = (0..40)
        .map(|i| {
            format!("Paragraph {i} talks about topic number {i} in some detail with words.\n\n")
        })
        .collect();
    let up = client
        .upload_bytes("long.txt", text.into_bytes(), None)
        .await
        .unwrap();

    let mut victim = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    wait_for(
        "some but not all chunks embedded",
        Duration::from_secs(60),
        || async {
            let doc = client.status(up.document_id).await.ok()?;
            (doc.chunks_embedded > 0).then_some(())
        },
    )
    .await;
    victim.signal("KILL");
    victim.wait_exit(Duration::from_secs(5)).await;
    let doc = client.status(up.document_id).await.unwrap();
    assert!(
        doc.chunks_embedded < doc.chunks_total.unwrap() as i64,
        "the kill came mid-way: {doc:?}"
    );

    let _replica = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let doc = wait_ready(&client, &[up.document_id], Duration::from_secs(60))
        .await
        .remove(0);
    let total = doc.chunks_total.unwrap() as i64;
    assert!(total >= 10, "{total}");
    let (rows, distinct, embedded): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT chunk_index), count(embedding) FROM upload_pipeline.document_chunks WHERE document_id = $1",
    )
    .bind(up.document_id)
    .fetch_one(app.admin())
    .await
    .unwrap();
    assert_eq!(
        (rows, distinct, embedded),
        (total, total, total),
        "exactly the expected chunks, no duplicates, all embedded"
    );
    assert!(fake.stats().await.embedding_requests as i64 >= total / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_between_commit_and_push_delays_a_document_but_never_loses_it() {
    let mut redis = RedisServer::start().await;
    let mut s = settings(&unique_prefix("redis-down"), &redis.url());
    s.pipeline.reconcile_after = Duration::from_secs(1);
    s.pipeline.reconcile_interval = Duration::from_millis(300);
    let app = TestApp::spawn(s).await;
    let mut worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    // A worker exits when Redis is unreachable at start-up (its supervisor restarts it): let it connect first.
    worker.wait_healthy().await;
    let user = Uuid::new_v4();
    let client = app.client(user);

    redis.stop();
    let up = client
        .upload_file(&corpus("volcanoes.html"), None)
        .await
        .expect("the upload is durable without Redis");
    assert_eq!(up.status, "queued");
    redis.restart().await;
    wait_ready(&client, &[up.document_id], Duration::from_secs(60)).await;
    assert_eq!(
        client
            .search("Pompeii pyroclastic flow", 1)
            .await
            .unwrap()
            .results[0]
            .document_id,
        up.document_id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_can_neither_see_nor_search_each_others_documents() {
    let s = settings(&unique_prefix("isolation"), &tests::redis_url());
    let app = TestApp::spawn(s).await;
    let _worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let (a, b) = (app.client(alice), app.client(bob));
    let tides = a
        .upload_file(&corpus("tides.txt"), None)
        .await
        .unwrap()
        .document_id;
    let bread = b
        .upload_file(&corpus("sourdough.md"), None)
        .await
        .unwrap()
        .document_id;
    // The same bytes from another user are a new document, not a duplicate.
    let bobs_tides = b.upload_file(&corpus("tides.txt"), None).await.unwrap();
    assert!(!bobs_tides.duplicate);
    wait_ready(&a, &[tides], Duration::from_secs(60)).await;
    wait_ready(
        &b,
        &[bread, bobs_tides.document_id],
        Duration::from_secs(60),
    )
    .await;

    assert_eq!(
        api_error(b.status(tides).await.unwrap_err()).0,
        404,
        "another user's document is not found, not forbidden"
    );
    let http = reqwest::Client::new();
    let del = http
        .delete(format!("{}/v1/documents/{tides}", app.api.url))
        .bearer_auth(app.token(bob))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 404);
    assert_eq!(
        a.status(tides).await.unwrap().status,
        "ready",
        "Bob's delete did not touch Alice's document"
    );
    let list: serde_json::Value = http
        .get(format!("{}/v1/documents", app.api.url))
        .bearer_auth(app.token(bob))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed: Vec<&str> = list["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(!listed.contains(&tides.to_string().as_str()));
    let hits = b.search("spring tides moon", 10).await.unwrap().results;
    assert!(
        hits.iter().all(|h| h.document_id != tides),
        "Bob's search never returns Alice's chunks"
    );

    // Direct SQL as the application role, the way an agent would query: only the caller's rows exist.
    let mut tx = upload_pipeline::db::begin_as(app.admin(), bob)
        .await
        .unwrap();
    let docs: i64 = sqlx::query_scalar("SELECT count(*) FROM upload_pipeline.documents")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(docs, 2);
    let q = upload_pipeline::providers::hashing::HashingEmbedder::new("hashing-v1", 384)
        .vector("spring tides moon");
    let literal = format!(
        "[{}]",
        q.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let owners: Vec<Uuid> =
        sqlx::query_scalar("SELECT document_id FROM upload_pipeline.match_chunks($1::vector, 20)")
            .bind(&literal)
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    assert!(
        !owners.is_empty() && owners.iter().all(|d| *d != tides),
        "{owners:?}"
    );
    let changed =
        sqlx::query("UPDATE upload_pipeline.documents SET filename = 'stolen' WHERE id = $1")
            .bind(tides)
            .execute(&mut *tx)
            .await
            .unwrap();
    assert_eq!(
        changed.rows_affected(),
        0,
        "row-level security hides Alice's row from Bob's update"
    );
    tx.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_documented_error_and_disturbs_no_other_document() {
    let mut s = settings(&unique_prefix("bad-input"), &tests::redis_url());
    s.api.max_upload_bytes = 64 * 1024;
    let app = TestApp::spawn(s).await;
    let _worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let user = Uuid::new_v4();
    let client = app.client(user);
    let good = client
        .upload_file(&corpus("tides.txt"), None)
        .await
        .unwrap()
        .document_id;

    let refused = |name: &'static str, bytes: Vec<u8>| {
        let client = client.clone();
        async move { api_error(client.upload_bytes(name, bytes, None).await.unwrap_err()) }
    };
    assert_eq!(
        refused("empty.txt", vec![]).await,
        (400, "empty_file".into())
    );
    assert_eq!(
        refused("big.txt", vec![b'a'; 100 * 1024]).await,
        (413, "file_too_large".into())
    );
    assert_eq!(
        refused("photo.png", b"\x89PNG\r\n\x1a\n".to_vec()).await,
        (415, "unsupported_media_type".into())
    );
    assert_eq!(
        refused("binary.txt", vec![0, 159, 146, 150, 0, 1]).await,
        (422, "invalid_text".into())
    );
    assert_eq!(
        refused("latin1.md", b"caf\xe9 au lait".to_vec()).await,
        (422, "invalid_text".into())
    );
    assert_eq!(
        refused("fake.pdf", b"GIF89a".to_vec()).await,
        (422, "invalid_document".into())
    );

    // A PDF that looks right but is corrupt is accepted, then fails with a reason and no retry loop.
    let corrupt = client
        .upload_bytes(
            "broken.pdf",
            b"%PDF-1.7\n1 0 obj << /Type /Catalog".to_vec(),
            None,
        )
        .await
        .unwrap();
    let failed = wait_for(
        "the corrupt PDF to fail",
        Duration::from_secs(30),
        || async {
            let d = client.status(corrupt.document_id).await.ok()?;
            (d.status == "failed").then_some(d)
        },
    )
    .await;
    assert!(
        failed.error.as_deref().unwrap_or_default().contains("PDF"),
        "{:?}",
        failed.error
    );
    assert_eq!(failed.stages[0].state, "dead");
    assert_eq!(
        failed.stages[0].attempts, 1,
        "a corrupt file is not retried"
    );

    // Regression: PostgreSQL jsonb cannot hold \u0000, and such metadata used to end in a 500.
    let nul = client
        .upload_bytes(
            "meta.txt",
            b"some words".to_vec(),
            Some(&serde_json::json!({"k": "a\u{0}b"})),
        )
        .await;
    assert_eq!(
        api_error(nul.unwrap_err()),
        (400, "invalid_metadata".into())
    );
    assert_eq!(
        refused("blob", vec![0xff, 0xfe, 0x00]).await,
        (415, "unsupported_media_type".into())
    );

    let http = reqwest::Client::new();
    let search = |token: Option<String>, body: &'static str, ctype: &'static str| {
        let mut req = http
            .post(format!("{}/v1/search", app.api.url))
            .header("content-type", ctype)
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await.unwrap();
            (
                status,
                body["error"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        }
    };
    let token = app.token(user);
    let json = "application/json";
    assert_eq!(
        search(None, r#"{"query": "tides"}"#, json).await,
        (401, "unauthorized".into())
    );
    assert_eq!(
        search(Some("not-a-jwt".into()), r#"{"query": "tides"}"#, json).await,
        (401, "unauthorized".into())
    );
    let forged = upload_pipeline::auth::Auth::hs256("someone-elses-secret-key").issue(
        user,
        Duration::from_secs(60),
        false,
    );
    assert_eq!(
        search(Some(forged), r#"{"query": "tides"}"#, json).await,
        (401, "unauthorized".into())
    );
    let expired = jsonwebtoken_expired(&app.settings, user);
    assert_eq!(
        search(Some(expired), r#"{"query": "tides"}"#, json).await,
        (401, "unauthorized".into())
    );
    assert_eq!(
        search(Some(token.clone()), r#"{"query": "tides""#, json).await,
        (400, "invalid_json".into())
    );
    assert_eq!(
        search(Some(token.clone()), r#"{"query": "tides", "k": 0}"#, json).await,
        (422, "invalid_k".into())
    );
    assert_eq!(
        search(Some(token.clone()), r#"{"query": "tides", "k": 51}"#, json).await,
        (422, "invalid_k".into())
    );
    assert_eq!(
        search(Some(token.clone()), r#"{"query": "   "}"#, json).await,
        (422, "invalid_query".into())
    );
    assert_eq!(
        search(Some(token.clone()), r#"{"query": "tides"}"#, "text/plain").await,
        (415, "unsupported_media_type".into())
    );
    let no_file = http
        .post(format!("{}/v1/documents", app.api.url))
        .bearer_auth(&token)
        .multipart(reqwest::multipart::Form::new().text("metadata", "{}"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_file.status(), 400);

    wait_ready(&client, &[good], Duration::from_secs(60)).await;
    let list: serde_json::Value = http
        .get(format!("{}/v1/documents", app.api.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        list["documents"].as_array().unwrap().len(),
        2,
        "only the good file and the corrupt PDF were accepted"
    );
}

fn jsonwebtoken_expired(s: &upload_pipeline::Settings, user: Uuid) -> String {
    // A token that expired an hour ago, signed with the right secret.
    use std::time::{SystemTime, UNIX_EPOCH};
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = upload_pipeline::auth::Claims {
        sub: user.to_string(),
        exp: now - 3600,
        iat: now - 7200,
        nbf: None,
        admin: false,
    };
    upload_pipeline::auth::Auth::hs256(s.api.jwt_secret.expose()).sign(&claims)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_runs_on_the_models_hnsw_index() {
    let mut s = settings(&unique_prefix("explain"), &tests::redis_url());
    let db = TestDb::create(&mut s).await;
    let index: String = sqlx::query_scalar(
        "SELECT index_name FROM upload_pipeline.embedding_models WHERE model = $1",
    )
    .bind(&s.embedding.model)
    .fetch_one(&db.admin)
    .await
    .unwrap();
    let mut conn = db.admin.acquire().await.unwrap();
    // The table is empty, so the planner would rightly prefer a scan; disabling scans shows the index serves
    // the exact query match_chunks runs, with sorts off as match_chunks runs the graph's shape (that of a caller
    // above `upload_pipeline.exact_search_chunks()` chunks).
    for statement in ["SET enable_seqscan = off", "SET enable_sort = off"] {
        sqlx::query(statement).execute(&mut *conn).await.unwrap();
    }
    let sql: String =
        sqlx::query_scalar("SELECT upload_pipeline.match_chunks_sql($1, $2, false, false)")
            .bind(&s.embedding.model)
            .bind(s.embedding.dimensions as i32)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    sqlx::query(&format!("PREPARE match_q(vector, jsonb, int) AS {sql}"))
        .execute(&mut *conn)
        .await
        .unwrap();
    let zero = format!(
        "[{}]",
        vec!["0.1"; s.embedding.dimensions as usize].join(",")
    );
    let plan: Vec<(String,)> =
        sqlx::query_as(&format!("EXPLAIN EXECUTE match_q('{zero}', '{{}}', 5)"))
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    let plan = plan
        .into_iter()
        .map(|(l,)| l)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        plan.contains(&format!("Index Scan using {index}")),
        "{plan}"
    );
    drop(conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_with_a_cursor_and_the_service_endpoints_answer() {
    let s = settings(&unique_prefix("listing"), &tests::redis_url());
    let app = TestApp::spawn(s).await;
    let user = Uuid::new_v4();
    let client = app.client(user);
    for i in 0..5 {
        client
            .upload_bytes(
                &format!("note-{i}.txt"),
                format!("note number {i}").into_bytes(),
                None,
            )
            .await
            .unwrap();
    }
    let http = reqwest::Client::new();
    let token = app.token(user);
    let page = |query: String| {
        let req = http
            .get(format!("{}/v1/documents{query}", app.api.url))
            .bearer_auth(&token);
        async move {
            req.send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let first = page("?limit=2".into()).await;
    let names = |p: &serde_json::Value| {
        p["documents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["filename"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&first), ["note-4.txt", "note-3.txt"], "newest first");
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let second = page(format!("?limit=2&cursor={cursor}")).await;
    assert_eq!(names(&second), ["note-2.txt", "note-1.txt"]);
    let third = page(format!(
        "?limit=2&cursor={}",
        second["next_cursor"].as_str().unwrap()
    ))
    .await;
    assert_eq!(names(&third), ["note-0.txt"]);
    assert!(third["next_cursor"].is_null());
    assert_eq!(
        page("?status=queued&limit=100".into()).await["documents"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    for query in ["limit=0", "status=lost", "cursor=nonsense"] {
        let bad = http
            .get(format!("{}/v1/documents?{query}", app.api.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), 400, "{query}");
    }

    assert_eq!(
        http.get(format!("{}/healthz", app.api.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let ready: serde_json::Value = http
        .get(format!("{}/readyz", app.api.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        ready,
        serde_json::json!({"status": "ready", "postgres": "ok", "redis": "ok"})
    );
    let served: serde_json::Value = http
        .get(format!("{}/openapi.json", app.api.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let committed: serde_json::Value =
        serde_json::from_str(include_str!("../../../docs/openapi.json"))
            .expect("docs/openapi.json parses");
    assert_eq!(
        served, committed,
        "the served OpenAPI document differs from docs/openapi.json: run `make openapi`"
    );
    let missing = http
        .get(format!("{}/v1/nothing", app.api.url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "not_found"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_typed_client_streams_waits_lists_deletes_and_reports_typed_errors() {
    use upload_pipeline::client::{DocumentStatus, ErrorCode, ListQuery};
    let s = settings(&unique_prefix("client"), &tests::redis_url());
    let app = TestApp::spawn(s).await;
    let _worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let client = app.client(Uuid::new_v4());

    let chunks = [
        "Glaciers carve valleys ",
        "as they flow downhill, ",
        "grinding rock into fine flour.",
    ];
    let stream =
        futures::stream::iter(chunks.map(|c| Ok::<_, std::io::Error>(bytes::Bytes::from(c))));
    let up = client
        .upload_stream(
            "glaciers.txt",
            stream,
            Some(&serde_json::json!({"source": "stream"})),
        )
        .await
        .unwrap();
    let doc = client
        .wait_until_ready(up.document_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(doc.size_bytes, chunks.concat().len() as i64);
    assert_eq!(doc.metadata, serde_json::json!({"source": "stream"}));
    let page = client
        .list(&ListQuery {
            status: Some(DocumentStatus::Ready),
            limit: Some(10),
            cursor: None,
        })
        .await
        .unwrap();
    assert_eq!(
        page.documents.iter().map(|d| d.id).collect::<Vec<_>>(),
        [up.document_id]
    );
    assert!(
        client
            .search("glaciers carve valleys", 1)
            .await
            .unwrap()
            .results[0]
            .content
            .contains("Glaciers")
    );
    client.delete(up.document_id).await.unwrap();
    let gone = client.status(up.document_id).await.unwrap_err();
    assert_eq!(gone.code(), Some(ErrorCode::NotFound));
    let bad = client
        .upload_bytes("photo.png", b"\x89PNG".to_vec(), None)
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Some(ErrorCode::UnsupportedMediaType));
    let corrupt = client
        .upload_bytes("broken.pdf", b"%PDF-1.4 garbage".to_vec(), None)
        .await
        .unwrap();
    let failed = client
        .wait_until_ready(corrupt.document_id, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        matches!(
            failed,
            upload_pipeline::client::ClientError::DocumentFailed { .. }
        ),
        "{failed}"
    );
}

#[tokio::test]
async fn the_typed_client_retries_429_and_503_honouring_retry_after() {
    use axum::{Router, http::StatusCode, routing::get};
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let app = Router::new().route(
        "/v1/documents",
        get(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                let busy = |code: StatusCode| {
                    let body = r#"{"error":{"code":"unavailable","message":"slow down"}}"#;
                    (
                        code,
                        [("retry-after", "1"), ("content-type", "application/json")],
                        body.to_owned(),
                    )
                };
                match n {
                    0 => busy(StatusCode::TOO_MANY_REQUESTS),
                    1 => busy(StatusCode::SERVICE_UNAVAILABLE),
                    _ => (
                        StatusCode::OK,
                        [("retry-after", "0"), ("content-type", "application/json")],
                        r#"{"documents":[],"next_cursor":null}"#.to_owned(),
                    ),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let client = upload_pipeline::client::Client::new(&url, "token").unwrap();
    let started = std::time::Instant::now();
    let page = client.list(&Default::default()).await.unwrap();
    assert!(page.documents.is_empty());
    assert_eq!(calls.load(Ordering::SeqCst), 3, "429 and 503 were retried");
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "Retry-After (1 s) was honoured twice: {:?}",
        started.elapsed()
    );

    calls.store(0, Ordering::SeqCst);
    let err = client
        .with_retries(0)
        .list(&Default::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(upload_pipeline::client::ErrorCode::Unavailable)
    );
    assert!(matches!(
        err,
        upload_pipeline::client::ClientError::Api { status: 429, .. }
    ));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_pushes_lost_stages_again_but_fails_ones_that_keep_crashing_workers() {
    use upload_pipeline::{
        documents::{self, NewUpload, UploadOutcome},
        jobs::Pipeline,
        parsing::DocKind,
        providers,
    };
    let mut s = settings(&unique_prefix("reconcile"), &tests::redis_url());
    let _keys = tests::RedisKeys::of(&s);
    s.pipeline.reconcile_after = Duration::from_secs(1);
    let db = TestDb::create(&mut s).await;
    let broker = tests::broker(&s).await;
    let embedder = providers::embedder(&s, None).unwrap();
    let parser = providers::parser(&s, None).unwrap();
    let settings_arc = std::sync::Arc::new(s.clone());
    let pipeline =
        Pipeline::new(db.admin.clone(), &broker, embedder, parser, settings_arc).unwrap();
    let user = Uuid::new_v4();
    let mut ids = Vec::new();
    for text in ["a lost job", "a job that crashes every worker"] {
        let up = NewUpload {
            user_id: user,
            filename: "x.txt".into(),
            kind: DocKind::Text,
            bytes: text.as_bytes().to_vec(),
            metadata: serde_json::json!({}),
            idempotency_key: None,
        };
        let UploadOutcome::Created(id) = documents::create(&db.admin, &up).await.unwrap() else {
            panic!("created")
        };
        ids.push(id);
    }
    // One stage was running once when its job was lost; the other used every attempt (3) and never finished.
    for (id, attempts) in [(ids[0], 1), (ids[1], s.queue.max_deliveries as i32)] {
        sqlx::query(
            "UPDATE upload_pipeline.upload_jobs SET state = 'running', attempts = $2, updated_at = now() - interval '1 hour' \
             WHERE document_id = $1",
        )
        .bind(id)
        .bind(attempts)
        .execute(&db.admin)
        .await
        .unwrap();
    }
    let pushed = upload_pipeline::reconciler::reconcile_once(&pipeline)
        .await
        .unwrap();
    assert_eq!(pushed, 1);
    assert_eq!(
        pipeline.parse.stats().await.unwrap().pending,
        1,
        "the lost stage was pushed again"
    );
    let status = |id: Uuid| {
        let pool = db.admin.clone();
        async move {
            sqlx::query_as::<_, (String, Option<String>)>(
                "SELECT status, error FROM upload_pipeline.documents WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(status(ids[0]).await.0, "queued");
    let (st, error) = status(ids[1]).await;
    assert_eq!(st, "failed");
    assert!(error.unwrap().contains("stopped its worker 3 times"));
    assert_eq!(
        upload_pipeline::reconciler::reconcile_once(&pipeline)
            .await
            .unwrap(),
        0,
        "nothing is due again yet"
    );
}
