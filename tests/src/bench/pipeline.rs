//! The pipeline scenarios: uploads through the API to searchable chunks, with one worker process per stage.
//! `instant`: providers that answer at once, everything uploaded in a burst (what the fleet itself costs).
//! `realistic`: LlamaParse taking 2-8 s a document and OpenAI 100-300 ms a request under tier-1 limits, uploads
//! arriving as a Poisson process at 0.5, 1 and 2 documents a second (what a user waits).

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{
    fleet::{Fleet, Memory, Reading, STAGES, StageTimes, html_document},
    stats::Distribution,
};
use crate::fake::{FakeConfig, Latency, LlamaParseConfig, OpenAiConfig, Window};

/// Per worker process.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerCost {
    /// Its stage.
    pub stage: String,
    /// CPU milliseconds per document.
    pub cpu_ms_per_document: f64,
    /// Memory when idle before the run.
    pub idle: Memory,
    /// Memory after the run, idle again (peak included).
    pub after: Memory,
}

/// Results of `pipeline-instant`.
#[derive(Debug, Clone, Serialize)]
pub struct Instant {
    /// Documents uploaded.
    pub documents: usize,
    /// Chunks they made.
    pub chunks: u64,
    /// Uploads in flight at once.
    pub upload_concurrency: usize,
    /// First upload sent to last document ready, seconds.
    pub seconds: f64,
    /// Documents ready per second.
    pub documents_per_second: f64,
    /// Chunks embedded and stored per second.
    pub chunks_per_second: f64,
    /// Upload request latency, milliseconds.
    pub upload_ms: Distribution,
    /// Upload to queryable, seconds (in a burst: mostly queueing).
    pub upload_to_queryable_seconds: Distribution,
    /// Worker CPU seconds per document, all stages.
    pub cpu_seconds_per_document: f64,
    /// Per worker.
    pub workers: Vec<WorkerCost>,
    /// Redis commands per document (every client: API, workers, their idle polls).
    pub redis_commands_per_document: f64,
    /// Postgres statements per document (API and workers).
    pub postgres_statements_per_document: f64,
    /// Where the time goes, per stage.
    pub stages: Vec<StageTimes>,
    /// Documents ready per second, by second from the first upload.
    pub ready_per_second: Vec<(f64, f64)>,
}

