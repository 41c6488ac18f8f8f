//! Recovering failed documents, against the real Postgres and Redis with worker processes: a retry re-runs a
//! document from the stage that gave up and keeps what the stages before it produced; only its owner can retry
//! it; uploading the same bytes again re-queues it; operators list failures by stage and reason and retry them in
//! bulk with `producer retry`.
//!
//! The embed stage fails for good on the fake OpenAI serving no model (404 `model_not_found`, a permanent error),
//! and succeeds once the fake serves it again; the parse stage fails for good on a corrupt PDF.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use chrono::{DateTime, Utc};
use tests::TestApp;
use tests::fake::{FakeConfig, FakeProviders, OpenAiConfig};
use tests::{TestDb, WorkerProcess, settings, unique_prefix, wait_for, wait_ready};
use upload_pipeline::{
    Settings,
    auth::Auth,
    client::{Client, ClientError, Document, ErrorCode},
};
use uuid::Uuid;

const CORRUPT_PDF: &[u8] = b"%PDF-1.7\n1 0 obj << /Type /Catalog";

/// The fake OpenAI serving no model: every embedding request is refused for good until [`serve_the_model`].
async fn refusing_embedder() -> FakeProviders {
    FakeProviders::start(FakeConfig {
        openai: OpenAiConfig {
            models: HashMap::new(),
            ..Default::default()
        },
        ..Default::default()
    })
    .await
}

/// The fake serves its default models again: the embed stage succeeds from now on.
async fn serve_the_model(fake: &FakeProviders) {
    fake.configure(&FakeConfig::default()).await;
}

/// Settings of a test whose embed stage calls `fake`.
fn embedding_settings(test: &str, fake: &FakeProviders) -> Settings {
    let mut s = settings(&unique_prefix(test), &tests::redis_url());
    fake.embed_with(&mut s);
    s
}

fn api_error(e: ClientError) -> (u16, ErrorCode) {
    match e {
        ClientError::Api { status, code, .. } => (status, code),
        other => panic!("expected an API error, got {other}"),
    }
}

async fn wait_failed(client: &Client, id: Uuid) -> Document {
    wait_for("the document to fail", Duration::from_secs(60), || async {
        let doc = client.status(id).await.ok()?;
        (doc.status == "failed").then_some(doc)
    })
    .await
}

/// Waits until no job of `stage` is waiting, in flight or delayed: the job that failed is settled. (A retry sent
/// before that is not lost: its push marks the live copy to run once more; the first test retries without waiting.)
async fn wait_settled(s: &Settings, stage: &str) {
    let broker = tests::broker(s).await;
    let queue = broker.handle(stage).expect("stage queue");
    tests::wait_for_stats(
        &queue,
        "the stage's queue to settle",
        Duration::from_secs(30),
        |st| st.pending + st.in_flight + st.delayed == 0,
    )
    .await;
}

/// A stage's row as Postgres holds it: state, attempts, when it finished.
async fn stage_row(db: &TestDb, id: Uuid, stage: &str) -> (String, i32, Option<DateTime<Utc>>) {
    sqlx::query_as(
        "SELECT state, attempts, finished_at FROM upload_pipeline.upload_jobs WHERE document_id = $1 AND stage = $2",
    )
    .bind(id)
    .bind(stage)
    .fetch_one(&db.admin)
    .await
    .unwrap()
}

/// When the parse stage wrote the document's sections.
async fn parsed_at(db: &TestDb, id: Uuid) -> DateTime<Utc> {
    sqlx::query_scalar(
        "SELECT created_at FROM upload_pipeline.document_parsed WHERE document_id = $1",
    )
    .bind(id)
    .fetch_one(&db.admin)
    .await
    .unwrap()
}

