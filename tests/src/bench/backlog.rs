//! The `backlog` scenario: a bulk import queued behind the providers' quotas for many reconcile periods, with
//! LlamaParse jobs that outlive `pipeline.reconcile_after`, times scaled down with their ratios kept. It counts
//! the providers' work against the documents' (one paid LlamaParse upload per document, one embedded input per
//! chunk, however often the reconciler finds a waiting stage stale), the share of each binding limit used, and
//! the time to drain.
//!
//! The defaults (each a `bench` option) and the drain they should give:
//! - `pipeline.reconcile_after` 5 s and `reconcile_interval` 1 s (defaults: 30 s and 10 s). LlamaParse jobs take
//!   6-8 s, longer than `reconcile_after`, as a 300-page PDF outlives the default.
//! - LlamaParse admits 60 uploads per 10 s, at the fake and in the fleet's quota. The fleet's bucket refills at
//!   97.5 % of that, 5.85 uploads a second, so the uploads of 1,000 documents alone take about 171 s: 34
//!   `reconcile_after` periods in which queued parse stages look stale to the reconciler.
//! - A 1,500-word HTML page makes about 6.75 chunks of at most 512 tokens, about 3,250 tokens embedded (measured
//!   by `pipeline-instant` and `pipeline-realistic`). Parsed documents arrive at 5.85 a second, about 19,000
//!   tokens a second; 1,000,000 tokens a minute (OpenAI tier 1, refilled by the fleet at 16,250 a second) binds
//!   from the first embedding on, and 3.25 M tokens take about 200 s.
//! - Drain: about 8 s until the first documents are parsed, then the token budget: about 210 s, 42
//!   `reconcile_after` periods. With the fleet's start, the watch for late duplicates and the teardown the
//!   scenario takes about 4 minutes.
//! - Parse concurrency 56: 5.85 uploads a second times about 8 s a job (6-8 s and up to 1.5 s of polling
//!   overshoot) keeps about 46 LlamaParse jobs in flight, so the upload quota binds, not the worker's slots.
//!   Not more: the parse worker's Postgres pool grows with its slots, and the fleet shares one server's 100
//!   connections.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::fleet::{Fleet, StageTimes, html_document};
use crate::fake::{FakeConfig, Latency, LlamaParseConfig, OpenAiConfig, Window};

/// LlamaParse's upload window (LlamaCloud's own: 50 uploads per 10 s per organisation).
pub const UPLOAD_WINDOW: Duration = Duration::from_secs(10);
/// `pipeline.reconcile_after`, scaled down from 30 s.
const RECONCILE_AFTER: Duration = Duration::from_secs(5);
/// `pipeline.reconcile_interval`, scaled down from 10 s.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a LlamaParse job takes from upload to done, milliseconds (uniform): longer than `RECONCILE_AFTER`.
const JOB_MS: (f64, f64) = (6000.0, 8000.0);
/// OpenAI requests a minute (tier 1). About 300 a minute are sent: this limit does not bind.
const RPM: u64 = 3000;
/// Words per document by default: about 6.75 chunks and 3,250 tokens each.
pub const WORDS: usize = 1500;
/// Uploads through the API at once.
pub const UPLOAD_CONCURRENCY: usize = 8;
/// How often the fakes' counters and the documents' states are read.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// How long the counters are still watched once every document has settled: a late copy of a job (a reconciler
/// push, a reclaimed claim) that calls a provider again after its document is ready shows up within two
/// reconcile periods.
const WATCH_AFTER: Duration = Duration::from_secs(10);
/// The span of the trailing rates plotted, seconds.
const TRAILING_SECONDS: f64 = 10.0;

