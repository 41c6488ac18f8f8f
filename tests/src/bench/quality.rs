//! The `quality` scenario: how often search puts the page that answers a question first. The evaluation set of
//! `tests/fixtures/eval/` (56 pages of the PostgreSQL 15 manual, 83 labelled questions of three kinds: keyword,
//! paraphrase, mixed) goes in as a user's uploads would: through the API to a `worker` process that parses the
//! HTML, chunks it and embeds it with all-MiniLM-L6-v2 in-process, in a database and under a Redis prefix of its
//! own. Every question is then asked through the API in each mode, and hit@5 and MRR@10 are computed per mode and
//! per kind. The settings are the defaults with the environment's `[search]`, `[chunking]` and `[embedding]`
//! (`UPLOAD_PIPELINE__SEARCH__RRF_K=20` and the like), so a tuning run needs no rebuild; the `sweep` variants of
//! `[search]` are measured afterwards on the same chunks, each through an API of its own.

mod scoring;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use upload_pipeline::{
    Settings,
    client::{Client, SearchMode, SearchRequest},
    settings::{ChunkingSettings, EmbedderKind, RedisUrl, RerankApi, SearchSettings},
};
use uuid::Uuid;

pub use self::scoring::{Ranked, Scores};
use self::scoring::{relevance_normalize, scores};
use super::stats::Distribution;
use crate::{
    Api, RedisKeys, TestDb, WorkerProcess,
    fake::{FakeConfig, FakeProviders},
    unique_prefix,
};

/// Hits asked for per question: MRR is taken over the first 10.
pub const K: u32 = 10;
/// The label of the row of hybrid search reranked (issue 20, item 5): `rerank: true` asked for, the reranker being
/// the fake of `tests/src/fake/rerank.rs` (Cohere's protocol), which scores a chunk by the share of the query's
/// words it holds: a lexical stand-in that shows the reranking path end to end, not what a cross-encoder would
/// score.
pub const RERANK_LABEL: &str = "hybrid+rerank";

/// The `[search]` variants `make bench` measures after the main run (`--quality-sweep`): the weight of each list
/// in the fusion, the keyword list's boost for identifier-like queries (1: none), its `rrf_k`, the candidate
/// depth, and the `simple` text-search configuration (no stemming, no stop words) in place of `english`.
pub const SWEEP: &str = "vector_weight=1.5;vector_weight=2;keyword_weight=2;identifier_boost=1;identifier_boost=5;\
                         rrf_k=20;rrf_k=10;candidates=20;candidates=100;text_config=simple";

/// A labelled question of `questions.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Question {
    /// `k01`, `p01`, `m01`, ...
    pub id: String,
    /// `keyword`, `paraphrase` or `mixed`.
    pub kind: String,
    /// What is asked.
    pub question: String,
    /// The page that answers it (its file name, as uploaded).
    pub file: String,
    /// A phrase of the passage that answers it (the evidence).
    pub answer: String,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The evaluation set: `corpus/` and `questions.json`.
    pub eval_dir: PathBuf,
    /// The local model's folder (`make model`), used when the settings name a relative one.
    pub model_dir: PathBuf,
    /// Longest wait for every page to be ready.
    pub deadline: Duration,
    /// Variants of `[search]` measured after the main run on the same chunks: `field=value,...` each
    /// (`candidates`, `rrf_k`, `vector_weight`, `keyword_weight`, `identifier_boost`, `text_config`).
    pub sweep: Vec<String>,
}

/// Every question asked in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct ModeRun {
    /// `vector`, `keyword`, `hybrid` (or [`RERANK_LABEL`]).
    pub label: String,
    /// Per kind, then `all`.
    pub scores: Vec<Scores>,
    /// Time per search as the client saw it (query embedding included), milliseconds.
    pub latency_ms: Distribution,
    /// Per question, in the order of `questions.json`.
    pub ranked: Vec<Ranked>,
}

/// A variant of `[search]`, measured on the same chunks.
#[derive(Debug, Clone, Serialize)]
pub struct Variant {
    /// As given, e.g. `rrf_k=20,keyword_weight=2`.
    pub name: String,
    /// The settings it ran with.
    pub search: SearchSettings,
    /// Keyword mode, per kind and all.
    pub keyword: Vec<Scores>,
    /// Hybrid mode, per kind and all.
    pub hybrid: Vec<Scores>,
    /// Hybrid's rank of the answer's page per question (`None`: not in the first 10), by question id.
    pub hybrid_ranks: Vec<(String, Option<u32>)>,
}

