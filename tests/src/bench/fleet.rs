//! A whole fleet for the pipeline benchmarks: fake providers and the API in this process, one release `worker`
//! process per stage (as deployed), Postgres behind a statement-counting proxy, and the readings the scenarios
//! take of it (CPU, memory, Redis commands, Postgres statements, per-stage times).

use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use upload_pipeline::{
    Settings,
    settings::{EmbedderKind, ParserKind, RedisUrl, Secret},
};
use uuid::Uuid;

use super::pgcount::PgCounter;
use crate::{
    Api, TestDb, WorkerProcess,
    fake::{FakeConfig, FakeProviders},
    unique_prefix,
};

/// The stages, one worker process each.
pub const STAGES: [&str; 3] = ["parse", "chunk", "embed"];

/// A running fleet.
pub struct Fleet {
    /// The fake LlamaParse and OpenAI.
    pub fake: FakeProviders,
    /// The settings every process runs with (Postgres through the proxy).
    pub settings: Settings,
    /// The database.
    pub db: TestDb,
    /// The producer API.
    pub api: Api,
    /// The statement counter in front of Postgres.
    pub pg: PgCounter,
    /// One worker per stage, in `STAGES` order.
    pub workers: Vec<WorkerProcess>,
    /// The uploading user.
    pub client: upload_pipeline::client::Client,
}

/// Settings as deployed (the library defaults and the prod overlay's parse concurrency of 16), with the fakes as
/// providers: HTML goes to LlamaParse, embeddings to OpenAI `text-embedding-3-small` at 384 dimensions.
pub fn fleet_settings(name: &str, fake: &FakeProviders) -> Settings {
    let mut s = Settings {
        redis_url: RedisUrl(crate::redis_url()),
        ..Default::default()
    };
    s.queue.key_prefix = unique_prefix(name);
    // One user uploads everything here; the per-user upload limit (120 a minute) is the API's, not the fleet's.
    s.api.uploads_per_minute = 0;
    s.parsing.parser = ParserKind::Llamaparse;
    s.parsing.llamaparse.base_url = fake.url.clone();
    s.parsing.llamaparse.api_key = Secret("llx-bench".into());
    s.embedding.embedder = EmbedderKind::Openai;
    s.embedding.model = "text-embedding-3-small".into();
    s.embedding.dimensions = 384;
    s.embedding.openai.base_url = fake.openai_url();
    s.embedding.openai.api_key = Secret("sk-bench".into());
    s.worker.concurrency.parse = 16;
    s
}

impl Fleet {
    /// Starts the fakes with `config`, then the database, the API and the three workers with `fleet_settings`
    /// changed by `tune`; returns once every worker is healthy.
    pub async fn start(
        name: &str,
        mut config: FakeConfig,
        tune: impl FnOnce(&mut Settings),
    ) -> Result<Self> {
        config.openai.keys = vec!["sk-bench".into()];
        config.llamaparse.keys = vec!["llx-bench".into()];
        let fake = FakeProviders::start(config).await;
        let mut s = fleet_settings(name, &fake);
        tune(&mut s);
        let db = TestDb::create(&mut s).await;
        let direct = s.database_url.expose().to_owned();
        let upstream = reqwest::Url::parse(&direct).context("database URL")?;
        let pg = PgCounter::start(&format!(
            "{}:{}",
            upstream.host_str().unwrap_or("127.0.0.1"),
            upstream.port().unwrap_or(5432)
        ))
        .await?;
        s.database_url = RedisUrl(pg.url_for(&direct)?);
        let api = Api::start(&s).await;
        let mut workers: Vec<WorkerProcess> = STAGES
            .iter()
            .map(|stage| WorkerProcess::start(&s, stage))
            .collect();
        for w in &mut workers {
            w.wait_healthy().await;
        }
        let client = api.client(&s, Uuid::new_v4());
        Ok(Self {
            fake,
            settings: s,
            db,
            api,
            pg,
            workers,
            client,
        })
    }

    /// Stops the workers (SIGTERM, drained), the API, and drops the database and the Redis keys.
    pub async fn stop(mut self) {
        for w in &self.workers {
            w.signal("TERM");
        }
        for w in &mut self.workers {
            w.wait_exit(Duration::from_secs(60)).await;
        }
        self.api.stop().await;
        crate::cleanup(&self.settings).await;
    }

    /// A reading of every counter, to subtract from a later one.
    pub async fn reading(&self) -> Result<Reading> {
        let mut cpu = Vec::new();
        let mut rss = Vec::new();
        for w in &self.workers {
            cpu.push(cpu_seconds(w.pid())?);
            rss.push(memory(w.pid())?);
        }
        Ok(Reading {
            at: std::time::Instant::now(),
            cpu_seconds: cpu,
            memory: rss,
            redis_commands: redis_commands(&self.settings).await?,
            pg_statements: self.pg.counts.statements(),
            fake: self.fake.stats().await,
        })
    }