/// The scenario's sizes and limits, each a `bench` option.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Documents uploaded at once.
    pub documents: usize,
    /// Words per document (`WORDS`: about 6.75 chunks; 24,000 make about 64 chunks of 512 tokens, a full embed
    /// batch per document).
    pub words: usize,
    /// LlamaParse uploads admitted per `UPLOAD_WINDOW`, by the fake and by the fleet's quota.
    pub uploads_per_window: u64,
    /// OpenAI tokens a minute, by the fake and by the fleet's quota.
    pub tokens_per_minute: u64,
    /// Parse jobs the parse worker runs at once.
    pub parse_concurrency: usize,
    /// Longest wait for the drain, seconds; past it, what finished is reported.
    pub deadline_seconds: u64,
}

/// One binding limit's use over the span it was busy.
#[derive(Debug, Clone, Serialize)]
pub struct Utilisation {
    /// The limit, units per window.
    pub limit: u64,
    /// The window, seconds.
    pub window_seconds: f64,
    /// Units admitted in all.
    pub used: u64,
    /// Seconds from the first sample that saw a unit admitted to the first that saw the last one.
    pub busy_seconds: f64,
    /// Units admitted per window over the busy span, as a share of the limit.
    pub utilisation: f64,
    /// Seconds `used` takes at exactly the limit: the least the busy span can be.
    pub bound_seconds: f64,
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    /// Seconds from the first upload.
    pub at: f64,
    /// LlamaParse uploads admitted so far.
    pub uploads_admitted: u64,
    /// OpenAI tokens admitted so far.
    pub embedded_tokens: u64,
    /// Documents ready.
    pub ready: u64,
}

/// Results of `backlog`.
#[derive(Debug, Clone, Serialize)]
pub struct Backlog {
    /// What ran.
    pub config: Config,
    /// The fakes' behaviour.
    pub providers: String,
    /// The fleet's settings that matter here.
    pub fleet: String,
    /// `pipeline.reconcile_after`, seconds.
    pub reconcile_after_seconds: f64,
    /// `pipeline.reconcile_interval`, seconds.
    pub reconcile_interval_seconds: f64,
    /// Documents stored (every upload, none a duplicate).
    pub documents: u64,
    /// Seconds the uploads through the API took (None: they did not finish).
    pub upload_seconds: Option<f64>,
    /// Documents ready at the end.
    pub ready: u64,
    /// Documents failed at the end.
    pub failed: u64,
    /// Whether every document was ready or failed before the deadline.
    pub drained: bool,
    /// Chunks stored (`document_chunks` rows).
    pub chunks: u64,
    /// The documents' `chunks_total`, summed (a cross-check of `chunks`).
    pub chunks_total: u64,
    /// Chunks with a vector.
    pub chunks_embedded: u64,
    /// LlamaParse upload requests, any answer (429s included).
    pub parse_uploads: u64,
    /// LlamaParse uploads admitted past the window: the paid ones.
    pub parse_uploads_admitted: u64,
    /// Paid uploads per document (target 1.00: the documents are distinct, so no parse-cache hit).
    pub uploads_per_document: f64,
    /// Embeddings requests, any answer.
    pub embedding_requests: u64,
    /// Inputs embedded successfully.
    pub embedded_inputs: u64,
    /// Tokens of the admitted embeddings requests.
    pub embedded_tokens: u64,
    /// Inputs embedded per chunk stored (target 1.00: the chunks are distinct, so no embedding-cache hit).
    pub inputs_per_chunk: f64,
    /// 429 answers, both providers.
    pub rate_limited: u64,
    /// First upload to the last document ready, seconds (to the end of the wait when it did not drain).
    pub drain_seconds: f64,
    /// `drain_seconds` in `reconcile_after` periods.
    pub drain_reconcile_periods: f64,
    /// The LlamaParse upload limit's use.
    pub uploads: Utilisation,
    /// The OpenAI token limit's use.
    pub tokens: Utilisation,
    /// Where the time goes, per stage.
    pub stages: Vec<StageTimes>,
    /// The counters every `SAMPLE_EVERY`, from the first upload.
    pub timeline: Vec<Sample>,
}

impl Backlog {
    /// LlamaParse uploads admitted over the trailing 10 s, in % of the limit, over time.
    pub fn uploads_over_time(&self) -> Vec<(f64, f64)> {
        trailing_use(&self.timeline, |s| s.uploads_admitted, &self.uploads)
    }

