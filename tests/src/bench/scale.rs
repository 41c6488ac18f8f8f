//! The `scale` scenario (also `make bench-scale`): 1, 2 and 4 embed worker processes against a fake OpenAI that answers every request after a fixed
//! latency and enforces no limit, then 4 processes under a fleet-wide quota.
//!
//! Each run uploads the same documents, lets one `parse,chunk` worker bring them all to `embedding` (one embed
//! job each), stops it, and only then starts the embed workers: the time from the first embedding request to
//! the last document ready is the embed stage's alone. Targets: 1.8x the one-process throughput at 2
//! processes and 3.2x at 4; under the quota, the steady request rate at the quota (95 % or more, never above).

use std::time::{Duration, Instant};

use crate::{
    WorkerProcess,
    fake::{FakeConfig, FakeProviders, Latency, OpenAiConfig, Window},
    settings, unique_prefix, wait_for,
};
use upload_pipeline::settings::{EmbedderKind, Secret};
use uuid::Uuid;

/// Documents per run by default, one chunk (and so one embed job and one request) each.
pub const DOCS: usize = 240;
/// The fake's answer time: with `SLOTS` jobs at once a process can do SLOTS / LATENCY requests a second.
const LATENCY_MS: f64 = 400.0;
/// Embed jobs one process runs at once.
const SLOTS: usize = 4;
/// Runs per process count by default; the median is reported with the spread.
pub const REPEATS: usize = 3;

struct Run {
    docs: usize,
    fake: FakeProviders,
    app: crate::TestApp,
}

async fn count(db: &crate::TestDb, status: &str) -> usize {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM upload_pipeline.documents WHERE status = $1")
        .bind(status)
        .fetch_one(&db.admin)
        .await
        .unwrap() as usize
}

/// Test settings of their own (`name`) that embed with `fake`'s OpenAI, with `key`, at 384 dimensions.
fn embedding_by(fake: &FakeProviders, name: &str, key: &str) -> upload_pipeline::Settings {
    let mut s = settings(&unique_prefix(name), &crate::redis_url());
    s.embedding.embedder = EmbedderKind::Openai;
    s.embedding.model = "text-embedding-3-small".into();
    s.embedding.dimensions = 384;
    s.embedding.openai.base_url = fake.openai_url();
    s.embedding.openai.api_key = Secret(key.into());
    s
}

/// Uploads `docs` documents and brings them all to the embed stage, with no embed worker running.
async fn prepare(name: &str, requests_per_minute: u64, docs: usize) -> Run {
    let mut config = FakeConfig {
        openai: OpenAiConfig {
            keys: vec!["sk-scale".into()],
            latency: Latency::fixed(LATENCY_MS),
            ..Default::default()
        },
        ..Default::default()
    };
    if requests_per_minute > 0 {
        config.openai.requests = Some(Window {
            limit: requests_per_minute,
            window_ms: 60_000,
        });
    }
    let fake = FakeProviders::start(config).await;
    let mut s = embedding_by(&fake, name, "sk-scale");
    s.worker.concurrency.embed = SLOTS;
    s.quota.openai.requests_per_minute = requests_per_minute;
    s.quota.openai.tokens_per_minute = 0;
    let app = crate::TestApp::spawn(s).await;
    let client = app.client(Uuid::new_v4());
    for doc in 0..docs {
        let text = format!(
            "Scale document {doc}. The keeper of lighthouse {doc} logs the tide, the wind and every vessel \
             that passes the reef before dawn."
        );
        client
            .upload_bytes(&format!("scale-{doc}.txt"), text, None)
            .await
            .unwrap();
    }
    let mut front = WorkerProcess::start(&app.settings, "parse,chunk");
    wait_for(
        "every document at the embed stage",
        Duration::from_secs(300),
        || async { (count(&app.db, "embedding").await == docs).then_some(()) },
    )
    .await;
    front.signal("TERM");
    front.wait_exit(Duration::from_secs(60)).await;
    Run { docs, fake, app }
}

/// Starts `processes` embed workers; returns them and the moment the first embedding request arrived.
async fn start_embed(run: &Run, processes: usize) -> (Vec<WorkerProcess>, Instant) {
    let workers: Vec<WorkerProcess> = (0..processes)
        .map(|_| WorkerProcess::start(&run.app.settings, "embed"))
        .collect();
    let t0 = wait_for(
        "the first embedding request",
        Duration::from_secs(120),
        || async { (run.fake.stats().await.embedding_requests > 0).then(Instant::now) },
    )
    .await;
    (workers, t0)
}

/// Starts `processes` embed workers; returns the seconds from the first request to the last document ready.
async fn embed_all(run: &Run, processes: usize) -> (f64, Vec<WorkerProcess>) {
    let (workers, t0) = start_embed(run, processes).await;
    wait_for("every document ready", Duration::from_secs(600), || async {
        (count(&run.app.db, "ready").await == run.docs).then_some(())
    })
    .await;
    (t0.elapsed().as_secs_f64(), workers)
}

