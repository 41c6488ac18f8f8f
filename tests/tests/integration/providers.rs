//! The provider clients against the fake servers (success and every fault kind), and the pipeline with real
//! providers: recovery under injected faults, documents that wait out an exhausted quota, failed parse jobs, and
//! caches that spare repeated provider calls.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tests::TestApp;
use tests::{
    WorkerProcess,
    fake::{FakeConfig, FakeProviders, Faults, LlamaParseConfig, OpenAiConfig, Window},
    scripted::{Answer, Scripted},
    settings, unique_prefix, wait_for, wait_ready,
};
use upload_pipeline::{
    Settings,
    parsing::DocKind,
    providers::{
        self, Embedder, ParseInput, Parser, ProviderError, hashing::HashingEmbedder,
        local::LocalParser, openai::OpenAiEmbedder,
    },
    settings::{ApiStyle, EmbedderKind, EncodingFormat, LlamaParseApi, ParserKind},
};
use uuid::Uuid;

fn corpus(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/corpus")
        .join(name)
}

/// Settings whose providers are `fake`'s.
fn with_fakes(s: Settings, fake: &FakeProviders) -> Settings {
    served_at(s, &fake.url)
}

/// Settings whose LlamaParse is served at `url` and OpenAI at `url/v1`.
fn served_at(mut s: Settings, url: &str) -> Settings {
    s.embedding.embedder = EmbedderKind::Openai;
    s.embedding.model = "text-embedding-3-small".into();
    s.embedding.dimensions = 384;
    s.embedding.openai.base_url = format!("{url}/v1");
    s.embedding.openai.api_key = upload_pipeline::settings::Secret("sk-test".into());
    s.embedding.openai.timeout = Duration::from_millis(800);
    s.parsing.parser = ParserKind::Llamaparse;
    let l = &mut s.parsing.llamaparse;
    l.base_url = url.to_owned();
    l.api_key = upload_pipeline::settings::Secret("llx-test".into());
    l.poll_interval = Duration::from_millis(20);
    l.poll_interval_max = Duration::from_millis(100);
    l.request_timeout = Duration::from_millis(800);
    l.job_timeout = Duration::from_secs(20);
    s
}

fn keys() -> FakeConfig {
    FakeConfig {
        openai: OpenAiConfig {
            keys: vec!["sk-test".into(), "azure-key".into()],
            ..Default::default()
        },
        llamaparse: LlamaParseConfig {
            keys: vec!["llx-test".into()],
            ..Default::default()
        },
    }
}

fn texts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("Text number {i} about lighthouses, tides and bees."))
        .collect()
}

fn embedder(s: &Settings) -> OpenAiEmbedder {
    OpenAiEmbedder::new(&s.embedding).expect("client")
}

#[tokio::test]
async fn openai_client_embeds_in_order_as_base64_or_floats_within_the_request_limits() {
    let fake = FakeProviders::start(keys()).await;
    let mut s = with_fakes(settings("unused", &tests::redis_url()), &fake);
    let reference = HashingEmbedder::new("x", 384);
    let input = texts(7);
    for format in [EncodingFormat::Base64, EncodingFormat::Float] {
        s.embedding.openai.encoding_format = format;
        s.embedding.openai.max_inputs = 3;
        let vectors = embedder(&s).embed(&input).await.expect("embeds");
        assert_eq!(vectors.len(), 7);
        for (text, v) in input.iter().zip(&vectors) {
            assert_eq!(
                v,
                &reference.vector(text),
                "{format:?}: vectors in input order"
            );
        }
    }
    // 7 inputs at most 3 per request: 3 requests per format.
    assert_eq!(fake.stats().await.embedding_requests, 6);

    // The token budget per request splits too.
    s.embedding.openai.max_inputs = 2048;
    s.embedding.openai.max_request_tokens = 40;
    s.embedding.openai.max_input_tokens = 20;
    let before = fake.stats().await.embedding_requests;
    embedder(&s).embed(&input).await.expect("embeds");
    assert!(fake.stats().await.embedding_requests - before >= 3);
}