    /// OpenAI tokens admitted over the trailing 10 s, in % of the limit, over time.
    pub fn tokens_over_time(&self) -> Vec<(f64, f64)> {
        trailing_use(&self.timeline, |s| s.embedded_tokens, &self.tokens)
    }
}

/// Per sample, the units admitted over the trailing `TRAILING_SECONDS` as a share of `limit`'s rate, in %.
fn trailing_use(
    timeline: &[Sample],
    value: fn(&Sample) -> u64,
    limit: &Utilisation,
) -> Vec<(f64, f64)> {
    let per_second = limit.limit as f64 / limit.window_seconds;
    let mut from = 0;
    let mut out = Vec::new();
    for s in timeline {
        while timeline[from].at < s.at - TRAILING_SECONDS {
            from += 1;
        }
        let a = &timeline[from];
        let span = s.at - a.at;
        // Only full spans: the first seconds would show a rate over a sliver of time.
        if span >= TRAILING_SECONDS * 0.9 {
            let rate = value(s).saturating_sub(value(a)) as f64 / span;
            out.push((s.at, rate / per_second * 100.0));
        }
    }
    out
}

/// A limit's use: from the first sample that saw a unit to the first that saw them all.
fn utilisation(
    timeline: &[Sample],
    value: fn(&Sample) -> u64,
    limit: u64,
    window: Duration,
) -> Utilisation {
    let used = timeline.last().map_or(0, value);
    let first = timeline.iter().find(|s| value(s) > 0);
    let last = timeline.iter().find(|s| value(s) == used);
    let window_seconds = window.as_secs_f64();
    let (busy_seconds, in_span) = match (first, last) {
        (Some(a), Some(b)) if b.at > a.at => (b.at - a.at, value(b).saturating_sub(value(a))),
        _ => (f64::NAN, 0),
    };
    Utilisation {
        limit,
        window_seconds,
        used,
        busy_seconds,
        utilisation: in_span as f64 / busy_seconds * window_seconds / limit as f64,
        bound_seconds: used as f64 * window_seconds / limit as f64,
    }
}

/// Seconds from `from` to `to`.
fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(0) as f64 / 1e6
}

/// Uploads `documents` distinct HTML documents through the API, `UPLOAD_CONCURRENCY` at a time.
async fn upload_all(
    client: upload_pipeline::client::Client,
    documents: usize,
    words: usize,
) -> Result<()> {
    use futures::StreamExt;
    let mut uploads = futures::stream::iter(0..documents as u64)
        .map(|seed| {
            let client = client.clone();
            async move {
                let up = client
                    .upload_bytes(
                        &format!("backlog-{seed}.html"),
                        html_document(seed, words),
                        None,
                    )
                    .await
                    .context("upload")?;
                if up.duplicate {
                    bail!(
                        "document {seed} was a duplicate: the backlog must upload distinct bytes"
                    );
                }
                Ok::<(), anyhow::Error>(())
            }
        })
        .buffer_unordered(UPLOAD_CONCURRENCY);
    while let Some(done) = uploads.next().await {
        done?;
    }
    Ok(())
}

/// Documents: (stored, ready, failed).
async fn states(fleet: &Fleet) -> Result<(u64, u64, u64)> {
    let (all, ready, failed): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE status = 'ready'), count(*) FILTER (WHERE status = 'failed') \
         FROM upload_pipeline.documents",
    )
    .fetch_one(&fleet.db.admin)
    .await?;
    Ok((all as u64, ready as u64, failed as u64))
}

/// What the wait saw: the timeline, the uploads' seconds, and whether every document settled.
struct Watched {
    timeline: Vec<Sample>,
    upload_seconds: Option<f64>,
    drained: bool,
    waited_seconds: f64,
}