/// Results of `quality`.
#[derive(Debug, Clone, Serialize)]
pub struct Quality {
    /// Pages uploaded.
    pub pages: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Chunks they made.
    pub chunks: i64,
    /// First upload to last page ready, seconds.
    pub ingest_seconds: f64,
    /// The embedder, model and width.
    pub embedder: String,
    /// How the pages were chunked.
    pub chunking: ChunkingSettings,
    /// The search settings of the main run.
    pub search: SearchSettings,
    /// The questions.
    pub questions: Vec<Question>,
    /// `vector`, `keyword`, `hybrid`, then hybrid with the fake reranker ([`RERANK_LABEL`]).
    pub modes: Vec<ModeRun>,
    /// The `[search]` variants.
    pub sweep: Vec<Variant>,
}

/// The settings: the defaults with the environment's `[search]`, `[chunking]` and `[embedding]`, the local model
/// found in `model_dir` when the settings name a relative folder, a Redis prefix of the scenario's own.
fn scenario_settings(model_dir: &Path) -> Result<Settings> {
    let env = Settings::load(None).context("reading UPLOAD_PIPELINE__* from the environment")?;
    let mut s = Settings {
        redis_url: RedisUrl(crate::redis_url()),
        ..Default::default()
    };
    s.queue.key_prefix = unique_prefix("bench-quality");
    // One user uploads the whole corpus at once; the per-user limit is the API's, not what is measured here.
    s.api.uploads_per_minute = 0;
    s.search = env.search;
    s.chunking = env.chunking;
    s.embedding = env.embedding;
    if s.embedding.local.model_dir.is_relative() {
        s.embedding.local.model_dir = model_dir.to_path_buf();
    }
    if s.embedding.embedder == EmbedderKind::Local {
        let weights = s.embedding.local.model_dir.join("model.safetensors");
        ensure!(
            weights.is_file(),
            "no model at {}: run `make model` (or `bash deploy/local/model.sh`) first",
            weights.display()
        );
    }
    s.validate()?;
    Ok(s)
}

/// The corpus in a database of its own, the API serving it, one worker for every stage, and the fake reranker.
struct Fleet {
    settings: Settings,
    _fake: FakeProviders,
    api: Api,
    worker: WorkerProcess,
    /// The user who uploads and searches.
    user: Uuid,
    client: Client,
    db: TestDb,
    _keys: RedisKeys,
}

impl Fleet {
    async fn start(mut settings: Settings) -> Result<Self> {
        let fake = FakeProviders::start(FakeConfig::default()).await;
        fake.rerank_with(&mut settings, RerankApi::Cohere);
        // Reranked only when a search asks for it: the modes are measured as they are.
        settings.search.rerank.enabled = false;
        let keys = RedisKeys::of(&settings);
        let db = TestDb::create(&mut settings).await;
        let api = Api::start(&settings).await;
        let mut worker = WorkerProcess::start(&settings, "parse,chunk,embed");
        worker.wait_healthy().await;
        let user = Uuid::new_v4();
        let client = api.client(&settings, user);
        Ok(Self {
            settings,
            _fake: fake,
            api,
            worker,
            user,
            client,
            db,
            _keys: keys,
        })
    }

    /// Drains the worker and stops the API; the database and the Redis keys go when `self` is dropped.
    async fn stop(mut self) {
        self.worker.signal("TERM");
        self.worker.wait_exit(Duration::from_secs(60)).await;
        self.api.stop().await;
    }
}

/// Uploads every page of `corpus`, four at a time; returns the documents' ids with their file names, and the bytes.
async fn upload(client: &Client, corpus: &Path) -> Result<(HashMap<Uuid, String>, u64)> {
    use futures::StreamExt;
    let mut paths: Vec<PathBuf> = std::fs::read_dir(corpus)
        .with_context(|| format!("reading {}", corpus.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.retain(|p| p.extension().is_some_and(|e| e == "html"));
    paths.sort();
    let bytes = paths
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()))
        .sum::<Result<u64, _>>()?;
    let uploaded: Vec<Result<(Uuid, String)>> = futures::stream::iter(paths)
        .map(|path| async move {
            let up = client
                .upload_file(&path, None)
                .await
                .with_context(|| format!("uploading {}", path.display()))?;
            ensure!(!up.duplicate, "{} is a duplicate", path.display());
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            Ok((up.document_id, name.into_owned()))
        })
        .buffer_unordered(4)
        .collect()
        .await;
    Ok((uploaded.into_iter().collect::<Result<_>>()?, bytes))
}