#[tokio::test]
async fn openai_client_learns_smaller_limits_from_413_422_and_context_length_answers() {
    let mut config = keys();
    config.openai.max_inputs = 4;
    config.openai.max_input_tokens = 40;
    let fake = FakeProviders::start(config).await;
    let s = with_fakes(settings("unused", &tests::redis_url()), &fake);
    let client = embedder(&s);
    let mut input = texts(9);
    input.push("lighthouse ".repeat(300));
    let vectors = client.embed(&input).await.expect("embeds after adapting");
    assert_eq!(vectors.len(), 10);
    let (inputs, _, per_input) = client.limits();
    assert_eq!(inputs, 4, "the batch limit named by the 422 answer");
    assert!(per_input <= 40, "{per_input}");
    // Learnt once: the next call needs no refused request.
    let before = fake.stats().await.embedding_requests;
    client.embed(&input).await.unwrap();
    assert_eq!(fake.stats().await.embedding_requests - before, 3);
}

#[tokio::test]
async fn azure_deployments_take_the_api_key_header() {
    let fake = FakeProviders::start(keys()).await;
    let mut s = with_fakes(settings("unused", &tests::redis_url()), &fake);
    s.embedding.openai.api_style = ApiStyle::Azure;
    s.embedding.openai.base_url = fake.url.clone();
    s.embedding.openai.azure_deployment = "text-embedding-3-small".into();
    s.embedding.openai.api_key = upload_pipeline::settings::Secret("azure-key".into());
    assert_eq!(embedder(&s).embed(&texts(2)).await.unwrap().len(), 2);
    s.embedding.openai.api_key = upload_pipeline::settings::Secret("wrong".into());
    let err = embedder(&s).embed(&texts(1)).await.unwrap_err();
    assert!(matches!(err, ProviderError::Unauthorized { .. }), "{err:?}");
}

/// Sets `faults` (every request faulty) and returns the client's error.
async fn openai_error_with(fake: &FakeProviders, s: &Settings, faults: Faults) -> ProviderError {
    let mut config = keys();
    config.openai.faults = faults;
    fake.configure(&config).await;
    embedder(s).embed(&texts(2)).await.unwrap_err()
}

#[tokio::test]
async fn openai_faults_are_classified_retryable_or_permanent() {
    let fake = FakeProviders::start(keys()).await;
    let mut s = with_fakes(settings("unused", &tests::redis_url()), &fake);
    s.embedding.openai.timeout = Duration::from_millis(300);
    let all = |f: fn(&mut Faults)| {
        let mut faults = Faults {
            hang_ms: 2_000,
            ..Default::default()
        };
        f(&mut faults);
        faults
    };
    for (name, faults) in [
        ("5xx", all(|f| f.server_error = 1.0)),
        ("timeout", all(|f| f.timeout = 1.0)),
        ("malformed JSON", all(|f| f.malformed = 1.0)),
        ("connection reset", all(|f| f.reset = 1.0)),
    ] {
        let err = openai_error_with(&fake, &s, faults).await;
        assert!(
            matches!(err, ProviderError::Transient { .. }),
            "{name}: {err:?}"
        );
    }
    let err = openai_error_with(&fake, &s, all(|f| f.insufficient_quota = 1.0)).await;
    assert!(
        matches!(err, ProviderError::QuotaExhausted { .. }),
        "{err:?}"
    );
    assert!(!err.is_retryable());

    // A request window of one: the second request is told when to come back.
    let mut config = keys();
    config.openai.requests = Some(Window {
        limit: 1,
        window_ms: 2_000,
    });
    fake.configure(&config).await;
    embedder(&s).embed(&texts(1)).await.unwrap();
    let err = embedder(&s).embed(&texts(1)).await.unwrap_err();
    let after = err.retry_after().expect("the reset time is read");
    assert!(
        matches!(err, ProviderError::RateLimited { .. }) && after <= Duration::from_secs(2),
        "{err:?}"
    );

    // A refused key is not the document's fault: the stage waits for the key instead of failing.
    s.embedding.openai.api_key = upload_pipeline::settings::Secret("sk-wrong-key-0000".into());
    fake.configure(&keys()).await;
    let err = embedder(&s).embed(&texts(1)).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::Unauthorized { message, .. }
            if message.contains("Incorrect API key provided: sk-**********0000")),
        "{err:?}"
    );
    assert!(!err.is_retryable());
}

/// What an error must look like.
type Expect = fn(&ProviderError) -> bool;