async fn uploads(
    fleet: &Fleet,
    seeds: impl Iterator<Item = u64>,
    concurrency: usize,
) -> Result<Vec<(Uuid, DateTime<Utc>, f64)>> {
    use futures::StreamExt;
    let client = fleet.client.clone();
    let results: Vec<Result<(Uuid, DateTime<Utc>, f64)>> = futures::stream::iter(seeds)
        .map(|seed| {
            let client = client.clone();
            async move {
                let sent = Utc::now();
                let t = std::time::Instant::now();
                let up = client
                    .upload_bytes(
                        &format!("report-{seed}.html"),
                        html_document(seed, 1500),
                        None,
                    )
                    .await
                    .context("upload")?;
                if up.duplicate {
                    bail!("document {seed} was a duplicate: the bench must upload distinct bytes");
                }
                Ok((up.document_id, sent, t.elapsed().as_secs_f64() * 1000.0))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Waits until every one of `ids` is ready (fails on a failed document or after `timeout`); returns ready times
/// and chunk counts.
async fn wait_all_ready(
    fleet: &Fleet,
    ids: &[Uuid],
    timeout: Duration,
) -> Result<Vec<(Uuid, DateTime<Utc>, i32)>> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let failed = fleet.count("failed").await?;
        if failed > 0 {
            bail!("{failed} documents failed");
        }
        let rows = fleet.ready_times(ids).await?;
        if rows.len() == ids.len() && rows.iter().all(|r| r.1.is_some()) {
            return Ok(rows
                .into_iter()
                .map(|(id, at, chunks)| (id, at.expect("checked"), chunks))
                .collect());
        }
        if std::time::Instant::now() > deadline {
            let ready = rows.iter().filter(|r| r.1.is_some()).count();
            bail!(
                "only {ready} of {} documents ready after {timeout:?}",
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Seconds from `from` to `to` (negative when `to` is earlier).
fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(0) as f64 / 1e6
}

fn per_second(times: &[f64], bucket: f64) -> Vec<(f64, f64)> {
    let end = times.iter().copied().fold(0.0, f64::max);
    let buckets = (end / bucket).ceil() as usize + 1;
    let mut counts = vec![0.0; buckets];
    for t in times {
        counts[(t / bucket).floor() as usize] += 1.0;
    }
    counts
        .into_iter()
        .enumerate()
        .map(|(i, c)| ((i as f64 + 0.5) * bucket, c / bucket))
        .collect()
}

fn worker_costs(before: &Reading, after: &Reading, documents: f64) -> Vec<WorkerCost> {
    STAGES
        .iter()
        .enumerate()
        .map(|(i, stage)| WorkerCost {
            stage: stage.to_string(),
            cpu_ms_per_document: (after.cpu_seconds[i] - before.cpu_seconds[i]) * 1000.0
                / documents,
            idle: before.memory[i],
            after: after.memory[i],
        })
        .collect()
}

/// `pipeline-instant`: `documents` HTML documents uploaded `concurrency` at a time to a fleet whose providers
/// answer at once and set no limits (LlamaParse polled every 20 ms, so the poll schedule adds nothing; no quota).
pub async fn instant(documents: usize, concurrency: usize) -> Result<Instant> {
    let fleet = Fleet::start("bench-instant", FakeConfig::default(), |s| {
        s.parsing.llamaparse.poll_interval = Duration::from_millis(20);
        s.parsing.llamaparse.poll_interval_max = Duration::from_millis(20);
        // No provider quota either: the fakes enforce none, and this run measures the fleet, not the account.
        s.quota.llamaparse.uploads = 0;
        s.quota.openai.requests_per_minute = 0;
        s.quota.openai.tokens_per_minute = 0;
    })
    .await?;
    let result = async {
        // Warm-up: one document through every stage (connections, the model's index, the first allocations).
        let warm = uploads(&fleet, std::iter::once(u64::MAX), 1).await?;
        wait_all_ready(&fleet, &[warm[0].0], Duration::from_secs(60)).await?;
        let before = fleet.reading().await?;
        let t0 = Utc::now();
        let sent = uploads(&fleet, 0..documents as u64, concurrency).await?;
        let ids: Vec<Uuid> = sent.iter().map(|s| s.0).collect();
        let ready = wait_all_ready(&fleet, &ids, Duration::from_secs(600)).await?;
        let after = fleet.reading().await?;
        let last = ready.iter().map(|r| r.1).max().context("no documents")?;
        let seconds = seconds_between(t0, last);
        let chunks: u64 = ready.iter().map(|r| r.2 as u64).sum();
        let sent_at: std::collections::HashMap<Uuid, DateTime<Utc>> =
            sent.iter().map(|s| (s.0, s.1)).collect();
        let latencies: Vec<f64> = ready
            .iter()
            .map(|r| seconds_between(sent_at[&r.0], r.1))
            .collect();
        let offsets: Vec<f64> = ready
            .iter()
            .map(|r| seconds_between(t0, r.1).max(0.0))
            .collect();
        let n = documents as f64;
        let workers = worker_costs(&before, &after, n);
        Ok(Instant {
            documents,
            chunks,
            upload_concurrency: concurrency,
            seconds,
            documents_per_second: n / seconds,
            chunks_per_second: chunks as f64 / seconds,
            upload_ms: Distribution::of(&sent.iter().map(|s| s.2).collect::<Vec<_>>()),
            upload_to_queryable_seconds: Distribution::of(&latencies),
            cpu_seconds_per_document: workers.iter().map(|w| w.cpu_ms_per_document).sum::<f64>()
                / 1000.0,
            workers,
            redis_commands_per_document: (after.redis_commands - before.redis_commands) as f64 / n,
            postgres_statements_per_document: (after.pg_statements - before.pg_statements) as f64
                / n,
            stages: fleet.stage_times(&ids).await?,
            ready_per_second: per_second(&offsets, 1.0),
        })
    }
    .await;
    fleet.stop().await;
    result
}

/// One offered rate of `pipeline-realistic`.
#[derive(Debug, Clone, Serialize)]
pub struct RealisticRate {
    /// Documents a second offered (Poisson arrivals).
    pub offered_per_second: f64,
    /// Seconds uploads were offered (the Poisson arrivals' span).
    pub seconds: f64,
    /// Documents uploaded.
    pub documents: usize,
    /// Documents ready per second over the window and its drain.
    pub completed_per_second: f64,
    /// Upload to queryable, seconds.
    pub upload_to_queryable_seconds: Distribution,
    /// The raw latencies, seconds (for the plot).
    pub latencies: Vec<f64>,
    /// Share of OpenAI's request limit used over the window.
    pub openai_request_utilisation: f64,
    /// Share of OpenAI's token limit used over the window.
    pub openai_token_utilisation: f64,
    /// Share of LlamaParse's upload limit used over the window.
    pub llamaparse_upload_utilisation: f64,
    /// Provider requests answered 429.
    pub rate_limited: u64,
    /// Provider requests made (embedding requests and parse uploads).
    pub provider_requests: u64,
    /// Where the time goes, per stage.
    pub stages: Vec<StageTimes>,
    /// Uploads a second, in 10 s buckets from the window's start.
    pub offered_rate_10s: Vec<(f64, f64)>,
    /// Documents ready a second, in 10 s buckets.
    pub ready_rate_10s: Vec<(f64, f64)>,
}

/// Results of `pipeline-realistic`.
#[derive(Debug, Clone, Serialize)]
pub struct Realistic {
    /// The fakes' behaviour.
    pub providers: String,
    /// The fleet's settings that matter here.
    pub fleet: String,
    /// Per offered rate.
    pub rates: Vec<RealisticRate>,
    /// Worker memory at the end, idle.
    pub workers_after: Vec<(String, Memory)>,
}

/// The tier-1 limits the fakes enforce and the fleet is told of.
const RPM: u64 = 3000;
const TPM: u64 = 1_000_000;
const LLAMA_UPLOADS_PER_10S: u64 = 50;

/// `pipeline-realistic`: `documents` offered at each rate of `rates` (Poisson arrivals), one rate after the other
/// on the same fleet.
pub async fn realistic(rates: &[f64], documents: usize, seed: u64) -> Result<Realistic> {
    let config = FakeConfig {
        openai: OpenAiConfig {
            latency: Latency::between(100.0, 300.0),
            requests: Some(Window {
                limit: RPM,
                window_ms: 60_000,
            }),
            tokens: Some(Window {
                limit: TPM,
                window_ms: 60_000,
            }),
            ..Default::default()
        },
        llamaparse: LlamaParseConfig {
            latency: Latency::lognormal(60.0, 250.0),
            job_duration: Latency::between(2000.0, 8000.0),
            uploads: Some(Window {
                limit: LLAMA_UPLOADS_PER_10S,
                window_ms: 10_000,
            }),
            ..Default::default()
        },
    };
    let fleet = Fleet::start("bench-realistic", config, |_| {}).await?;
    let providers = "LlamaParse: jobs done 2-8 s (uniform) after upload, HTTP answers 60 ms median / 250 ms p99, \
                     50 uploads per 10 s; OpenAI: 100-300 ms (uniform) per request, 3,000 requests and 1,000,000 \
                     tokens a minute enforced (tier 1)"
        .to_owned();
    let s = &fleet.settings;
    let fleet_desc = format!(
        "one worker per stage; concurrency parse {}, chunk {}, embed {}; LlamaParse polled after {:?}, growing by \
         that much to {:?}; quotas {} rpm / {} tpm / {} uploads per {:?}",
        s.worker.concurrency.parse,
        s.worker.concurrency.chunk,
        s.worker.concurrency.embed,
        s.parsing.llamaparse.poll_interval,
        s.parsing.llamaparse.poll_interval_max,
        s.quota.openai.requests_per_minute,
        s.quota.openai.tokens_per_minute,
        s.quota.llamaparse.uploads,
        s.quota.llamaparse.window,
    );
    let result = async {
        let mut out = Vec::new();
        for (r, &rate) in rates.iter().enumerate() {
            out.push(offer(&fleet, rate, documents, seed + r as u64 * 1_000_000).await?);
        }
        Ok::<_, anyhow::Error>(out)
    }
    .await;
    let workers_after = match fleet.reading().await {
        Ok(r) => STAGES.iter().map(|s| s.to_string()).zip(r.memory).collect(),
        Err(_) => Vec::new(),
    };
    fleet.stop().await;
    Ok(Realistic {
        providers,
        fleet: fleet_desc,
        rates: result?,
        workers_after,
    })
}

async fn offer(fleet: &Fleet, rate: f64, documents: usize, seed: u64) -> Result<RealisticRate> {
    use rand::{Rng, SeedableRng, rngs::SmallRng};
    let mut rng = SmallRng::seed_from_u64(seed);
    // Poisson arrivals: exponential gaps with mean 1/rate, drawn in advance so every run offers the same load.
    let mut at = Vec::with_capacity(documents);
    let mut t = 0.0;
    for _ in 0..documents {
        at.push(t);
        t += -(1.0 - rng.random::<f64>()).ln() / rate;
    }
    let seconds = t;
    let before = fleet.reading().await?;
    let start = tokio::time::Instant::now();
    let t0 = Utc::now();
    let sent = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, offset) in at.iter().enumerate() {
        let (client, sent, offset) = (fleet.client.clone(), sent.clone(), *offset);
        let doc = seed + i as u64;
        tasks.spawn(async move {
            tokio::time::sleep_until(start + Duration::from_secs_f64(offset)).await;
            let when = Utc::now();
            let up = client
                .upload_bytes(
                    &format!("report-{doc}.html"),
                    html_document(doc, 1500),
                    None,
                )
                .await?;
            sent.lock().await.push((up.document_id, when));
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let window_end = fleet.reading().await?;
    let sent = sent.lock().await.clone();
    let ids: Vec<Uuid> = sent.iter().map(|s| s.0).collect();
    let ready = wait_all_ready(fleet, &ids, Duration::from_secs(600)).await?;
    let drained = start.elapsed().as_secs_f64();
    let sent_at: std::collections::HashMap<Uuid, DateTime<Utc>> = sent.iter().copied().collect();
    let latencies: Vec<f64> = ready
        .iter()
        .map(|r| seconds_between(sent_at[&r.0], r.1))
        .collect();
    let secs = |d: DateTime<Utc>| seconds_between(t0, d).max(0.0);
    let window = window_end.at.duration_since(before.at).as_secs_f64();
    let (f0, f1) = (&before.fake, &window_end.fake);
    let per_minute = |x: u64| x as f64 * 60.0 / window;
    let after = fleet.reading().await?;
    Ok(RealisticRate {
        offered_per_second: rate,
        seconds,
        documents: ids.len(),
        completed_per_second: ids.len() as f64 / drained,
        upload_to_queryable_seconds: Distribution::of(&latencies),
        latencies,
        openai_request_utilisation: per_minute(f1.embedding_requests - f0.embedding_requests)
            / RPM as f64,
        openai_token_utilisation: per_minute(f1.embedded_tokens - f0.embedded_tokens) / TPM as f64,
        llamaparse_upload_utilisation: (f1.parse_uploads - f0.parse_uploads) as f64 * 10.0
            / window
            / LLAMA_UPLOADS_PER_10S as f64,
        rate_limited: after.fake.rate_limited - before.fake.rate_limited,
        provider_requests: (after.fake.embedding_requests - before.fake.embedding_requests)
            + (after.fake.parse_uploads - before.fake.parse_uploads),
        stages: fleet.stage_times(&ids).await?,
        offered_rate_10s: per_second(&sent.iter().map(|s| secs(s.1)).collect::<Vec<_>>(), 10.0),
        ready_rate_10s: per_second(&ready.iter().map(|r| secs(r.1)).collect::<Vec<_>>(), 10.0),
    })
}