/// Waits until every page is ready; fails at once on a failed page, and after `deadline` naming the pages still
/// under way with the state of their stages.
async fn wait_ready(
    fleet: &Fleet,
    pages: &HashMap<Uuid, String>,
    deadline: Duration,
) -> Result<()> {
    let ids: Vec<Uuid> = pages.keys().copied().collect();
    let started = Instant::now();
    let mut reported = Instant::now();
    loop {
        let rows: Vec<(Uuid, String, Option<String>)> = sqlx::query_as(
            "SELECT id, status, error FROM upload_pipeline.documents WHERE id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&fleet.db.admin)
        .await?;
        let failed: Vec<String> = rows
            .iter()
            .filter(|r| r.1 == "failed")
            .map(|r| format!("{} ({})", pages[&r.0], r.2.as_deref().unwrap_or("no error")))
            .collect();
        ensure!(failed.is_empty(), "pages failed: {}", failed.join("; "));
        let waiting: Vec<Uuid> = rows
            .iter()
            .filter(|r| r.1 != "ready")
            .map(|r| r.0)
            .collect();
        if waiting.is_empty() && rows.len() == ids.len() {
            return Ok(());
        }
        if reported.elapsed() >= Duration::from_secs(15) {
            eprintln!(
                "quality: {} of {} pages ready after {:.0} s",
                ids.len() - waiting.len(),
                ids.len(),
                started.elapsed().as_secs_f64()
            );
            reported = Instant::now();
        }
        if started.elapsed() > deadline {
            let stuck: Vec<(Uuid, String, String, i32, Option<String>)> = sqlx::query_as(
                "SELECT d.id, d.status, coalesce(string_agg(j.stage || ' ' || j.state, ', ' ORDER BY j.queued_at), \
                        'no jobs'), coalesce(max(j.attempts), 0), max(j.last_error) \
                 FROM upload_pipeline.documents d LEFT JOIN upload_pipeline.upload_jobs j ON j.document_id = d.id \
                 WHERE d.id = ANY($1) GROUP BY d.id, d.status",
            )
            .bind(&waiting)
            .fetch_all(&fleet.db.admin)
            .await?;
            let named: Vec<String> = stuck
                .iter()
                .map(|(id, status, jobs, attempts, error)| {
                    format!(
                        "{} {status} (jobs: {jobs}; attempts {attempts}{})",
                        pages[id],
                        error
                            .as_deref()
                            .map(|e| format!("; {e}"))
                            .unwrap_or_default()
                    )
                })
                .collect();
            bail!(
                "{} of {} pages not ready after {deadline:?}: {}; worker log {}",
                waiting.len(),
                ids.len(),
                named.join("; "),
                fleet.worker.log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Asks every question in `mode`, reranked when `rerank`, and ranks the answers.
async fn ask(
    client: &Client,
    questions: &[Question],
    mode: SearchMode,
    rerank: bool,
) -> Result<ModeRun> {
    let mut ranked = Vec::with_capacity(questions.len());
    let mut latency = Vec::with_capacity(questions.len());
    for q in questions {
        let t = Instant::now();
        let request = SearchRequest::new(&q.question).k(K).mode(mode);
        let found = client
            .search_with(&request.rerank(rerank))
            .await
            .with_context(|| format!("{mode} search for {} ({:?})", q.id, q.question))?;
        latency.push(t.elapsed().as_secs_f64() * 1000.0);
        // A reranker that fails answers in fused order: that would be the hybrid row again under another label.
        ensure!(
            found.reranked == rerank,
            "{mode} search for {} came back with reranked {} (the API logs why)",
            q.id,
            found.reranked
        );
        let evidence = relevance_normalize(&q.answer);
        let mut r = Ranked {
            id: q.id.clone(),
            kind: q.kind.clone(),
            page_rank: None,
            chunk_rank: None,
            hits: found.results.len(),
            first: found.results.first().map(|h| h.filename.clone()),
            vector_rank: None,
            keyword_rank: None,
        };
        for (rank, hit) in (1..).zip(&found.results) {
            if hit.filename != q.file {
                continue;
            }
            if r.page_rank.is_none() {
                r.page_rank = Some(rank);
                r.vector_rank = hit.vector_rank;
                r.keyword_rank = hit.keyword_rank;
            }
            if relevance_normalize(&hit.content).contains(&evidence) {
                r.chunk_rank = Some(rank);
                break;
            }
        }
        ranked.push(r);
    }
    Ok(ModeRun {
        label: if rerank {
            RERANK_LABEL.to_owned()
        } else {
            mode.to_string()
        },
        scores: scores(&ranked),
        latency_ms: Distribution::of(&latency),
        ranked,
    })
}

/// `base` changed by `spec` (`rrf_k=20,keyword_weight=2`), validated as a whole settings file would be.
fn variant(base: &SearchSettings, spec: &str) -> Result<SearchSettings> {
    let mut s = base.clone();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (field, value) = part
            .split_once('=')
            .with_context(|| format!("sweep variant {spec:?}: {part:?} is not field=value"))?;
        let bad = || format!("sweep variant {spec:?}: bad value for {field}");
        match field.trim() {
            "candidates" => s.candidates = value.parse().with_context(bad)?,
            "rrf_k" => s.rrf_k = value.parse().with_context(bad)?,
            "vector_weight" => s.vector_weight = value.parse().with_context(bad)?,
            "keyword_weight" => s.keyword_weight = value.parse().with_context(bad)?,
            "identifier_boost" => s.identifier_boost = value.parse().with_context(bad)?,
            "text_config" => s.text_config = value.trim().to_owned(),
            other => bail!(
                "sweep variant {spec:?}: unknown field {other:?} (candidates, rrf_k, vector_weight, \
                 keyword_weight, identifier_boost, text_config)"
            ),
        }
    }
    let whole = Settings {
        search: s.clone(),
        ..Default::default()
    };
    whole
        .validate()
        .with_context(|| format!("sweep variant {spec:?}"))?;
    Ok(s)
}

/// Measures one `[search]` variant with an API of its own on the fleet's database, after applying its text
/// configuration as `producer migrate` does (every chunk's keywords recomputed in it, when it changed).
async fn measure_variant(fleet: &Fleet, questions: &[Question], spec: &str) -> Result<Variant> {
    let mut settings = fleet.settings.clone();
    settings.search = variant(&fleet.settings.search, spec)?;
    upload_pipeline::db::migrate(&settings)
        .await
        .with_context(|| format!("applying the text configuration of {spec:?}"))?
        .close()
        .await;
    let api = Api::start(&settings).await;
    let result = async {
        let client = api.client(&settings, fleet.user);
        let keyword = ask(&client, questions, SearchMode::Keyword, false).await?;
        let hybrid = ask(&client, questions, SearchMode::Hybrid, false).await?;
        Ok::<_, anyhow::Error>(Variant {
            name: spec.to_owned(),
            search: settings.search.clone(),
            keyword: keyword.scores,
            hybrid_ranks: hybrid
                .ranked
                .iter()
                .map(|r| (r.id.clone(), r.page_rank))
                .collect(),
            hybrid: hybrid.scores,
        })
    }
    .await;
    api.stop().await;
    result
}

/// Runs the scenario: uploads the corpus, waits until every page is ready, asks every question in each mode, then
/// measures the `sweep` variants.
pub async fn run(config: Config) -> Result<Quality> {
    let questions: Vec<Question> = serde_json::from_str(
        &std::fs::read_to_string(config.eval_dir.join("questions.json"))
            .context("reading the evaluation set's questions.json")?,
    )
    .context("parsing questions.json")?;
    let settings = scenario_settings(&config.model_dir)?;
    let fleet = Fleet::start(settings).await?;
    let result = async {
        let t0 = Instant::now();
        let (pages, bytes) = upload(&fleet.client, &config.eval_dir.join("corpus")).await?;
        let files: std::collections::HashSet<&String> = pages.values().collect();
        if let Some(q) = questions.iter().find(|q| !files.contains(&q.file)) {
            bail!(
                "question {} names {}, which is not in the corpus",
                q.id,
                q.file
            );
        }
        wait_ready(&fleet, &pages, config.deadline).await?;
        let ingest_seconds = t0.elapsed().as_secs_f64();
        let chunks: i64 =
            sqlx::query_scalar("SELECT count(*) FROM upload_pipeline.document_chunks")
                .fetch_one(&fleet.db.admin)
                .await?;
        eprintln!(
            "quality: {} pages, {chunks} chunks, ready in {ingest_seconds:.0} s",
            pages.len()
        );
        let mut modes = Vec::new();
        for mode in [SearchMode::Vector, SearchMode::Keyword, SearchMode::Hybrid] {
            modes.push(ask(&fleet.client, &questions, mode, false).await?);
        }
        modes.push(ask(&fleet.client, &questions, SearchMode::Hybrid, true).await?);
        let mut sweep = Vec::new();
        for spec in config.sweep.iter().filter(|s| !s.trim().is_empty()) {
            sweep.push(measure_variant(&fleet, &questions, spec).await?);
        }
        let e = &fleet.settings.embedding;
        Ok(Quality {
            pages: pages.len(),
            bytes,
            chunks,
            ingest_seconds,
            embedder: format!(
                "{} {} ({} dimensions)",
                serde_json::to_value(e.embedder)?.as_str().unwrap_or("?"),
                e.model,
                e.dimensions
            ),
            chunking: fleet.settings.chunking.clone(),
            search: fleet.settings.search.clone(),
            questions: questions.clone(),
            modes,
            sweep,
        })
    }
    .await;
    fleet.stop().await;
    result
}