fn llamaparse(s: &Settings) -> Arc<dyn Parser> {
    providers::parser(s, None).expect("parser")
}

fn pdf() -> ParseInput {
    ParseInput {
        filename: "honeybees.pdf".into(),
        kind: DocKind::Pdf,
        bytes: Arc::new(std::fs::read(corpus("honeybees.pdf")).unwrap()),
    }
}

#[tokio::test]
async fn llamaparse_v2_and_v1_return_pages_and_classify_every_fault() {
    let fake = FakeProviders::start(keys()).await;
    let mut s = with_fakes(settings("unused", &tests::redis_url()), &fake);
    let local = LocalParser::new(&s.pipeline)
        .parse(&pdf())
        .await
        .expect("local parse");
    for api in [LlamaParseApi::V2, LlamaParseApi::V1] {
        s.parsing.llamaparse.api_version = api;
        let parser = llamaparse(&s);
        let sections = parser.parse(&pdf()).await.expect("parses");
        assert_eq!(
            sections.iter().map(|x| x.page).collect::<Vec<_>>(),
            vec![Some(1), Some(2)],
            "{api:?}: page numbers are kept"
        );
        assert_eq!(sections, local, "{api:?}");
        assert!(parser.key(DocKind::Pdf).starts_with("llamaparse:"));
        assert!(parser.cacheable(DocKind::Pdf) && !parser.cacheable(DocKind::Markdown));

        let faulty = |f: Faults| {
            let mut c = keys();
            c.llamaparse.faults = Faults {
                hang_ms: 2_000,
                ..f
            };
            c
        };
        let cases: Vec<(&str, FakeConfig, Expect)> = vec![
            (
                "5xx",
                faulty(Faults {
                    server_error: 1.0,
                    ..Default::default()
                }),
                |e| matches!(e, ProviderError::Transient { .. }),
            ),
            (
                "timeout",
                faulty(Faults {
                    timeout: 1.0,
                    ..Default::default()
                }),
                |e| matches!(e, ProviderError::Transient { .. }),
            ),
            (
                "malformed",
                faulty(Faults {
                    malformed: 1.0,
                    ..Default::default()
                }),
                |e| matches!(e, ProviderError::Transient { .. }),
            ),
            (
                "reset",
                faulty(Faults {
                    reset: 1.0,
                    ..Default::default()
                }),
                |e| matches!(e, ProviderError::Transient { .. }),
            ),
            (
                "credits",
                FakeConfig {
                    llamaparse: LlamaParseConfig {
                        credits_exhausted: true,
                        ..Default::default()
                    },
                    ..keys()
                },
                |e| matches!(e, ProviderError::QuotaExhausted { .. }),
            ),
            (
                "job error",
                faulty(Faults {
                    job_error: 1.0,
                    ..Default::default()
                }),
                |e| matches!(e, ProviderError::Permanent { message, .. } if message.contains("Injected failure")),
            ),
            (
                "upload window",
                FakeConfig {
                    llamaparse: LlamaParseConfig {
                        uploads: Some(Window {
                            limit: 0,
                            window_ms: 10_000,
                        }),
                        ..Default::default()
                    },
                    ..keys()
                },
                |e| matches!(e, ProviderError::RateLimited { .. }),
            ),
        ];
        s.parsing.llamaparse.request_timeout = Duration::from_millis(300);
        for (name, config, expected) in cases {
            fake.configure(&config).await;
            let err = llamaparse(&s).parse(&pdf()).await.unwrap_err();
            assert!(expected(&err), "{api:?} {name}: {err:?}");
        }
        fake.configure(&keys()).await;
        let mut wrong = s.clone();
        wrong.parsing.llamaparse.api_key = upload_pipeline::settings::Secret("llx-wrong".into());
        let err = llamaparse(&wrong).parse(&pdf()).await.unwrap_err();
        assert!(
            matches!(&err, ProviderError::Unauthorized { message, .. }
                if message.contains("Invalid authentication token")),
            "{api:?}: {err:?}"
        );
        s.parsing.llamaparse.request_timeout = Duration::from_millis(800);
    }
}