/// The ids of the document's chunk rows, in order.
async fn chunk_ids(db: &TestDb, id: Uuid) -> Vec<Uuid> {
    sqlx::query_scalar(
        "SELECT id FROM upload_pipeline.document_chunks WHERE document_id = $1 ORDER BY chunk_index",
    )
    .bind(id)
    .fetch_all(&db.admin)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_failed_at_embedding_re_runs_only_its_embed_stage_and_ends_ready() {
    let fake = refusing_embedder().await;
    let s = embedding_settings("retry-embed", &fake);
    let app = TestApp::spawn(s).await;
    let _worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let client = app.client(Uuid::new_v4());

    let up = client
        .upload_bytes(
            "moss.txt",
            b"Mosses grow in damp shade and hold water like sponges.".to_vec(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(up.status, "queued", "the answer is the state at acceptance");
    let id = up.document_id;
    let failed = wait_failed(&client, id).await;
    let error = failed.error.clone().unwrap_or_default();
    assert!(
        error.starts_with("embed: ") && error.contains("does not exist"),
        "{error}"
    );
    let states: Vec<(&str, &str)> = failed
        .stages
        .iter()
        .map(|st| (st.stage.as_str(), st.state.as_str()))
        .collect();
    assert_eq!(
        states,
        [("parse", "done"), ("chunk", "done"), ("embed", "dead")]
    );
    // Retried at once, while the failed job may still be settling in the queue.
    let parse_before = stage_row(&app.db, id, "parse").await;
    let chunk_before = stage_row(&app.db, id, "chunk").await;
    let parsed_before = parsed_at(&app.db, id).await;
    let chunks_before = chunk_ids(&app.db, id).await;
    assert!(!chunks_before.is_empty());

    serve_the_model(&fake).await;
    let retried = client.retry(id).await.unwrap();
    assert_eq!(retried.stage, "embed");
    assert_eq!(
        retried.document.status, "embedding",
        "the answer is the state the retry committed"
    );
    assert_eq!(retried.document.error, None);
    let embed = retried
        .document
        .stages
        .iter()
        .find(|st| st.stage == "embed")
        .expect("an embed stage");
    assert_eq!(
        (
            embed.state.as_str(),
            embed.attempts,
            embed.last_error.as_deref()
        ),
        ("queued", 0, None)
    );

    let doc = wait_ready(&client, &[id], Duration::from_secs(60))
        .await
        .remove(0);
    assert_eq!(doc.chunks_total.map(i64::from), Some(doc.chunks_embedded));
    assert_eq!(
        stage_row(&app.db, id, "parse").await,
        parse_before,
        "the parse stage did not run again"
    );
    assert_eq!(
        stage_row(&app.db, id, "chunk").await,
        chunk_before,
        "the chunk stage did not run again"
    );
    assert_eq!(
        parsed_at(&app.db, id).await,
        parsed_before,
        "the parsed sections were kept"
    );
    assert_eq!(
        chunk_ids(&app.db, id).await,
        chunks_before,
        "the chunks were kept"
    );
    assert!(fake.stats().await.embedded_inputs >= 1);

    assert_eq!(
        api_error(client.retry(id).await.unwrap_err()),
        (409, ErrorCode::NotFailed),
        "a ready document has nothing to retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_can_retry_a_failed_document_and_it_runs_the_failed_stage_again() {
    let s = settings(&unique_prefix("retry-owner"), &tests::redis_url());
    let app = TestApp::spawn(s).await;
    let _worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let (a, b) = (app.client(alice), app.client(bob));

    let corrupt = a
        .upload_bytes("broken.pdf", CORRUPT_PDF.to_vec(), None)
        .await
        .unwrap()
        .document_id;
    let failed = wait_failed(&a, corrupt).await;
    assert_eq!(failed.stages[0].state, "dead");
    wait_settled(&app.settings, "parse").await;

    assert_eq!(
        api_error(b.retry(corrupt).await.unwrap_err()),
        (404, ErrorCode::NotFound),
        "another user's document is not found, not forbidden"
    );
    assert_eq!(
        api_error(a.retry(Uuid::new_v4()).await.unwrap_err()),
        (404, ErrorCode::NotFound)
    );
    let not_an_id = reqwest::Client::new()
        .post(format!("{}/v1/documents/not-an-id/retry", app.api.url))
        .bearer_auth(app.token(alice))
        .send()
        .await
        .unwrap();
    assert_eq!(not_an_id.status(), 404);
    let still = a.status(corrupt).await.unwrap();
    assert_eq!(
        (still.status.as_str(), still.error.as_deref()),
        ("failed", failed.error.as_deref()),
        "Bob's retry changed nothing"
    );

    let retried = a.retry(corrupt).await.unwrap();
    assert_eq!(retried.stage, "parse");
    assert_eq!(retried.document.status, "queued");
    assert_eq!(retried.document.stages[0].state, "queued");
    // The file is as corrupt as before: the parse stage runs again and fails again, with its reason.
    let again = wait_failed(&a, corrupt).await;
    assert!(
        again.error.as_deref().unwrap_or_default().contains("PDF"),
        "{:?}",
        again.error
    );
    assert_eq!(
        (again.stages[0].state.as_str(), again.stages[0].attempts),
        ("dead", 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploading_the_same_bytes_of_a_failed_document_queues_it_again_and_the_answer_says_so() {
    let fake = refusing_embedder().await;
    let s = embedding_settings("retry-reupload", &fake);
    let app = TestApp::spawn(s).await;
    let _worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let user = Uuid::new_v4();
    let client = app.client(user);
    let http = reqwest::Client::new();
    let token = app.token(user);
    let bytes: &'static [u8] = b"Lichens are a partnership of a fungus and an alga.";
    let post = || {
        let form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(bytes).file_name("lichen.txt"),
        );
        http.post(format!("{}/v1/documents", app.api.url))
            .bearer_auth(&token)
            .multipart(form)
            .send()
    };

    let first = post().await.unwrap();
    assert_eq!(first.status(), 202);
    let first: serde_json::Value = first.json().await.unwrap();
    assert_eq!(first["status"], "queued");
    assert!(
        first.get("duplicate").is_none() && first.get("requeued").is_none(),
        "{first}"
    );
    let id: Uuid = first["document_id"].as_str().unwrap().parse().unwrap();
    wait_failed(&client, id).await;
    wait_settled(&app.settings, "embed").await;

    serve_the_model(&fake).await;
    let again = post().await.unwrap();
    assert_eq!(again.status(), 202, "a failed duplicate is accepted again");
    let again: serde_json::Value = again.json().await.unwrap();
    assert_eq!(again["document_id"], first["document_id"]);
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["requeued"], true, "{again}");
    assert_eq!(
        again["status"], "embedding",
        "it restarts from the stage that gave up"
    );
    wait_ready(&client, &[id], Duration::from_secs(60)).await;

    let third = post().await.unwrap();
    assert_eq!(third.status(), 200);
    let third: serde_json::Value = third.json().await.unwrap();
    assert_eq!(third["duplicate"], true, "{third}");
    assert!(third.get("requeued").is_none(), "{third}");
    assert_eq!(third["status"], "ready");
    let documents: i64 =
        sqlx::query_scalar("SELECT count(*) FROM upload_pipeline.documents WHERE user_id = $1")
            .bind(user)
            .fetch_one(app.admin())
            .await
            .unwrap();
    assert_eq!(documents, 1, "the same bytes stay one document");
}

/// Writes `settings` where `producer --config` reads them.
fn config_file(s: &Settings) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}-producer.toml", s.queue.key_prefix));
    std::fs::write(
        &path,
        toml::to_string(s).expect("settings serialise to TOML"),
    )
    .expect("write the producer's config file");
    path
}

/// Runs `producer <args>` with the test's settings and nothing of this process's environment.
async fn producer(config: &Path, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(tests::worker_bin().with_file_name("producer"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("UPLOAD_PIPELINE_CONFIG", config)
        .envs(tests::coverage_env())
        .output()
        .await
        .expect("run producer")
}

/// `producer failures --json <args>`: the counts as (stage, documents), and the listed documents' ids.
async fn listed_failures(config: &Path, args: &[&str]) -> (Vec<(String, i64)>, Vec<Uuid>) {
    let out = producer(config, &[&["failures", "--json"][..], args].concat()).await;
    assert!(
        out.status.success(),
        "producer failures {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let counts: Vec<(String, i64)> = listed["counts"]
        .as_array()
        .expect("counts")
        .iter()
        .map(|c| {
            (
                c["stage"].as_str().unwrap().to_owned(),
                c["documents"].as_i64().unwrap(),
            )
        })
        .collect();
    let documents: Vec<Uuid> = listed["documents"]
        .as_array()
        .expect("documents")
        .iter()
        .map(|d| d["document_id"].as_str().unwrap().parse().unwrap())
        .collect();
    (counts, documents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_failures_lists_by_stage_and_reason_and_producer_retry_requeues_the_matches() {
    let fake = refusing_embedder().await;
    let s = embedding_settings("retry-cli", &fake);
    let app = TestApp::spawn(s).await;
    let _worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let user = Uuid::new_v4();
    let client = app.client(user);
    let mut at_embed = Vec::new();
    for text in [
        "Ferns unroll their fronds from tight coils called fiddleheads.",
        "Horsetails have hollow jointed stems rich in silica.",
    ] {
        let up = client
            .upload_bytes("plant.txt", text.as_bytes().to_vec(), None)
            .await
            .unwrap();
        at_embed.push(up.document_id);
    }
    let at_parse = client
        .upload_bytes("broken.pdf", CORRUPT_PDF.to_vec(), None)
        .await
        .unwrap()
        .document_id;
    for id in at_embed.iter().chain([&at_parse]) {
        wait_failed(&client, *id).await;
    }
    wait_settled(&app.settings, "parse").await;
    wait_settled(&app.settings, "embed").await;
    let config = config_file(&app.settings);

    let (counts, documents) = listed_failures(&config, &[]).await;
    assert_eq!(counts, [("embed".to_owned(), 2), ("parse".to_owned(), 1)]);
    assert_eq!(documents.len(), 3);
    let table = producer(&config, &["failures", "--stage", "embed"]).await;
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.lines().any(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.starts_with(&["embed", "2"]) && l.contains("does not exist")
        }),
        "the count by stage and reason:\n{table}"
    );
    assert!(
        at_embed.iter().all(|id| table.contains(&id.to_string()))
            && !table.contains(&at_parse.to_string()),
        "--stage embed lists the embed failures only:\n{table}"
    );
    let since_an_hour =
        listed_failures(&config, &["--since", "1h", "--user", &user.to_string()]).await;
    assert_eq!(since_an_hour.1.len(), 3);
    let later = listed_failures(&config, &["--since", "2999-01-01T00:00:00Z"]).await;
    assert!(later.0.is_empty() && later.1.is_empty(), "{later:?}");
    let someone_else = listed_failures(&config, &["--user", &Uuid::new_v4().to_string()]).await;
    assert!(someone_else.1.is_empty(), "{someone_else:?}");

    // The operators' endpoint says the same, to admin tokens only.
    let http = reqwest::Client::new();
    let auth = Auth::hs256(app.settings.api.jwt_secret.expose());
    let admin = auth.issue(Uuid::new_v4(), Duration::from_secs(600), true);
    let failures = |token: String, query: &'static str| {
        let req = http
            .get(format!("{}/v1/admin/failures{query}", app.api.url))
            .bearer_auth(token);
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, body) = failures(admin.clone(), "?stage=embed").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["counts"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(body["counts"][0]["stage"], "embed");
    assert_eq!(body["counts"][0]["documents"], 2);
    assert!(
        body["counts"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{body}"
    );
    assert_eq!(body["documents"].as_array().unwrap().len(), 2, "{body}");
    let (status, body) = failures(admin.clone(), "?since=2999-01-01T00:00:00Z").await;
    assert_eq!(status, 200, "{body}");
    assert!(body["counts"].as_array().unwrap().is_empty(), "{body}");
    let (status, _) = failures(admin.clone(), "?stage=ocr").await;
    assert_eq!(status, 400);
    let (status, _) = failures(admin, "?limit=0").await;
    assert_eq!(status, 400);
    let (status, body) = failures(app.token(user), "").await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "forbidden");

    // Bad input: a clear message and a non-zero exit, nothing retried.
    for (args, says) in [
        (
            &["retry", "--stage", "synthetic"][..],
            "parse, chunk or embed",
        ),
        (&["retry", "--since", "last tuesday"][..], "RFC 3339"),
        (&["retry", "--status", "ready"][..], "failed"),
        (&["failures", "--user", "bob"][..], "bob"),
    ] {
        let out = producer(&config, args).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(listed_failures(&config, &[]).await.1.len(), 3);

    serve_the_model(&fake).await;
    let out = producer(&config, &["retry", "--stage", "embed"]).await;
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("re-queued 2 failed documents"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().eq(["embed", "2"])),
        "{text}"
    );
    wait_ready(&client, &at_embed, Duration::from_secs(60)).await;
    assert_eq!(
        client.status(at_parse).await.unwrap().status,
        "failed",
        "a failure at another stage was left alone"
    );
    let (counts, documents) = listed_failures(&config, &[]).await;
    assert_eq!(counts, [("parse".to_owned(), 1)]);
    assert_eq!(documents, [at_parse]);

    let _ = std::fs::remove_file(&config);
}
