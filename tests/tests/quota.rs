//! Quota-aware concurrency: the fleet shares one budget per provider through Redis. Worker processes against the
//! fake providers' enforced limits use nearly all of them with almost no 429, take up a killed replica's share,
//! and one provider's cool-down never slows another. The limiter's pause, probe, resume, daily budget and
//! deferral are checked against the real Redis.

use std::time::{Duration, Instant};

use tests::{
    WorkerProcess,
    fake::{FakeConfig, FakeProviders, LlamaParseConfig, OpenAiConfig, Stats, Window},
    settings, unique_prefix, wait_for, wait_ready,
};
use upload_pipeline::{
    Settings,
    providers::ProviderError,
    quota::{Limit, Quota},
    settings::{EmbedderKind, ParserKind, Secret},
};
use uuid::Uuid;

/// The two load runs measure utilisation: they take turns, so neither competes with the other for the CPU.
static LOAD_RUN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WORDS: &[&str] = &[
    "harbour", "lantern", "keeper", "granite", "tide", "beacon", "signal", "storm", "reef",
    "channel", "pilot", "vessel", "current", "shoal", "lens", "mirror", "tower", "gale", "anchor",
    "compass", "honey", "comb", "nectar", "forager", "colony", "queen", "drone", "pollen",
    "clover", "meadow",
];

/// A text of about `tokens` cl100k tokens, unique to (`doc`, `tag`).
fn text(tag: &str, doc: usize, tokens: usize) -> String {
    let mut out = String::new();
    let mut i = doc * 7919;
    for para in 0..tokens / 60 {
        out.push_str(&format!("{tag} document {doc} paragraph {para}:"));
        for _ in 0..50 {
            i = i.wrapping_mul(1_103_515_245).wrapping_add(12_345) % 2_147_483_648;
            out.push(' ');
            out.push_str(WORDS[i % WORDS.len()]);
        }
        out.push_str(".\n\n");
    }
    out
}

fn fake_keys() -> FakeConfig {
    FakeConfig {
        openai: OpenAiConfig {
            keys: vec!["sk-test".into()],
            ..Default::default()
        },
        llamaparse: LlamaParseConfig {
            keys: vec!["llx-test".into()],
            ..Default::default()
        },
    }
}

fn base(prefix: &str, fake: &FakeProviders) -> Settings {
    let mut s = settings(&unique_prefix(prefix), &tests::redis_url());
    s.embedding.embedder = EmbedderKind::Openai;
    s.embedding.model = "text-embedding-3-small".into();
    s.embedding.dimensions = 384;
    s.embedding.openai.base_url = fake.openai_url();
    s.embedding.openai.api_key = Secret("sk-test".into());
    s.parsing.llamaparse.base_url = fake.url.clone();
    s.parsing.llamaparse.api_key = Secret("llx-test".into());
    s.parsing.llamaparse.poll_interval = Duration::from_millis(50);
    s.parsing.llamaparse.poll_interval_max = Duration::from_millis(200);
    s.queue.reclaim_after = Duration::from_secs(5);
    s
}

/// Waits until the first call reached the fake; returns that moment and the stats then.
async fn first_call(fake: &FakeProviders, seen: fn(&Stats) -> u64) -> (Instant, Stats) {
    wait_for(
        "the first provider call",
        Duration::from_secs(120),
        || async {
            let st = fake.stats().await;
            (seen(&st) > 0).then(|| (Instant::now(), st))
        },
    )
    .await
}

async fn sleep_until(t: Instant) {
    tokio::time::sleep_until(t.into()).await;
}

async fn failed_documents(db: &tests::TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM upload_pipeline.documents WHERE status = 'failed'")
        .fetch_one(&db.admin)
        .await
        .unwrap()
}

/// The load schedule: from the first call, kill one worker at 60 s; the stats at the first call, 90 s and 120 s.
async fn load_run(
    fake: &FakeProviders,
    workers: &[WorkerProcess],
    seen: fn(&Stats) -> u64,
) -> (Stats, Stats, Stats) {
    let (t0, s0) = first_call(fake, seen).await;
    sleep_until(t0 + Duration::from_secs(60)).await;
    workers[0].signal("KILL");
    sleep_until(t0 + Duration::from_secs(90)).await;
    let s90 = fake.stats().await;
    sleep_until(t0 + Duration::from_secs(120)).await;
    (s0, s90, fake.stats().await)
}