/// Samples the counters every `SAMPLE_EVERY` while `uploading` runs and until every document is ready or failed
/// (then `WATCH_AFTER` more) or the deadline passes.
async fn watch(
    fleet: &Fleet,
    config: &Config,
    start: Instant,
    uploading: &mut tokio::task::JoinHandle<Result<()>>,
) -> Result<Watched> {
    let deadline = start + Duration::from_secs(config.deadline_seconds);
    let mut ticker = tokio::time::interval(SAMPLE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut timeline = Vec::new();
    let mut upload_seconds = None;
    let mut settled_at: Option<Instant> = None;
    loop {
        tokio::select! {
            joined = &mut *uploading, if upload_seconds.is_none() => {
                joined.context("the upload task")??;
                upload_seconds = Some(start.elapsed().as_secs_f64());
            }
            _ = ticker.tick() => {
                let stats = fleet.fake.stats().await;
                let (all, ready, failed) = states(fleet).await?;
                let now = Instant::now();
                timeline.push(Sample {
                    at: now.duration_since(start).as_secs_f64(),
                    uploads_admitted: stats.parse_uploads_admitted,
                    embedded_tokens: stats.embedded_tokens,
                    ready,
                });
                if settled_at.is_none()
                    && upload_seconds.is_some()
                    && all == config.documents as u64
                    && ready + failed == all
                {
                    settled_at = Some(now);
                }
                let watched_enough = settled_at.is_some_and(|t| now >= t + WATCH_AFTER);
                if watched_enough || now >= deadline {
                    return Ok(Watched {
                        timeline,
                        upload_seconds,
                        drained: settled_at.is_some(),
                        waited_seconds: now.duration_since(start).as_secs_f64(),
                    });
                }
            }
        }
    }
}

/// `backlog`: `config.documents` HTML documents uploaded at once to a fleet behind LlamaParse's upload limit and
/// OpenAI's token limit, with LlamaParse jobs longer than `pipeline.reconcile_after`.
pub async fn run(config: Config) -> Result<Backlog> {
    if config.uploads_per_window == 0 || config.tokens_per_minute == 0 || config.documents == 0 {
        bail!(
            "backlog needs documents, an upload limit and a token limit (a 0 is no limit, and nothing would bind)"
        );
    }
    let fake = FakeConfig {
        openai: OpenAiConfig {
            latency: Latency::between(100.0, 300.0),
            requests: Some(Window {
                limit: RPM,
                window_ms: 60_000,
            }),
            tokens: Some(Window {
                limit: config.tokens_per_minute,
                window_ms: 60_000,
            }),
            ..Default::default()
        },
        llamaparse: LlamaParseConfig {
            latency: Latency::lognormal(60.0, 250.0),
            job_duration: Latency::between(JOB_MS.0, JOB_MS.1),
            uploads: Some(Window {
                limit: config.uploads_per_window,
                window_ms: UPLOAD_WINDOW.as_millis() as u64,
            }),
            ..Default::default()
        },
    };
    let (parse, uploads, tpm) = (
        config.parse_concurrency,
        config.uploads_per_window,
        config.tokens_per_minute,
    );
    let fleet = Fleet::start("bench-backlog", fake, move |s| {
        s.pipeline.reconcile_after = RECONCILE_AFTER;
        s.pipeline.reconcile_interval = RECONCILE_INTERVAL;
        s.worker.concurrency.parse = parse;
        s.quota.llamaparse.uploads = uploads;
        s.quota.llamaparse.window = UPLOAD_WINDOW;
        s.quota.openai.requests_per_minute = RPM;
        s.quota.openai.tokens_per_minute = tpm;
    })
    .await?;
    let result = measure(&fleet, config).await;
    fleet.stop().await;
    result
}

/// The fakes' and the fleet's settings, described for the report.
fn describe(fleet: &Fleet, config: &Config) -> (String, String) {
    let providers = format!(
        "LlamaParse: jobs done {}-{} s (uniform) after upload, HTTP answers 60 ms median / 250 ms p99, {} uploads \
         per {} s; OpenAI: 100-300 ms (uniform) per request, {RPM} requests and {} tokens a minute enforced",
        JOB_MS.0 / 1000.0,
        JOB_MS.1 / 1000.0,
        config.uploads_per_window,
        UPLOAD_WINDOW.as_secs(),
        config.tokens_per_minute,
    );
    let s = &fleet.settings;
    let settings = format!(
        "one worker per stage; concurrency parse {}, chunk {}, embed {}; pipeline.reconcile_after {:?}, \
         reconcile_interval {:?}; queue.reclaim_after {:?}; quotas {} uploads per {:?}, {} rpm / {} tpm, \
         quota.max_wait {:?}; embedding.batch_size {}",
        s.worker.concurrency.parse,
        s.worker.concurrency.chunk,
        s.worker.concurrency.embed,
        s.pipeline.reconcile_after,
        s.pipeline.reconcile_interval,
        s.queue.reclaim_after,
        s.quota.llamaparse.uploads,
        s.quota.llamaparse.window,
        s.quota.openai.requests_per_minute,
        s.quota.openai.tokens_per_minute,
        s.quota.max_wait,
        s.embedding.batch_size,
    );
    (providers, settings)
}

/// Uploads every document at once, watches the drain and reads the figures.
async fn measure(fleet: &Fleet, config: Config) -> Result<Backlog> {
    let start = Instant::now();
    let t0 = Utc::now();
    let mut uploading = tokio::spawn(upload_all(
        fleet.client.clone(),
        config.documents,
        config.words,
    ));
    let watched = watch(fleet, &config, start, &mut uploading).await;
    uploading.abort();
    let watched = watched?;

    let stats = fleet.fake.stats().await;
    let (documents, ready, failed) = states(fleet).await?;
    let (chunks, chunks_embedded): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(embedding) FROM upload_pipeline.document_chunks")
            .fetch_one(&fleet.db.admin)
            .await?;
    let (chunks_total, last_ready): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT coalesce(sum(chunks_total), 0)::bigint, max(ready_at) FROM upload_pipeline.documents",
    )
    .fetch_one(&fleet.db.admin)
    .await?;
    let ids = sqlx::query_scalar::<_, Uuid>("SELECT id FROM upload_pipeline.documents")
        .fetch_all(&fleet.db.admin)
        .await?;
    let drain_seconds = match (watched.drained, last_ready) {
        (true, Some(last)) => seconds_between(t0, last),
        _ => watched.waited_seconds,
    };
    let (providers, fleet_desc) = describe(fleet, &config);
    let s = &fleet.settings;
    Ok(Backlog {
        providers,
        fleet: fleet_desc,
        reconcile_after_seconds: s.pipeline.reconcile_after.as_secs_f64(),
        reconcile_interval_seconds: s.pipeline.reconcile_interval.as_secs_f64(),
        documents,
        upload_seconds: watched.upload_seconds,
        ready,
        failed,
        drained: watched.drained,
        chunks: chunks as u64,
        chunks_total: chunks_total as u64,
        chunks_embedded: chunks_embedded as u64,
        parse_uploads: stats.parse_uploads,
        parse_uploads_admitted: stats.parse_uploads_admitted,
        uploads_per_document: stats.parse_uploads_admitted as f64 / documents as f64,
        embedding_requests: stats.embedding_requests,
        embedded_inputs: stats.embedded_inputs,
        embedded_tokens: stats.embedded_tokens,
        inputs_per_chunk: stats.embedded_inputs as f64 / chunks as f64,
        rate_limited: stats.rate_limited,
        drain_seconds,
        drain_reconcile_periods: drain_seconds / s.pipeline.reconcile_after.as_secs_f64(),
        uploads: utilisation(
            &watched.timeline,
            |x| x.uploads_admitted,
            config.uploads_per_window,
            UPLOAD_WINDOW,
        ),
        tokens: utilisation(
            &watched.timeline,
            |x| x.embedded_tokens,
            config.tokens_per_minute,
            Duration::from_secs(60),
        ),
        stages: fleet.stage_times(&ids).await?,
        timeline: watched.timeline,
        config,
    })
}