async fn finish(run: Run, workers: Vec<WorkerProcess>) {
    drop(workers);
    assert_eq!(count(&run.app.db, "failed").await, 0);
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// 1, 2 and 4 embed processes, `repeats` runs of `docs` documents each, then 4 under a quota of 120 requests a
/// minute. Returns the figures `make bench-scale` and `make bench` report; the targets are the caller's to check.
pub async fn scale_out(docs: usize, repeats: usize) -> serde_json::Value {
    let mut rows = Vec::new();
    let mut medians = Vec::new();
    for processes in [1usize, 2, 4] {
        let mut rates = Vec::new();
        for repeat in 0..repeats {
            let run = prepare(&format!("scale-{processes}-{repeat}"), 0, docs).await;
            let (seconds, workers) = embed_all(&run, processes).await;
            rates.push(docs as f64 / seconds);
            finish(run, workers).await;
        }
        let (low, high) = (
            rates.iter().cloned().fold(f64::INFINITY, f64::min),
            rates.iter().cloned().fold(0.0, f64::max),
        );
        let m = median(&mut rates);
        medians.push(m);
        rows.push(serde_json::json!({
            "processes": processes, "jobs_per_second_median": m, "min": low, "max": high,
            "runs": rates, "speedup": m / medians[0],
        }));
    }

    // Under a quota of 120 requests a minute (2 a second, a tenth of what 4 processes could send): the rate from
    // 15 s after the first request (past the bucket's initial burst) to 45 s.
    const RPM: u64 = 120;
    // Enough documents to keep 4 processes busy past 45 s at the quota.
    let run = prepare("scale-quota", RPM, docs.max(120)).await;
    let (workers, t0) = start_embed(&run, 4).await;
    // Admitted requests, sampled every 500 ms from the first request: the plot of use against the limit.
    let mut timeline = Vec::new();
    let (mut a, mut b) = (None, None);
    for tick in 0..=90u64 {
        tokio::time::sleep_until((t0 + Duration::from_millis(500 * tick)).into()).await;
        let stats = run.fake.stats().await;
        timeline.push(serde_json::json!([
            tick as f64 / 2.0,
            stats.embedding_requests - stats.rate_limited
        ]));
        match tick {
            30 => a = Some(stats),
            90 => b = Some(stats),
            _ => {}
        }
    }
    let (a, b) = (a.expect("sampled at 15 s"), b.expect("sampled at 45 s"));
    let admitted = (b.embedding_requests - a.embedding_requests) as f64
        - (b.rate_limited - a.rate_limited) as f64;
    let rate = admitted / 30.0;
    let quota = RPM as f64 / 60.0;
    let limited = b.rate_limited as f64 / (b.embedding_requests as f64).max(1.0);
    // The documents left would finish at the quota's pace; the figures are taken.
    drop(workers);
    drop(run);

    serde_json::json!({
        "docs_per_run": docs, "latency_ms": LATENCY_MS, "slots_per_process": SLOTS, "repeats": repeats,
        "unlimited": rows,
        "quota": {
            "processes": 4, "requests_per_minute": RPM, "steady_requests_per_second": rate,
            "quota_requests_per_second": quota, "utilisation": rate / quota, "ratio_429": limited,
            "admitted_timeline": timeline,
        },
    })
}

/// Documents at one of `statuses`.
async fn passed(db: &crate::TestDb, statuses: &[&str]) -> usize {
    let mut done = 0;
    for status in statuses {
        done += count(db, status).await;
    }
    done
}

/// Seconds between the moments 10 % and 90 % of the documents reached `status` (or a later one), polled every
/// 50 ms: the steady rate of one stage, without its process's start-up and its last stragglers.
async fn stage_window(db: &crate::TestDb, later: &[&str], docs: usize) -> f64 {
    let (low, high) = (docs / 10, docs * 9 / 10);
    let mut t10 = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = passed(db, later).await;
        if t10.is_none() && done >= low {
            t10 = Some(Instant::now());
        }
        if done >= high
            && let Some(t) = t10
        {
            return t.elapsed().as_secs_f64();
        }
        assert!(
            Instant::now() < deadline,
            "the stage did not finish: {done} of {docs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CPU time (user and system) a process and its finished children (the parse helpers) have used so far, from
/// /proc (in USER_HZ ticks: 100 a second on Linux).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // The fields after the command name (which may hold spaces, hence the last ')'): utime, stime, cutime and
    // cstime are the 12th to the 15th.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11..15]
        .iter()
        .map(|f| f.parse::<f64>().unwrap())
        .sum::<f64>()
        / 100.0
}

async fn redis_commands(s: &upload_pipeline::Settings) -> u64 {
    super::fleet::redis_commands(s)
        .await
        .expect("INFO stats of the Redis server")
}

/// (transactions committed, rows inserted, rows updated, rows deleted) of the test's database.
async fn pg_writes(db: &crate::TestDb) -> [i64; 4] {
    let pool = sqlx::PgPool::connect(&format!("{}/postgres", crate::pg_server()))
        .await
        .unwrap();
    let row: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database WHERE datname = $1",
    )
    .bind(&db.name)
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    [row.0, row.1, row.2, row.3]
}

/// One worker process per stage, alone, over 150 Markdown documents of six chunks: documents a second and CPU per
/// document of each stage, and what a document costs in Redis commands, Postgres writes and bytes.
pub async fn capacity() -> serde_json::Value {
    const DOCS: usize = 150;
    let fake = FakeProviders::start(FakeConfig {
        openai: OpenAiConfig {
            keys: vec!["sk-capacity".into()],
            latency: Latency::fixed(0.0),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let mut s = embedding_by(&fake, "capacity", "sk-capacity");
    s.quota.openai.requests_per_minute = 0;
    s.quota.openai.tokens_per_minute = 0;
    let db = crate::TestDb::create(&mut s).await;
    let api = crate::Api::start(&s).await;
    let client = api.client(&s, Uuid::new_v4());
    let redis0 = redis_commands(&s).await;
    let pg0 = pg_writes(&db).await;
    // Markdown of about 3,000 tokens each: six chunks at the default 512 tokens.
    for doc in 0..DOCS {
        let mut text = format!("# Harbour log {doc}\n\n");
        for section in 0..12 {
            text.push_str(&format!("## Watch {section}\n\n"));
            for line in 0..6 {
                text.push_str(&format!(
                    "At bell {line} of watch {section} the keeper of harbour {doc} noted the tide at the \
                     breakwater, the wind over the reef, the lamp's oil and the vessels waiting for the pilot. "
                ));
            }
            text.push_str("\n\n");
        }
        client
            .upload_bytes(&format!("capacity-{doc}.md"), text, None)
            .await
            .unwrap();
    }
    let mut figures = serde_json::Map::new();
    for (stage, later) in [
        ("parse", &["chunking", "embedding", "ready"][..]),
        ("chunk", &["embedding", "ready"][..]),
        ("embed", &["ready"][..]),
    ] {
        let mut worker = WorkerProcess::start(&s, stage);
        let seconds = stage_window(&db, later, DOCS).await;
        // A loop rather than `wait_for` with a closure: the closure's future, borrowing `db` and `later`, is Send
        // only for some lifetimes, and the optimised build of the bench binary cannot spawn the scenario then.
        let deadline = Instant::now() + Duration::from_secs(300);
        while passed(&db, later).await < DOCS {
            assert!(
                Instant::now() < deadline,
                "timed out after 300 s waiting for the stage to finish"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cpu = cpu_seconds(worker.pid());
        worker.signal("TERM");
        worker.wait_exit(Duration::from_secs(60)).await;
        let rate = (DOCS * 8 / 10) as f64 / seconds;
        figures.insert(
            stage.into(),
            serde_json::json!({
                "documents_per_second": rate,
                "cpu_ms_per_document": cpu * 1000.0 / DOCS as f64,
            }),
        );
    }
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM upload_pipeline.document_chunks")
        .fetch_one(&db.admin)
        .await
        .unwrap();
    assert_eq!(count(&db, "ready").await, DOCS);
    let redis1 = redis_commands(&s).await;
    // Storage: the chunks table with its indexes (HNSW among them) and TOAST, per chunk; the whole schema per
    // document.
    let (chunk_bytes, schema_bytes): (i64, i64) = sqlx::query_as(
        "SELECT pg_total_relation_size('upload_pipeline.document_chunks'), \
                (SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = 'upload_pipeline' AND c.relkind IN ('r', 'm'))",
    )
    .fetch_one(&db.admin)
    .await
    .unwrap();
    api.stop().await;
    // Statistics reach pg_stat_database when a backend flushes them: wait until they stop moving.
    let mut pg1 = pg_writes(&db).await;
    let settle_by = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = pg_writes(&db).await;
        if now == pg1 || Instant::now() > settle_by {
            break;
        }
        pg1 = now;
    }
    let per_doc = |a: i64, b: i64| (b - a) as f64 / DOCS as f64;
    figures.insert(
        "per_document".into(),
        serde_json::json!({
            "chunks": chunks as f64 / DOCS as f64,
            "dimensions": s.embedding.dimensions,
            "chunk_bytes": chunk_bytes as f64 / chunks as f64,
            "postgres_bytes": schema_bytes as f64 / DOCS as f64,
            "redis_commands": (redis1 - redis0) as f64 / DOCS as f64,
            "postgres_transactions": per_doc(pg0[0], pg1[0]),
            "postgres_rows_inserted": per_doc(pg0[1], pg1[1]),
            "postgres_rows_updated": per_doc(pg0[2], pg1[2]),
            "postgres_rows_deleted": per_doc(pg0[3], pg1[3]),
        }),
    );
    crate::cleanup(&s).await;
    serde_json::Value::Object(figures)
}
