//! Exactly-once provider work and forward-only states under real operating conditions, with times scaled down:
//! backlogs that outlive `reconcile_after`, LlamaParse jobs longer than it, late duplicate jobs, a Redis that
//! loses its data, and embed batches that give up. Real Postgres and Redis, worker processes, fake providers.

use std::{sync::Arc, time::Duration};

use tests::TestApp;
use tests::fake::{FakeConfig, FakeProviders, Latency, LlamaParseConfig, OpenAiConfig};
use tests::{RedisServer, WorkerProcess, settings, unique_prefix, wait_for, wait_ready};
use upload_pipeline::{
    Settings,
    jobs::Pipeline,
    providers,
    settings::{EmbedderKind, ParserKind},
};
use uuid::Uuid;

/// Settings that send parsing to the fake LlamaParse and embedding to the fake OpenAI.
fn with_fakes(mut s: Settings, fake: &FakeProviders) -> Settings {
    fake.parse_with(&mut s);
    fake.embed_with(&mut s);
    s.embedding.batch_size = 2;
    s.chunking.max_tokens = 48;
    s.chunking.overlap_tokens = 8;
    s
}

/// An HTML document (LlamaParse parses HTML; text stays local) of `paragraphs` paragraphs, different for each
/// `seed`.
fn document(seed: usize, paragraphs: usize) -> Vec<u8> {
    let body: String = (0..paragraphs)
        .map(|i| format!("<p>Document {seed}, paragraph {i}: a passage about subject {seed}-{i} with enough words.</p>\n"))
        .collect();
    format!("<html><head><title>Document {seed}</title></head><body><h1>Document {seed}</h1>\n{body}</body></html>")
        .into_bytes()
}

/// The sum of `chunks_total` over the documents.
fn chunks(docs: &[upload_pipeline::client::Document]) -> u64 {
    docs.iter()
        .map(|d| d.chunks_total.unwrap_or(0) as u64)
        .sum()
}

/// A pipeline context of the test's own, to push jobs behind the fleet's back.
async fn pipeline(s: &Settings, db: &tests::TestDb) -> Pipeline {
    let broker = tests::broker(s).await;
    Pipeline::new(
        db.admin.clone(),
        &broker,
        providers::embedder(s, None).unwrap(),
        providers::parser(s, None).unwrap(),
        Arc::new(s.clone()),
    )
    .unwrap()
}