/// Uploads `n` distinct HTML documents; returns their ids.
async fn upload_html(client: &upload_pipeline::client::Client, n: usize, tag: &str) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for i in 0..n {
        let html = format!(
            "<html><body><h1>{tag} report {i}</h1><p>Harbour {i} keeps lighthouse {i} lit; the keeper logs tide {i} \
             every night.</p><h2>Bees</h2><p>Hive {i} of {tag} made honey from clover field {i}.</p></body></html>"
        );
        let up = client
            .upload_bytes(&format!("{tag}-{i}.html"), html.into_bytes(), None)
            .await
            .expect("upload");
        ids.push(up.document_id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ten_percent_faults_on_both_providers_every_document_becomes_ready() {
    let faults = Faults {
        server_error: 0.05,
        timeout: 0.05,
        hang_ms: 1_500,
        ..Default::default()
    };
    let mut config = keys();
    config.openai.faults = faults;
    config.llamaparse.faults = faults;
    let fake = FakeProviders::start(config).await;
    let mut s = with_fakes(
        settings(&unique_prefix("recovery"), &tests::redis_url()),
        &fake,
    );
    s.queue.retry_base = Duration::from_millis(100);
    s.queue.retry_max = Duration::from_secs(1);
    s.queue.max_deliveries = 10;
    s.embedding.batch_size = 4;
    s.worker.concurrency.parse = 8;
    let app = TestApp::spawn(s).await;
    let _a = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let _b = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let client = app.client(Uuid::new_v4());
    let ids = upload_html(&client, 100, "recovery").await;
    // Every document's final state, ready or failed: the ratio is measured before anything is asserted.
    let docs = wait_for("documents to end", Duration::from_secs(240), || async {
        let mut docs = Vec::new();
        for id in &ids {
            docs.push(client.status(*id).await.ok()?);
        }
        docs.iter()
            .all(|d| d.status == "ready" || d.status == "failed")
            .then_some(docs)
    })
    .await;
    let stats = fake.stats().await;
    // The faults are the only failures here, so every failed attempt of a stage is an injected fault that got
    // past the client; faults the clients absorbed themselves (a poll tried again) end in the same documents.
    let failed_attempts = |ready: bool| -> i64 {
        docs.iter()
            .filter(|d| (d.status == "ready") == ready)
            .flat_map(|d| &d.stages)
            .map(|st| (st.attempts - 1).max(0) as i64)
            .sum()
    };
    let (recovered, lost) = (failed_attempts(true), failed_attempts(false));
    let ready = docs.iter().filter(|d| d.status == "ready").count();
    let ratio = if recovered + lost == 0 {
        1.0
    } else {
        recovered as f64 / (recovered + lost) as f64
    };
    let report = serde_json::json!({
        "faults_injected": stats.faults,
        "provider_calls": stats.embedding_requests + stats.parse_uploads + stats.parse_polls + stats.parse_results,
        "failed_attempts": recovered + lost,
        "failed_attempts_in_ready_documents": recovered,
        "recovery_ratio": ratio,
        "documents": docs.len(),
        "documents_ready": ready,
    });
    println!("recovery: {report}");
    if let Ok(path) = std::env::var("RECOVERY_REPORT") {
        std::fs::write(&path, report.to_string()).expect("write the recovery report");
    }
    assert!(stats.faults > 0, "faults were injected");
    assert!(
        recovered > 0,
        "some injected faults failed an attempt: {report}"
    );
    assert_eq!(ready, ids.len(), "every document ends ready: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_wait_while_the_quota_is_exhausted_and_continue_once_it_is_restored() {
    let mut config = keys();
    config.openai.quota_exhausted = true;
    let fake = FakeProviders::start(config).await;
    let mut s = with_fakes(
        settings(&unique_prefix("quota"), &tests::redis_url()),
        &fake,
    );
    s.pipeline.quota_wait = Duration::from_millis(200);
    s.queue.max_deliveries = 2;
    let app = TestApp::spawn(s).await;
    let _worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let client = app.client(Uuid::new_v4());
    let ids = upload_html(&client, 3, "quota").await;
    // Far more refused calls than attempts allowed: deferrals spend none.
    wait_for(
        "embed calls refused for quota",
        Duration::from_secs(60),
        || async { (fake.stats().await.embedding_requests >= 12).then_some(()) },
    )
    .await;
    for id in &ids {
        let doc = client.status(*id).await.unwrap();
        assert_eq!(doc.status, "embedding", "{doc:?}");
        let embed = doc.stages.iter().find(|st| st.stage == "embed").unwrap();
        assert!(
            embed
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("quota")),
            "{embed:?}"
        );
        assert!(embed.attempts <= 2, "{embed:?}");
    }
    fake.configure(&keys()).await;
    wait_ready(&client, &ids, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parse_job_ending_in_error_fails_the_document_with_the_providers_reason() {
    let mut config = keys();
    config.llamaparse.faults.job_error = 1.0;
    let fake = FakeProviders::start(config).await;
    let s = with_fakes(
        settings(&unique_prefix("parse-error"), &tests::redis_url()),
        &fake,
    );
    let app = TestApp::spawn(s).await;
    let _worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let client = app.client(Uuid::new_v4());
    let id = upload_html(&client, 1, "broken").await[0];
    let doc = wait_for("the document to fail", Duration::from_secs(60), || async {
        let doc = client.status(id).await.ok()?;
        (doc.status == "failed").then_some(doc)
    })
    .await;
    let error = doc.error.unwrap_or_default();
    assert!(
        error.contains("PDF_IS_BROKEN") && error.contains("Injected failure"),
        "{error}"
    );
    assert_eq!(
        fake.stats().await.parse_uploads,
        1,
        "a permanent failure is not retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_files_and_texts_cost_no_second_provider_call() {
    let fake = FakeProviders::start(keys()).await;
    let s = with_fakes(
        settings(&unique_prefix("caches"), &tests::redis_url()),
        &fake,
    );
    let app = TestApp::spawn(s).await;
    let mut worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    let (alice, bob) = (app.client(Uuid::new_v4()), app.client(Uuid::new_v4()));
    let bytes = std::fs::read(corpus("honeybees.pdf")).unwrap();
    let first = alice
        .upload_bytes("honeybees.pdf", bytes.clone(), None)
        .await
        .unwrap();
    wait_ready(&alice, &[first.document_id], Duration::from_secs(60)).await;
    let after_first = fake.stats().await;
    assert_eq!(after_first.parse_uploads, 1);
    assert!(after_first.embedded_inputs > 0);

    // Another user's upload of the same file: a new document, parsed and embedded from the caches.
    let second = bob
        .upload_bytes("bees-again.pdf", bytes, None)
        .await
        .unwrap();
    assert!(!second.duplicate);
    wait_ready(&bob, &[second.document_id], Duration::from_secs(60)).await;
    let after_second = fake.stats().await;
    assert_eq!(after_second.parse_uploads, 1, "parse cache hit");
    assert_eq!(
        after_second.embedding_requests, after_first.embedding_requests,
        "embedding cache hits"
    );
    let hits = worker
        .metric("upload_pipeline_cache_hits_total", &["cache=\"embedding\""])
        .await;
    assert!(hits > 0.0, "{hits}");
    assert_eq!(
        worker
            .metric("upload_pipeline_cache_hits_total", &["cache=\"parse\""])
            .await,
        1.0
    );
    assert!(worker.is_running());
}

/// Settings whose providers are a scripted server.
fn with_scripted(s: Settings, server: &Scripted) -> Settings {
    let mut s = served_at(s, &server.url);
    s.parsing.llamaparse.job_timeout = Duration::from_millis(600);
    s
}

fn floats(n: usize, x: f32) -> serde_json::Value {
    serde_json::json!(vec![x; n])
}

fn base64_floats(n: usize, x: f32) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = std::iter::repeat_n(x.to_le_bytes(), n).flatten().collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

const EMBEDDINGS: &str = "/v1/embeddings";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_answers_outside_the_protocol_are_retried_or_refused_as_retrying_can_help() {
    let item = |i: usize, v: serde_json::Value| serde_json::json!({ "object": "embedding", "index": i, "embedding": v });
    let cases: Vec<(&str, Answer, Expect, &str)> = vec![
        (
            "one vector for two texts",
            Answer::ok(serde_json::json!({ "data": [item(0, floats(384, 0.1))] })),
            |e| matches!(e, ProviderError::Transient { .. }),
            "asked for 2 embeddings, got 1",
        ),
        (
            "broken base64",
            Answer::ok(
                serde_json::json!({ "data": [item(0, "@@@".into()), item(1, "@@@".into())] }),
            ),
            |e| matches!(e, ProviderError::Transient { .. }),
            "bad base64 embedding",
        ),
        (
            "NaN in the vector",
            Answer::ok(serde_json::json!({ "data": [
                item(0, base64_floats(384, f32::NAN).into()),
                item(1, base64_floats(384, 0.5).into())
            ] })),
            |e| matches!(e, ProviderError::Transient { .. }),
            "non-finite",
        ),
        (
            "another model's width",
            Answer::ok(
                serde_json::json!({ "data": [item(1, floats(3, 0.1)), item(0, floats(3, 0.1))] }),
            ),
            |e| matches!(e, ProviderError::Permanent { .. }),
            "embedding.dimensions",
        ),
        (
            "an unexpected 4xx",
            Answer::status(
                404,
                r#"{"error":{"message":"The model `x` does not exist","type":"invalid_request_error","code":"model_not_found"}}"#,
            ),
            |e| matches!(e, ProviderError::Permanent { .. }),
            "does not exist",
        ),
        (
            "a 402 from a compatible server",
            Answer::status(402, r#"{"error":"Payment Required"}"#),
            |e| matches!(e, ProviderError::QuotaExhausted { .. }),
            "Payment Required",
        ),
    ];
    for (name, answer, expect, says) in cases {
        let server = Scripted::start(vec![(EMBEDDINGS, vec![answer])]).await;
        let s = with_scripted(settings("unused", &tests::redis_url()), &server);
        let err = embedder(&s).embed(&texts(2)).await.unwrap_err();
        assert!(
            expect(&err) && err.to_string().contains(says),
            "{name}: {err:?}"
        );
        assert_eq!(
            server.hits(EMBEDDINGS),
            1,
            "{name}: the client never retries on its own"
        );
    }

    // Nothing listens: a transient failure that says so.
    let closed = served_at(
        settings("unused", &tests::redis_url()),
        &format!("http://127.0.0.1:{}", tests::free_port()),
    );
    let err = embedder(&closed).embed(&texts(1)).await.unwrap_err();
    assert!(
        matches!(err, ProviderError::Transient { .. })
            && err.to_string().contains("could not connect"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_server_that_refuses_every_request_as_too_large_is_given_up_on_and_costs_no_quota()
 {
    // Even one short input is "too many tokens per request": the client halves its request budget on every
    // answer, then gives up with a permanent error instead of looping; the refused calls spend no tokens.
    let refused = Answer::status(
        400,
        r#"{"error":{"message":"Requested 12 tokens, max 10 tokens per request","type":"max_tokens_per_request","param":null,"code":"max_tokens_per_request"}}"#,
    );
    let server = Scripted::start(vec![(EMBEDDINGS, vec![refused])]).await;
    let mut s = with_scripted(
        settings(&unique_prefix("too-large"), &tests::redis_url()),
        &server,
    );
    let _keys = tests::RedisKeys::of(&s);
    s.quota.openai.requests_per_minute = 10_000;
    s.quota.openai.tokens_per_minute = 1_000_000;
    let quota = upload_pipeline::quota::Quota::connect(&s).await.unwrap();
    let client = OpenAiEmbedder::with_quota(&s, &quota).unwrap();
    let shown = format!("{client:?}");
    assert!(
        shown.contains("text-embedding-3-small") && !shown.contains("sk-test"),
        "{shown}"
    );
    let err = client.embed(&texts(1)).await.unwrap_err();
    assert!(
        matches!(err, ProviderError::Permanent { .. })
            && err
                .to_string()
                .contains("refuses even a single short input"),
        "{err:?}"
    );
    let requests = server.hits(EMBEDDINGS);
    assert!(
        (2..=13).contains(&requests),
        "{requests} requests before giving up"
    );
    assert!(client.limits().1 < s.embedding.openai.max_request_tokens);
}

const UPLOAD: &str = "/api/v2/parse/upload";
const JOB: &str = "/api/v2/parse/job-1";
const RESULT: &str = "/api/v2/parse/job-1?expand=markdown";

fn job(status: &str, code: &str, message: &str) -> Answer {
    Answer::ok(serde_json::json!({ "job": {
        "id": "job-1", "status": status, "error_code": code, "error_message": message
    } }))
}

fn pages(pages: serde_json::Value) -> Answer {
    Answer::ok(
        serde_json::json!({ "job": { "id": "job-1", "status": "COMPLETED" }, "markdown": { "pages": pages } }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llamaparse_job_states_and_failed_pages_are_read_as_the_api_documents_them() {
    let uploaded = || Answer::ok(serde_json::json!({ "id": "job-1", "status": "PENDING" }));
    let done = || job("COMPLETED", "", "");
    type Case = (
        &'static str,
        Vec<(&'static str, Vec<Answer>)>,
        Expect,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "cancelled",
            vec![
                (UPLOAD, vec![uploaded()]),
                (JOB, vec![job("PENDING", "", ""), job("CANCELLED", "", "")]),
            ],
            |e| matches!(e, ProviderError::Permanent { .. }),
            "cancelled the parse job",
        ),
        (
            "an error with its code only",
            vec![
                (UPLOAD, vec![uploaded()]),
                (JOB, vec![job("ERROR", "PDF_IS_BROKEN", "")]),
            ],
            |e| matches!(e, ProviderError::Permanent { .. }),
            "could not parse the file: PDF_IS_BROKEN",
        ),
        (
            "an error with neither code nor message",
            vec![
                (UPLOAD, vec![uploaded()]),
                (JOB, vec![job("FAILED", "", "")]),
            ],
            |e| matches!(e, ProviderError::Permanent { .. }),
            "the job ended as FAILED",
        ),
        (
            "expired at the provider",
            vec![
                (UPLOAD, vec![uploaded()]),
                (
                    JOB,
                    vec![job("ERROR", "JOB_EXPIRED", "the job took too long")],
                ),
            ],
            |e| matches!(e, ProviderError::Transient { .. }),
            "JOB_EXPIRED: the job took too long",
        ),
        (
            "still running at the job timeout",
            vec![
                (UPLOAD, vec![uploaded()]),
                (JOB, vec![job("RUNNING", "", "")]),
            ],
            |e| matches!(e, ProviderError::Transient { .. }),
            "did not finish within",
        ),
        (
            "every page failed",
            vec![
                (UPLOAD, vec![uploaded()]),
                (JOB, vec![done()]),
                (
                    RESULT,
                    vec![pages(serde_json::json!([
                        { "page_number": 1, "success": false, "error": "image-only page" },
                        { "page_number": 2, "success": false }
                    ]))],
                ),
            ],
            |e| matches!(e, ProviderError::Permanent { .. }),
            "could not parse any page (page 1: image-only page)",
        ),
        (
            "no text at all",
            vec![
                (UPLOAD, vec![uploaded()]),
                (JOB, vec![done()]),
                (RESULT, vec![pages(serde_json::json!([]))]),
            ],
            |e| matches!(e, ProviderError::Permanent { .. }),
            "found no text",
        ),
        (
            "an upload answer without a job id",
            vec![(
                UPLOAD,
                vec![Answer::ok(serde_json::json!({ "status": "PENDING" }))],
            )],
            |e| matches!(e, ProviderError::Transient { .. }),
            "no job id",
        ),
        (
            "a file refused with validation errors",
            vec![(
                UPLOAD,
                vec![Answer::status(
                    415,
                    r#"{"detail":[{"type":"value_error","loc":["body","file"],"msg":"Unsupported file type"}]}"#,
                )],
            )],
            |e| matches!(e, ProviderError::Permanent { .. }),
            "refused the file (HTTP 415 Unsupported Media Type): [{",
        ),
        (
            "a refusal that is not JSON",
            vec![(
                UPLOAD,
                vec![Answer::status(400, "<html>Bad Request</html>")],
            )],
            |e| matches!(e, ProviderError::Permanent { .. }),
            "<html>Bad Request</html>",
        ),
        (
            "a job the provider lost",
            vec![
                (UPLOAD, vec![uploaded()]),
                (
                    JOB,
                    vec![Answer::status(404, r#"{"detail":"Job not found"}"#)],
                ),
            ],
            |e| matches!(e, ProviderError::Transient { .. }),
            "Job not found",
        ),
    ];
    for (name, routes, expect, says) in cases {
        let server = Scripted::start(routes).await;
        let s = with_scripted(settings("unused", &tests::redis_url()), &server);
        let err = llamaparse(&s).parse(&pdf()).await.unwrap_err();
        assert!(
            expect(&err) && err.to_string().contains(says),
            "{name}: {err}"
        );
    }

    // Some pages failed: the others are kept. No pages but the whole document's Markdown: one section.
    let server = Scripted::start(vec![
        (UPLOAD, vec![uploaded()]),
        (JOB, vec![done()]),
        (
            RESULT,
            vec![pages(serde_json::json!([
                { "page_number": 1, "success": false, "error": "image-only page" },
                { "page_number": 2, "success": true, "markdown": "# Bees\n\nThey dance." }
            ]))],
        ),
    ])
    .await;
    let s = with_scripted(settings("unused", &tests::redis_url()), &server);
    let sections = llamaparse(&s).parse(&pdf()).await.unwrap();
    assert_eq!(sections.len(), 1);
    assert_eq!(sections[0].page, Some(2));
    let server = Scripted::start(vec![
        (UPLOAD, vec![uploaded()]),
        (JOB, vec![done()]),
        (
            RESULT,
            vec![Answer::ok(
                serde_json::json!({ "markdown_full": "  # Whole\n\nAll of it.  " }),
            )],
        ),
    ])
    .await;
    let s = with_scripted(settings("unused", &tests::redis_url()), &server);
    let sections = llamaparse(&s).parse(&pdf()).await.unwrap();
    assert_eq!(sections.len(), 1);
    assert_eq!(
        (sections[0].page, sections[0].markdown.as_str()),
        (None, "# Whole\n\nAll of it.")
    );
}

#[tokio::test]
async fn the_in_process_parser_refuses_corrupt_files_and_stops_at_its_time_bound() {
    let mut s = settings("unused", &tests::redis_url());
    let corrupt = ParseInput {
        filename: "broken.pdf".into(),
        kind: DocKind::Pdf,
        bytes: Arc::new(b"%PDF-1.7\nthis is not a PDF body".to_vec()),
    };
    let err = LocalParser::new(&s.pipeline)
        .parse(&corrupt)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProviderError::Permanent { message, .. } if message.starts_with("broken.pdf: ")),
        "{err:?}"
    );
    // Two megabytes of HTML take far longer than a millisecond, even in a release build.
    let html = format!(
        "<html><body>{}</body></html>",
        "<p>lighthouse keepers and tides</p>".repeat(60_000)
    );
    s.pipeline.parse_timeout = Duration::from_millis(1);
    s.pipeline.max_chars = 100_000_000;
    let big = ParseInput {
        filename: "big.html".into(),
        kind: DocKind::Html,
        bytes: Arc::new(html.into_bytes()),
    };
    let err = LocalParser::new(&s.pipeline).parse(&big).await.unwrap_err();
    assert!(err.to_string().contains("longer than"), "{err:?}");
}

/// The parse helper (`worker --parse-one`) answers a bad kind, an unreadable input or an unwritable output with
/// a message and exit code 2, never a panic.
#[test]
fn the_parse_helper_fails_clearly_on_a_bad_kind_input_or_output() {
    use std::process::{Command, Stdio};
    let helper = |kind: &str, stdin: Stdio, stdout: Stdio| {
        Command::new(tests::worker_bin())
            .args([
                "--parse-one",
                kind,
                "--parse-max-pages",
                "10",
                "--parse-max-chars",
                "10000",
            ])
            .args(["--parse-memory-mb", "0"])
            .env_clear()
            .envs(tests::coverage_env())
            .stdin(stdin)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .output()
            .expect("run the parse helper")
    };
    let cases = [
        (
            "bogus",
            Stdio::null(),
            Stdio::piped(),
            "unknown document kind \"bogus\"",
        ),
        (
            "text",
            Stdio::from(std::fs::File::open("/").unwrap()),
            Stdio::piped(),
            "cannot read the document",
        ),
        (
            "text",
            Stdio::null(),
            Stdio::from(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open("/dev/full")
                    .unwrap(),
            ),
            "cannot write the result",
        ),
    ];
    for (kind, stdin, stdout, says) in cases {
        let out = helper(kind, stdin, stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{kind}: {stderr}");
        assert!(stderr.contains(says), "{kind}: {stderr}");
    }
}