    /// Documents, by status.
    pub async fn count(&self, status: &str) -> Result<usize> {
        Ok(sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM upload_pipeline.documents WHERE status = $1",
        )
        .bind(status)
        .fetch_one(&self.db.admin)
        .await? as usize)
    }

    /// When each of `ids` became ready (None: not yet), and its chunks.
    pub async fn ready_times(
        &self,
        ids: &[Uuid],
    ) -> Result<Vec<(Uuid, Option<DateTime<Utc>>, i32)>> {
        Ok(sqlx::query_as(
            "SELECT id, ready_at, coalesce(chunks_total, 0) FROM upload_pipeline.documents WHERE id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&self.db.admin)
        .await?)
    }

    /// Per stage: seconds queued (queued to started) and running (started to finished), over `ids`' last attempts.
    pub async fn stage_times(&self, ids: &[Uuid]) -> Result<Vec<StageTimes>> {
        let rows: Vec<(String, Vec<f64>, Vec<f64>)> = sqlx::query_as(
            "SELECT stage, array_agg(extract(epoch FROM started_at - queued_at)::float8), \
                    array_agg(extract(epoch FROM finished_at - started_at)::float8) \
             FROM upload_pipeline.upload_jobs \
             WHERE document_id = ANY($1) AND started_at IS NOT NULL AND finished_at IS NOT NULL \
             GROUP BY stage",
        )
        .bind(ids)
        .fetch_all(&self.db.admin)
        .await?;
        let mut out: Vec<StageTimes> = rows
            .into_iter()
            .map(|(stage, queued, running)| StageTimes {
                queued_seconds: super::stats::Distribution::of(&queued),
                running_seconds: super::stats::Distribution::of(&running),
                stage,
            })
            .collect();
        out.sort_by_key(|t| STAGES.iter().position(|s| *s == t.stage));
        Ok(out)
    }
}

/// Where a stage's time went.
#[derive(Debug, Clone, Serialize)]
pub struct StageTimes {
    /// The stage.
    pub stage: String,
    /// Waiting in the queue (after the previous stage committed).
    pub queued_seconds: super::stats::Distribution,
    /// Running (provider calls, parsing, writing).
    pub running_seconds: super::stats::Distribution,
}

/// Counters at one moment.
#[derive(Debug, Clone)]
pub struct Reading {
    /// When.
    pub at: std::time::Instant,
    /// Per worker, CPU seconds used.
    pub cpu_seconds: Vec<f64>,
    /// Per worker, resident and peak resident bytes.
    pub memory: Vec<Memory>,
    /// Commands the Redis server has processed.
    pub redis_commands: u64,
    /// Statements through the Postgres proxy.
    pub pg_statements: u64,
    /// The fakes' counters.
    pub fake: crate::fake::Stats,
}

/// A process's memory.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Memory {
    /// Resident now (VmRSS), bytes.
    pub rss_bytes: u64,
    /// Peak resident (VmHWM), bytes.
    pub peak_rss_bytes: u64,
}

/// CPU time a process has used, from /proc/<pid>/schedstat (nanoseconds on the CPU, all threads).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .with_context(|| format!("process {pid} is gone"))?;
    let ns: f64 = text
        .split_whitespace()
        .next()
        .context("empty schedstat")?
        .parse()?;
    Ok(ns / 1e9)
}

/// A process's resident memory, from /proc/<pid>/status.
pub fn memory(pid: u32) -> Result<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let kib = |key: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Memory {
        rss_bytes: kib("VmRSS:") * 1024,
        peak_rss_bytes: kib("VmHWM:") * 1024,
    })
}

/// `total_commands_processed` of the Redis server.
pub async fn redis_commands(settings: &Settings) -> Result<u64> {
    let client = redis::Client::open(settings.redis_url.expose())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .context("INFO stats has no total_commands_processed")?
        .trim()
        .parse()
        .context("total_commands_processed")
}

/// An HTML page of about `words` words on topic `seed` (HTML goes to LlamaParse; text and Markdown stay local).
pub fn html_document(seed: u64, words: usize) -> String {
    use rand::{Rng, SeedableRng, rngs::SmallRng};
    const VOCABULARY: &[&str] = &[
        "harbour",
        "ledger",
        "turbine",
        "glacier",
        "protocol",
        "lantern",
        "orchard",
        "circuit",
        "mineral",
        "caravan",
        "voltage",
        "archive",
        "meadow",
        "compiler",
        "tidal",
        "quartz",
        "beacon",
        "granary",
        "satellite",
        "furnace",
        "estuary",
        "telegraph",
        "canyon",
        "reservoir",
        "pendulum",
        "vineyard",
        "monsoon",
        "lattice",
        "foundry",
        "observatory",
        "bazaar",
        "aqueduct",
        "spectrum",
        "tundra",
        "carriage",
        "algorithm",
        "basalt",
        "citadel",
        "delta",
        "ember",
        "falcon",
        "geyser",
        "horizon",
        "inlet",
        "juniper",
        "kiln",
        "lagoon",
        "marble",
        "nebula",
        "oasis",
        "prism",
        "quarry",
        "ridge",
    ];
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut html = format!(
        "<html><head><title>Report {seed}</title></head><body><h1>Field report {seed}</h1>\n"
    );
    let mut written = 0;
    let mut section = 0;
    while written < words {
        section += 1;
        html.push_str(&format!("<h2>Section {section} of report {seed}</h2>\n<p>"));
        for i in 0..60 {
            let w = VOCABULARY[rng.random_range(0..VOCABULARY.len())];
            html.push_str(w);
            html.push_str(if i % 12 == 11 { ". " } else { " " });
        }
        html.push_str(&format!("Reference {seed}-{section}.</p>\n"));
        written += 62;
    }
    html.push_str("</body></html>\n");
    html
}