/// Waits until no job of the pipeline's queues waits, runs or is delayed.
async fn drained(p: &Pipeline) {
    wait_for("the queues to drain", Duration::from_secs(60), || async {
        for q in [&*p.parse, &*p.chunk, &p.embed] {
            let st = q.stats().await.ok()?;
            if st.pending + st.in_flight + st.delayed > 0 {
                return None;
            }
        }
        Some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_that_outlives_reconcile_after_makes_no_duplicate_provider_call() {
    let fake = FakeProviders::start(FakeConfig {
        openai: OpenAiConfig {
            latency: Latency::fixed(150.0),
            ..Default::default()
        },
        llamaparse: LlamaParseConfig {
            job_duration: Latency::fixed(300.0),
            ..Default::default()
        },
    })
    .await;
    let mut s = with_fakes(
        settings(&unique_prefix("backlog"), &tests::redis_url()),
        &fake,
    );
    // Every document waits in the queues several times longer than reconcile_after, and the reconciler looks
    // five times a second.
    s.pipeline.reconcile_after = Duration::from_secs(1);
    s.pipeline.reconcile_interval = Duration::from_millis(200);
    s.worker.concurrency.parse = 1;
    s.worker.concurrency.chunk = 1;
    s.worker.concurrency.embed = 1;
    let app = TestApp::spawn(s).await;
    let user = Uuid::new_v4();
    let client = app.client(user);
    let mut ids = Vec::new();
    for i in 0..8 {
        let up = client
            .upload_bytes(&format!("doc{i}.html"), document(i, 6), None)
            .await
            .unwrap();
        assert_eq!(
            up.status, "queued",
            "the answer reports the state at acceptance"
        );
        ids.push(up.document_id);
    }
    let _worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let docs = wait_ready(&client, &ids, Duration::from_secs(120)).await;
    let started = docs.iter().map(|d| d.created_at).min().unwrap();
    let ended = docs.iter().filter_map(|d| d.ready_at).max().unwrap();
    // Eight LlamaParse jobs of 300 ms one after the other: at least 2.4 s, over twice reconcile_after.
    assert!(
        ended - started > chrono::Duration::seconds(2),
        "the backlog outlived reconcile_after ({} ms)",
        (ended - started).num_milliseconds()
    );
    let stats = fake.stats().await;
    assert_eq!(stats.parse_uploads, 8, "one LlamaParse upload per document");
    assert_eq!(
        stats.embedded_inputs,
        chunks(&docs),
        "one embedded input per chunk"
    );
    for doc in &docs {
        for stage in &doc.stages {
            assert_eq!(stage.attempts, 1, "{} ran once: {doc:?}", stage.stage);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_llamaparse_job_longer_than_reconcile_after_is_uploaded_once() {
    let fake = FakeProviders::start(FakeConfig {
        llamaparse: LlamaParseConfig {
            job_duration: Latency::fixed(3_500.0),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let mut s = with_fakes(
        settings(&unique_prefix("long-parse"), &tests::redis_url()),
        &fake,
    );
    s.pipeline.reconcile_after = Duration::from_secs(1);
    s.pipeline.reconcile_interval = Duration::from_millis(200);
    let app = TestApp::spawn(s).await;
    let _worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let client = app.client(Uuid::new_v4());
    let mut ids = Vec::new();
    for i in 0..2 {
        let up = client
            .upload_bytes(&format!("long{i}.html"), document(100 + i, 3), None)
            .await
            .unwrap();
        ids.push(up.document_id);
    }
    // While a job runs for 3.5 s, its row is touched every third of reconcile_after: never stale.
    let db_pool = app.db.admin.clone();
    wait_for(
        "a running parse row kept fresh past reconcile_after",
        Duration::from_secs(30),
        || async {
            let fresh: Option<bool> = sqlx::query_scalar(
                "SELECT bool_or(now() - started_at > interval '2 seconds' AND now() - updated_at < interval '1 second') \
                 FROM upload_pipeline.upload_jobs WHERE stage = 'parse' AND state = 'running'",
            )
            .fetch_one(&db_pool)
            .await
            .ok()?;
            fresh.unwrap_or(false).then_some(())
        },
    )
    .await;
    let docs = wait_ready(&client, &ids, Duration::from_secs(60)).await;
    let stats = fake.stats().await;
    assert_eq!(
        stats.parse_uploads, 2,
        "each document was uploaded once, although its job ran 3.5 times reconcile_after"
    );
    assert_eq!(stats.embedded_inputs, chunks(&docs));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_duplicate_cannot_move_a_ready_document_back() {
    let fake = FakeProviders::start(FakeConfig::default()).await;
    let s = with_fakes(
        settings(&unique_prefix("late-dup"), &tests::redis_url()),
        &fake,
    );
    let app = TestApp::spawn(s).await;
    let _worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let client = app.client(Uuid::new_v4());
    let up = client
        .upload_bytes("ready.html", document(7, 5), None)
        .await
        .unwrap();
    let before = wait_ready(&client, &[up.document_id], Duration::from_secs(60))
        .await
        .remove(0);
    let calls = fake.stats().await;

    // Late copies of every stage, as a lost acknowledgement or a slow replica would deliver them.
    let p = pipeline(&app.settings, &app.db).await;
    let user = before_user(&app.db, up.document_id).await;
    assert!(p.push_parse(up.document_id, user).await.unwrap());
    assert!(p.push_chunk(up.document_id, user).await.unwrap());
    let all: Vec<u32> = (0..before.chunks_total.unwrap() as u32).collect();
    assert!(p.push_embed(up.document_id, user, &all).await.unwrap() > 0);
    drained(&p).await;

    let after = client.status(up.document_id).await.unwrap();
    assert_eq!(after.status, "ready");
    assert_eq!(after.ready_at, before.ready_at);
    assert_eq!(after.chunks_embedded, before.chunks_embedded);
    for (a, b) in after.stages.iter().zip(&before.stages) {
        assert_eq!((&a.state, a.attempts), (&b.state, b.attempts), "{a:?}");
    }
    let now = fake.stats().await;
    assert_eq!(
        (now.parse_uploads, now.embedded_inputs),
        (calls.parse_uploads, calls.embedded_inputs),
        "late copies call no provider"
    );
}

/// The owner of a document, read behind the API's back.
async fn before_user(db: &tests::TestDb, id: Uuid) -> Uuid {
    sqlx::query_scalar("SELECT user_id FROM upload_pipeline.documents WHERE id = $1")
        .bind(id)
        .fetch_one(&db.admin)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushing_a_job_that_is_waiting_in_flight_or_delayed_adds_nothing() {
    let mut s = settings(&unique_prefix("dedupe"), &tests::redis_url());
    let _keys = tests::RedisKeys::of(&s);
    s.embedding.embedder = EmbedderKind::Hashing;
    s.embedding.batch_size = 2;
    let db = tests::TestDb::create(&mut s).await;
    let p = pipeline(&s, &db).await;
    let (doc, user) = (Uuid::new_v4(), Uuid::new_v4());
    assert!(p.push_parse(doc, user).await.unwrap(), "first push");
    assert!(
        !p.push_parse(doc, user).await.unwrap(),
        "waiting: not again"
    );
    assert_eq!(p.push_embed(doc, user, &[0, 1, 2, 3, 4]).await.unwrap(), 3);
    assert_eq!(p.push_embed(doc, user, &[0, 1, 2, 3, 4]).await.unwrap(), 0);
    assert_eq!(p.parse.stats().await.unwrap().pending, 1);
    assert_eq!(p.embed.stats().await.unwrap().pending, 3);
    let live = p
        .embed
        .live(&[format!("{doc}:embed:0"), format!("{doc}:embed:9")])
        .await
        .unwrap();
    assert_eq!(live, vec![true, false]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_walks_a_backlog_larger_than_a_page_and_pushes_each_lost_stage_once() {
    use upload_pipeline::{
        documents::{self, NewUpload, UploadOutcome},
        parsing::DocKind,
    };
    let mut s = settings(&unique_prefix("walk"), &tests::redis_url());
    let _keys = tests::RedisKeys::of(&s);
    s.embedding.embedder = EmbedderKind::Hashing;
    s.pipeline.reconcile_after = Duration::from_secs(1);
    let db = tests::TestDb::create(&mut s).await;
    let p = pipeline(&s, &db).await;
    // 1,200 uploads recorded while Redis was away (no job pushed): more than two pages of the walk.
    let user = Uuid::new_v4();
    for i in 0..1_200 {
        let up = NewUpload {
            user_id: user,
            filename: format!("lost{i}.txt"),
            kind: DocKind::Text,
            bytes: format!("lost document {i}").into_bytes(),
            metadata: serde_json::json!({}),
            idempotency_key: None,
        };
        let outcome = documents::create(&db.admin, &up).await.unwrap();
        assert!(matches!(outcome, UploadOutcome::Created(_)));
    }
    sqlx::query("UPDATE upload_pipeline.upload_jobs SET updated_at = now() - interval '1 hour'")
        .execute(&db.admin)
        .await
        .unwrap();
    assert_eq!(
        upload_pipeline::reconciler::reconcile_once(&p)
            .await
            .unwrap(),
        1_200
    );
    assert_eq!(p.parse.stats().await.unwrap().pending, 1_200);
    // Stale again, but every job is in Redis now: nothing is pushed twice.
    sqlx::query("UPDATE upload_pipeline.upload_jobs SET updated_at = now() - interval '1 hour'")
        .execute(&db.admin)
        .await
        .unwrap();
    assert_eq!(
        upload_pipeline::reconciler::reconcile_once(&p)
            .await
            .unwrap(),
        0
    );
    assert_eq!(p.parse.stats().await.unwrap().pending, 1_200);
}

/// A job lost with Redis runs again at the reconciler's next pass after it notices the lost data, not after
/// `reconcile_after`: here ten minutes, so only the noticing can make the document ready within two. (The time
/// itself, seconds on a quiet machine, is a speed figure; a worker process starting on a loaded machine took
/// over 30 s alone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_lost_in_a_redis_restart_runs_again_long_before_reconcile_after() {
    let mut redis = RedisServer::start().await;
    let mut s = settings(&unique_prefix("lost-restart"), &redis.url());
    s.embedding.embedder = EmbedderKind::Hashing;
    s.pipeline.reconcile_after = Duration::from_secs(600);
    s.pipeline.reconcile_interval = Duration::from_secs(2);
    let app = TestApp::spawn(s).await;
    let client = app.client(Uuid::new_v4());
    let up = client
        .upload_bytes("lost.html", document(3, 3), None)
        .await
        .unwrap();
    let p = pipeline(&app.settings, &app.db).await;
    wait_for(
        "the parse job in Redis",
        Duration::from_secs(10),
        || async { (p.parse.stats().await.ok()?.pending == 1).then_some(()) },
    )
    .await;
    // The reconciler has seen this Redis (its epoch) before the restart takes the job with it.
    wait_for(
        "the reconciler's epoch",
        Duration::from_secs(10),
        || async {
            let mut conn = tests::broker(&app.settings).await.connection();
            let epoch: Option<String> = redis::cmd("GET")
                .arg(format!("{}:epoch", app.settings.queue.key_prefix))
                .query_async(&mut conn)
                .await
                .ok()?;
            epoch.map(|_| ())
        },
    )
    .await;
    redis.stop();
    redis.restart().await;
    let lost_at = std::time::Instant::now();
    let mut worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    worker.wait_healthy().await;
    wait_ready(&client, &[up.document_id], Duration::from_secs(120)).await;
    let took = lost_at.elapsed();
    println!("ready {took:?} after the restart");
    assert!(took < Duration::from_secs(120), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embed_batch_that_gave_up_fails_the_document_and_no_sibling_brings_it_back() {
    // Every request is refused (503) until a batch has used its three attempts.
    let mut config = FakeConfig {
        openai: OpenAiConfig {
            fail_next: 1_000,
            ..Default::default()
        },
        ..Default::default()
    };
    let fake = FakeProviders::start(config.clone()).await;
    let mut s = with_fakes(
        settings(&unique_prefix("gave-up"), &tests::redis_url()),
        &fake,
    );
    s.parsing.parser = ParserKind::Local;
    s.worker.concurrency.embed = 1;
    let app = TestApp::spawn(s).await;
    let _worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let client = app.client(Uuid::new_v4());
    let up = client
        .upload_bytes("batches.html", document(11, 10), None)
        .await
        .unwrap();
    let failed = wait_for("the document to fail", Duration::from_secs(60), || async {
        let doc = client.status(up.document_id).await.ok()?;
        (doc.status == "failed").then_some(doc)
    })
    .await;
    assert!(
        failed
            .error
            .as_deref()
            .unwrap_or("")
            .contains("gave up after 3 attempts"),
        "{failed:?}"
    );
    let chunks = failed.chunks_total.unwrap();
    assert!(chunks > 4, "at least three batches of two: {chunks} chunks");
    // The siblings' remaining attempts meet a provider that answers again: none revives the document.
    config.openai.fail_next = 0;
    fake.configure(&config).await;
    let p = pipeline(&app.settings, &app.db).await;
    drained(&p).await;
    let after = client.status(up.document_id).await.unwrap();
    assert_eq!(after.status, "failed", "{after:?}");
    assert_eq!(after.error, failed.error);
    let embed = after.stages.iter().find(|st| st.stage == "embed").unwrap();
    assert_eq!(embed.state, "dead");
    assert_eq!(
        after.chunks_embedded, 0,
        "no sibling called the provider after the failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_claim_was_taken_over_makes_no_further_provider_call() {
    // One embed job of several chunks, one request per chunk, each taking a second.
    let fake = FakeProviders::start(FakeConfig {
        openai: OpenAiConfig {
            latency: Latency::fixed(1_000.0),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let mut s = with_fakes(
        settings(&unique_prefix("claim-lost"), &tests::redis_url()),
        &fake,
    );
    s.parsing.parser = ParserKind::Local;
    s.embedding.batch_size = 64;
    s.embedding.openai.max_inputs = 1;
    s.queue.reclaim_after = Duration::from_secs(2);
    let app = TestApp::spawn(s).await;
    let client = app.client(Uuid::new_v4());
    let mut frozen = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    frozen.wait_healthy().await;
    let up = client
        .upload_bytes("claimed.html", document(21, 10), None)
        .await
        .unwrap();
    wait_for(
        "the first embedding request",
        Duration::from_secs(30),
        || async { (fake.stats().await.embedding_requests >= 1).then_some(()) },
    )
    .await;
    // Frozen mid-call (a long pause, SIGSTOP): a replica takes the job over and finishes the document.
    frozen.signal("STOP");
    let _replica = WorkerProcess::start(&app.settings, "embed");
    let doc = wait_ready(&client, &[up.document_id], Duration::from_secs(60))
        .await
        .remove(0);
    let chunks = doc.chunks_total.unwrap() as u64;
    assert!(chunks >= 5, "{chunks} chunks");
    frozen.signal("CONT");
    wait_for(
        "the frozen worker to learn its claim was taken over",
        Duration::from_secs(30),
        || async { frozen.logs().contains("claim was taken over").then_some(()) },
    )
    .await;
    let p = pipeline(&app.settings, &app.db).await;
    drained(&p).await;
    let requests = fake.stats().await.embedding_requests;
    // The replica embedded every chunk; the frozen worker made only the request(s) it had started before the
    // freeze, and none after it woke up.
    assert!(
        requests >= chunks && requests - chunks <= 2,
        "{requests} requests for {chunks} chunks"
    );
    assert_eq!(client.status(up.document_id).await.unwrap().status, "ready");
    drop(frozen);
}

/// An embedding call sent as several requests that fails part-way keeps what its earlier requests got: the job's
/// next attempt embeds only the rest, so no chunk is paid for twice however the call ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_embedding_call_that_fails_part_way_pays_for_no_chunk_twice() {
    let fake = FakeProviders::start(FakeConfig {
        openai: OpenAiConfig {
            // The call's third request.
            fail_requests: vec![3],
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let mut s = with_fakes(
        settings(&unique_prefix("split-fail"), &tests::redis_url()),
        &fake,
    );
    // One embed job for the whole document, sent as requests of two inputs.
    s.embedding.batch_size = 64;
    s.embedding.openai.max_inputs = 2;
    let app = TestApp::spawn(s).await;
    let _worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let client = app.client(Uuid::new_v4());
    let text: String = (0..16)
        .map(|i| format!("Paragraph {i} of the split call: a passage about lighthouse {i} and its keeper, long enough to be a chunk of its own.\n\n"))
        .collect();
    let up = client
        .upload_bytes("split.txt", text.into_bytes(), None)
        .await
        .unwrap();
    let docs = wait_ready(&client, &[up.document_id], Duration::from_secs(60)).await;
    let total = chunks(&docs);
    assert!(
        total >= 6,
        "{total} chunks: the call needs at least three requests"
    );
    let stats = fake.stats().await;
    println!(
        "{total} chunks, {} requests, {} inputs embedded",
        stats.embedding_requests, stats.embedded_inputs
    );
    assert_eq!(stats.faults, 1, "the third request failed");
    assert_eq!(
        stats.embedded_inputs, total,
        "every chunk embedded once, although the call failed at its third request"
    );
}