/// The acceptance bar of a load run: 85 % of the binding limit over the run and in the 30 s after the kill, at
/// most 1 % of requests answered 429, no failed document.
async fn assert_load_bar(db: &tests::TestDb, utilisation: f64, tail: f64, limited: f64) {
    assert!(
        utilisation >= 0.85,
        "used {:.1} % of the binding limit",
        utilisation * 100.0
    );
    assert!(
        tail >= 0.85,
        "the survivors used {:.1} % in the 30 s after the kill",
        tail * 100.0
    );
    assert!(limited <= 0.01, "{:.2} % answered 429", limited * 100.0);
    assert_eq!(failed_documents(db).await, 0);
}

/// Writes the figures where `make bench-quota` asked for them.
fn report(name: &str, figures: serde_json::Value) {
    println!("{name}: {figures}");
    if let Ok(path) = std::env::var("QUOTA_BENCH_OUT") {
        let mut all: serde_json::Value = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_else(|| serde_json::json!({}));
        all[name] = figures;
        std::fs::write(&path, serde_json::to_string_pretty(&all).unwrap()).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_embed_workers_share_the_openai_limits_use_them_and_absorb_a_killed_replica() {
    let _turn = LOAD_RUN.lock().await;
    const RPM: u64 = 600;
    const TPM: u64 = 200_000;
    let mut config = fake_keys();
    config.openai.requests = Some(Window {
        limit: RPM,
        window_ms: 60_000,
    });
    config.openai.tokens = Some(Window {
        limit: TPM,
        window_ms: 60_000,
    });
    let fake = FakeProviders::start(config).await;
    let mut s = base("quota-openai", &fake);
    s.quota.openai.requests_per_minute = RPM;
    s.quota.openai.tokens_per_minute = TPM;
    s.worker.concurrency.embed = 16;
    s.embedding.batch_size = 16;
    s.chunking.max_tokens = 64;
    s.chunking.overlap_tokens = 8;
    let (db, api) = tests::start_api(&mut s).await;
    let client = api.client(&s, Uuid::new_v4());
    // About 540,000 tokens: more than two minutes of the token budget.
    for doc in 0..120 {
        client
            .upload_bytes(&format!("load-{doc}.txt"), text("load", doc, 4_500), None)
            .await
            .unwrap();
    }
    let workers: Vec<WorkerProcess> = (0..4)
        .map(|_| WorkerProcess::start(&s, "parse,chunk,embed"))
        .collect();

    let (s0, s90, s120) = load_run(&fake, &workers, |st| st.embedding_requests).await;

    let minutes = 2.0;
    let tokens = (s120.embedded_tokens - s0.embedded_tokens) as f64;
    let requests = (s120.embedding_requests - s0.embedding_requests) as f64;
    let admitted = requests - (s120.rate_limited - s0.rate_limited) as f64;
    let utilisation = (tokens / (TPM as f64 * minutes)).max(admitted / (RPM as f64 * minutes));
    let tail = ((s120.embedded_tokens - s90.embedded_tokens) as f64 / (TPM as f64 * 0.5))
        .max((s120.embedding_requests - s90.embedding_requests) as f64 / (RPM as f64 * 0.5));
    let limited = (s120.rate_limited - s0.rate_limited) as f64 / requests.max(1.0);
    report(
        "openai",
        serde_json::json!({
            "workers": 4, "concurrency": 16, "rpm": RPM, "tpm": TPM, "seconds": 120,
            "requests": requests, "tokens": tokens,
            "utilisation": utilisation, "utilisation_after_kill": tail, "ratio_429": limited,
        }),
    );
    assert_load_bar(&db, utilisation, tail, limited).await;
    drop(workers);
    tests::teardown(api, &s, db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_parse_workers_share_the_llamaparse_upload_window_and_absorb_a_killed_replica() {
    let _turn = LOAD_RUN.lock().await;
    const UPLOADS: u64 = 10;
    let mut config = fake_keys();
    config.llamaparse.uploads = Some(Window {
        limit: UPLOADS,
        window_ms: 10_000,
    });
    config.llamaparse.job_duration = tests::fake::Latency::fixed(100.0);
    let fake = FakeProviders::start(config).await;
    let mut s = base("quota-llamaparse", &fake);
    s.parsing.parser = ParserKind::Llamaparse;
    s.embedding.embedder = EmbedderKind::Hashing;
    s.embedding.model = "hashing-v1".into();
    s.quota.llamaparse.uploads = UPLOADS;
    s.quota.llamaparse.window = Duration::from_secs(10);
    s.worker.concurrency.parse = 4;
    let (db, api) = tests::start_api(&mut s).await;
    let client = api.client(&s, Uuid::new_v4());
    for doc in 0..140 {
        let html = format!(
            "<html><body><h1>Report {doc}</h1><p>{}</p></body></html>",
            text("parse", doc, 120)
        );
        client
            .upload_bytes(&format!("parse-{doc}.html"), html.into_bytes(), None)
            .await
            .unwrap();
    }
    let workers: Vec<WorkerProcess> = (0..4)
        .map(|_| WorkerProcess::start(&s, "parse,chunk,embed"))
        .collect();
    let (s0, s90, s120) = load_run(&fake, &workers, |st| st.parse_uploads).await;

    let admitted = (s120.parse_uploads_admitted - s0.parse_uploads_admitted) as f64;
    let utilisation = admitted / (UPLOADS as f64 * 12.0);
    let tail =
        (s120.parse_uploads_admitted - s90.parse_uploads_admitted) as f64 / (UPLOADS as f64 * 3.0);
    let tried = (s120.parse_uploads - s0.parse_uploads) as f64;
    let limited = (s120.rate_limited - s0.rate_limited) as f64 / tried.max(1.0);
    report(
        "llamaparse",
        serde_json::json!({
            "workers": 4, "concurrency": 4, "uploads_per_10s": UPLOADS, "seconds": 120,
            "uploads": admitted, "utilisation": utilisation, "utilisation_after_kill": tail, "ratio_429": limited,
        }),
    );
    assert_load_bar(&db, utilisation, tail, limited).await;
    drop(workers);
    tests::teardown(api, &s, db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_llamaparse_cool_down_does_not_slow_embedding() {
    let fake = FakeProviders::start(fake_keys()).await;
    let mut s = base("quota-isolation", &fake);
    s.parsing.parser = ParserKind::Llamaparse;
    let (db, api) = tests::start_api(&mut s).await;
    // LlamaParse is told to wait a minute, fleet-wide.
    let quota = Quota::connect(&s).await.unwrap();
    let llama = quota.budget(
        "llamaparse",
        &s.parsing.llamaparse.tier,
        "llx-test",
        vec![Limit {
            name: "uploads",
            limit: 50.0,
            window: Duration::from_secs(10),
        }],
        4,
    );
    llama.cool_down(Some(Duration::from_secs(60))).await;
    let _worker = WorkerProcess::start(&s, "parse,chunk,embed");
    let client = api.client(&s, Uuid::new_v4());
    let html = client
        .upload_bytes(
            "waits.html",
            b"<p>LlamaParse is cooling down.</p>".to_vec(),
            None,
        )
        .await
        .unwrap()
        .document_id;
    let mut texts = Vec::new();
    for doc in 0..3 {
        texts.push(
            client
                .upload_bytes(&format!("local-{doc}.md"), text("isolated", doc, 600), None)
                .await
                .unwrap()
                .document_id,
        );
    }
    // Markdown is parsed locally and embedded through OpenAI: untouched by LlamaParse's cool-down.
    wait_ready(&client, &texts, Duration::from_secs(30)).await;
    let waiting = client.status(html).await.unwrap();
    assert!(
        ["queued", "parsing"].contains(&waiting.status.as_str()),
        "{waiting:?}"
    );
    assert_eq!(fake.stats().await.parse_uploads, 0);
    tests::teardown(api, &s, db).await;
}

#[tokio::test]
async fn pauses_probe_resume_defer_and_stop_at_the_daily_budget() {
    let mut s = settings(&unique_prefix("quota-unit"), &tests::redis_url());
    s.pipeline.quota_wait = Duration::from_millis(300);
    s.quota.max_wait = Duration::from_millis(200);
    let quota = Quota::connect(&s).await.unwrap();
    let limits = vec![Limit {
        name: "requests",
        limit: 20.0,
        window: Duration::from_secs(60),
    }];
    let budget = quota.budget("openai", "m", "sk-a", limits.clone(), 4);

    // The burst is 1 request (2 % of 20, at least one); the refill is one every 3 s: the next call would wait
    // longer than max_wait, so it is deferred with the time its slot comes.
    let first = budget.acquire(&[("requests", 1.0)]).await.unwrap();
    budget.settle(first, &[], &[], 0).await;
    match budget.acquire(&[("requests", 1.0)]).await.unwrap_err() {
        ProviderError::Throttled { retry_after, .. } => {
            assert!(retry_after > Duration::from_millis(200), "{retry_after:?}")
        }
        other => panic!("{other:?}"),
    }

    // Another key has a budget of its own; a fleet-wide cool-down on it delays its next call.
    let other = quota.budget("openai", "m", "sk-b", limits.clone(), 4);
    other.cool_down(Some(Duration::from_millis(150))).await;
    let started = Instant::now();
    let p = other.acquire(&[("requests", 1.0)]).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "waited out the cool-down"
    );
    other.settle(p, &[], &[], 0).await;

    // Out of quota: paused fleet-wide, then one probe per quota_wait; its success ends the pause.
    let fresh = quota.budget("openai", "m2", "sk-c", limits.clone(), 4);
    fresh.pause("insufficient_quota").await;
    assert!(matches!(
        fresh.acquire(&[("requests", 1.0)]).await.unwrap_err(),
        ProviderError::QuotaExhausted { .. }
    ));
    let probe = wait_for("the probe slot", Duration::from_secs(5), || async {
        fresh.acquire(&[("requests", 1.0)]).await.ok()
    })
    .await;
    fresh.settle(probe, &[], &[], 0).await;
    let after = quota.budget("openai", "m3", "sk-d", limits.clone(), 4);
    after
        .acquire(&[("requests", 1.0)])
        .await
        .expect("the pause is over");

    // An operator can end a pause too.
    fresh.pause("insufficient_quota").await;
    assert!(quota.resume("openai").await.unwrap());
    assert!(!quota.resume("openai").await.unwrap());

    // The daily budget: past it, calls stop until the next day.
    let mut daily = s.clone();
    daily.quota.openai.daily_tokens = 100;
    let quota = Quota::connect(&daily).await.unwrap();
    let spend = quota.budget("openai", "m4", "sk-e", Vec::new(), 4);
    spend.add_spent(100).await;
    match spend.acquire(&[("tokens", 1.0)]).await.unwrap_err() {
        ProviderError::QuotaExhausted { message, .. } => {
            assert!(message.contains("today"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let report = quota.report().await.unwrap();
    assert!(
        report
            .iter()
            .any(|r| r.key.starts_with("openai:spent:") && r.value == "100"),
        "{report:?}"
    );
    tests::cleanup(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_its_redis_gone_the_limiter_lets_calls_through_and_resumes_with_redis() {
    let mut redis = tests::RedisServer::start().await;
    let mut s = settings(&unique_prefix("quota-down"), &redis.url());
    s.quota.max_wait = Duration::from_secs(30);
    s.quota.openai.daily_tokens = 1_000_000;
    let quota = Quota::connect(&s).await.unwrap();
    let limits = vec![Limit {
        name: "requests",
        limit: 60.0,
        window: Duration::from_secs(60),
    }];
    let budget = quota.budget("openai", "m", "sk-secret-key", limits, 4);
    // What an operator's log shows of a budget: the bucket and its limits, never the key.
    let shown = format!("{budget:?} {quota:?}");
    assert!(
        shown.contains("requests") && shown.contains("quota"),
        "{shown}"
    );
    assert!(!shown.contains("sk-secret-key"), "{shown}");

    // About one request a second: the fourth reservation in a row is more than 2 s out, so it sleeps
    // unreserved first and asks again; all four are granted, none deferred.
    let mut permits = Vec::new();
    for _ in 0..4 {
        permits.push(budget.acquire(&[("requests", 1.0)]).await.unwrap());
    }
    for p in permits {
        budget
            .settle(p, &[("requests", 1.0)], &[("requests", 50.0)], 10)
            .await;
    }
    let buckets = quota.report().await.unwrap();
    assert!(
        buckets
            .iter()
            .any(|b| b.key.starts_with("openai:spent:") && b.value == "40"),
        "today's spend is counted: {buckets:?}"
    );

    // Redis gone: every call goes through at once (the provider's own 429s still slow the fleet), and settling,
    // spending, cooling down and pausing only log.
    redis.stop();
    let permit = tokio::time::timeout(
        Duration::from_secs(60),
        budget.acquire(&[("requests", 1.0)]),
    )
    .await
    .expect("acquire answers without Redis")
    .expect("a call goes through without Redis");
    budget.settle(permit, &[], &[("requests", 10.0)], 5).await;
    let before = budget.concurrency();
    let permit = budget.acquire(&[("requests", 1.0)]).await.unwrap();
    let rate_limited = ProviderError::RateLimited {
        provider: "openai",
        message: "slow down".into(),
        retry_after: Some(Duration::from_millis(500)),
    };
    budget.settle_error(permit, &rate_limited).await;
    assert!(
        budget.concurrency() < before,
        "a 429 halves this process's concurrency even without Redis"
    );
    let permit = budget.acquire(&[("requests", 1.0)]).await.unwrap();
    let out_of_quota = ProviderError::QuotaExhausted {
        provider: "openai",
        message: "insufficient_quota".into(),
    };
    budget.settle_error(permit, &out_of_quota).await;

    // Redis back (empty, as after a crash): the pause never reached it, and the budget works as before.
    redis.restart().await;
    let permit = wait_for(
        "the budget with Redis back",
        Duration::from_secs(30),
        || async { budget.acquire(&[("requests", 1.0)]).await.ok() },
    )
    .await;
    budget.settle(permit, &[], &[], 0).await;
    assert!(!quota.is_paused("openai").await.unwrap());
}
