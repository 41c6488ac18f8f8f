//! Fake LlamaParse (v1 and v2), OpenAI embeddings and rerankers (Cohere, Jina, text-embeddings-inference) on one
//! port, speaking the published protocols (`../shared/specs/providers.md`) closely enough that the official Python
//! clients work against it unchanged.
//!
//! - Latency is drawn from a log-normal distribution given by its median and 99th percentile.
//! - Rate limits are enforced as the real services do: OpenAI per key over a request window and a token window,
//!   with the `x-ratelimit-*` headers on every answer and OpenAI's 429 bodies; LlamaParse uploads per window
//!   with FastAPI `{"detail": ...}` bodies.
//! - Faults are injected by rate: 5xx, hangs past the client's timeout, malformed JSON, connections cut
//!   mid-answer, `insufficient_quota`, and parse jobs that end in error. Quota exhaustion can also be switched
//!   on and off as a whole (OpenAI `insufficient_quota`, LlamaParse 402), and so can a revoked key (401 with the
//!   provider's own body, whatever key is sent).
//! - Embeddings are deterministic (the hashing embedder at the requested dimensions); parse results come from
//!   the project's local parsers, page by page; rerank scores are the share of the query's words a document holds
//!   (`rerank::score`), and scripted failures (`fail_next`, `hang_next`) hit the next requests in order.
//! - `GET /_fake/stats` counts calls; `PUT /_fake/config` replaces the configuration; `POST /_fake/reset` zeroes
//!   the counters.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};

pub use llamaparse::LlamaParseConfig;
pub use openai::OpenAiConfig;
pub use rerank::RerankConfig;

mod llamaparse;
mod openai;
pub mod rerank;

/// A latency distribution: log-normal with this median and 99th percentile; zero means none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Latency {
    /// Median, in milliseconds.
    pub median_ms: f64,
    /// 99th percentile, in milliseconds (at least the median).
    pub p99_ms: f64,
    /// When set, a uniform draw between these two bounds (milliseconds) instead of the log-normal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub range_ms: Option<[f64; 2]>,
}

impl Latency {
    /// A fixed delay.
    pub fn fixed(ms: f64) -> Self {
        Self {
            median_ms: ms,
            p99_ms: ms,
            range_ms: None,
        }
    }

    /// Uniform between `low_ms` and `high_ms` ("2-8 s per document").
    pub fn between(low_ms: f64, high_ms: f64) -> Self {
        Self {
            median_ms: (low_ms + high_ms) / 2.0,
            p99_ms: high_ms,
            range_ms: Some([low_ms, high_ms.max(low_ms)]),
        }
    }

    /// Log-normal with this median and 99th percentile.
    pub fn lognormal(median_ms: f64, p99_ms: f64) -> Self {
        Self {
            median_ms,
            p99_ms,
            range_ms: None,
        }
    }

    /// One draw.
    pub fn sample(&self) -> Duration {
        if let Some([low, high]) = self.range_ms {
            return Duration::from_secs_f64((low + (high - low) * rand::random::<f64>()) / 1000.0);
        }
        if self.median_ms <= 0.0 {
            return Duration::ZERO;
        }
        let sigma = (self.p99_ms.max(self.median_ms) / self.median_ms).ln() / 2.326;
        // Box-Muller.
        let (u1, u2): (f64, f64) = (rand::random::<f64>().max(1e-12), rand::random());
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        Duration::from_secs_f64((self.median_ms * (sigma * z).exp()).min(600_000.0) / 1000.0)
    }
}

/// Fault rates, each the probability that a request gets that fault.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// 500 or 503 with the provider's error body.
    pub server_error: f64,
    /// No answer for `hang_ms` (past the client's timeout), then 504.
    pub timeout: f64,
    /// 200 with a body that is not JSON.
    pub malformed: f64,
    /// The connection is cut halfway through the answer.
    pub reset: f64,
    /// OpenAI: 429 `insufficient_quota`; LlamaParse: 402.
    pub insufficient_quota: f64,
    /// LlamaParse: the parse job ends in error.
    pub job_error: f64,
    /// How long a `timeout` fault hangs, in milliseconds.
    pub hang_ms: u64,
}

/// A request or token budget over a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Most requests (or tokens) per window.
    pub limit: u64,
    /// The window, in milliseconds.
    pub window_ms: u64,
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FakeConfig {
    /// OpenAI embeddings.
    pub openai: OpenAiConfig,
    /// LlamaParse.
    pub llamaparse: LlamaParseConfig,
}

/// The configuration as `/_fake/config` reads and writes it: the providers of [`FakeConfig`] and the rerankers'
/// side under `"rerank"` (kept apart so that the many `FakeConfig { .. }` literals need not name it; a
/// configuration without it, as [`FakeProviders::configure`] sends, leaves the rerankers' as it was).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct WireConfig {
    #[serde(flatten)]
    providers: FakeConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    rerank: Option<RerankConfig>,
}

/// Calls served, by kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// Embeddings requests (any outcome).
    pub embedding_requests: u64,
    /// Inputs embedded successfully.
    pub embedded_inputs: u64,
    /// Tokens of the requests admitted (what counts against the token window).
    pub embedded_tokens: u64,
    /// Parse uploads admitted past the upload window (any upload while no window is set).
    pub parse_uploads_admitted: u64,
    /// Parse uploads (any outcome).
    pub parse_uploads: u64,
    /// Job status polls.
    pub parse_polls: u64,
    /// Result reads.
    pub parse_results: u64,
    /// Faults injected.
    pub faults: u64,
    /// 429 answers for rate limits.
    pub rate_limited: u64,
    /// Rerank requests (any protocol, any outcome).
    pub rerank_requests: u64,
    /// Documents of the rerank requests answered with a ranking.
    pub reranked_documents: u64,
}

#[derive(Default)]
struct Inner {
    config: FakeConfig,
    rerank: RerankConfig,
    stats: Stats,
    jobs: HashMap<String, llamaparse::Job>,
    requests: HashMap<String, VecDeque<(Instant, u64)>>,
    tokens: HashMap<String, VecDeque<(Instant, u64)>>,
    uploads: VecDeque<Instant>,
    /// Rerank requests admitted per key, for `rerank.requests`.
    rerank_windows: HashMap<String, VecDeque<Instant>>,
    /// Fixed answers: an input found here is embedded as this vector instead of by hashing.
    vectors: Arc<HashMap<String, Vec<f32>>>,
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Inner>>);

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The router, for a server of one's own.
pub fn router(config: FakeConfig) -> Router {
    router_with_vectors(config, Arc::default())
}

/// The router, answering the inputs in `vectors` with those vectors (the search benchmark's corpus has vectors
/// of a known structure that no text hashes to).
pub fn router_with_vectors(config: FakeConfig, vectors: Arc<HashMap<String, Vec<f32>>>) -> Router {
    router_with_all(config, RerankConfig::default(), vectors)
}

fn router_with_all(
    config: FakeConfig,
    rerank: RerankConfig,
    vectors: Arc<HashMap<String, Vec<f32>>>,
) -> Router {
    let shared = Shared::default();
    {
        let mut inner = shared.lock();
        inner.config = config;
        inner.rerank = rerank;
        inner.vectors = vectors;
    }
    Router::new()
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/openai/v1/embeddings", post(openai::embeddings))
        .route(
            "/openai/deployments/{deployment}/embeddings",
            post(openai::azure_embeddings),
        )
        .route("/api/v2/parse/upload", post(llamaparse::v2_upload))
        .route("/api/v2/parse/{id}", get(llamaparse::v2_get))
        .route("/api/v1/parsing/upload", post(llamaparse::v1_upload))
        .route("/api/parsing/upload", post(llamaparse::v1_upload))
        .route("/api/v1/parsing/job/{id}", get(llamaparse::v1_job))
        .route("/api/parsing/job/{id}", get(llamaparse::v1_job))
        .route(
            "/api/v1/parsing/job/{id}/result/{format}",
            get(llamaparse::v1_result),
        )
        .route(
            "/api/parsing/job/{id}/result/{format}",
            get(llamaparse::v1_result),
        )
        .route("/v2/rerank", post(rerank::cohere))
        .route("/v1/rerank", post(rerank::jina))
        .route("/rerank", post(rerank::tei))
        .route("/_fake/stats", get(stats))
        .route("/_fake/config", get(get_config).put(put_config))
        .route("/_fake/reset", post(reset))
        .with_state(shared)
}

/// A fake server running in this process (tests), on a port of its own.
pub struct FakeProviders {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    http: reqwest::Client,
    task: tokio::task::JoinHandle<()>,
}

impl FakeProviders {
    /// Starts serving `config`.
    pub async fn start(config: FakeConfig) -> Self {
        Self::start_with_vectors(config, Arc::default()).await
    }

    /// Starts serving `config`, with fixed vectors for the inputs in `vectors`.
    pub async fn start_with_vectors(
        config: FakeConfig,
        vectors: Arc<HashMap<String, Vec<f32>>>,
    ) -> Self {
        Self::start_with_all(config, RerankConfig::default(), vectors).await
    }

    /// Starts serving `config`, its rerankers with `rerank`.
    pub async fn start_with_rerank(config: FakeConfig, rerank: RerankConfig) -> Self {
        Self::start_with_all(config, rerank, Arc::default()).await
    }

    async fn start_with_all(
        config: FakeConfig,
        rerank: RerankConfig,
        vectors: Arc<HashMap<String, Vec<f32>>>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let app = router_with_all(config, rerank, vectors);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            http: reqwest::Client::new(),
            task,
        }
    }

    /// Base URL for `embedding.openai.base_url`.
    pub fn openai_url(&self) -> String {
        format!("{}/v1", self.url)
    }

    /// Points `s`'s embedding at this fake OpenAI: `text-embedding-3-small` at 384 dimensions, key `sk-test`.
    pub fn embed_with(&self, s: &mut upload_pipeline::Settings) {
        use upload_pipeline::settings::{EmbedderKind, Secret};
        s.embedding.embedder = EmbedderKind::Openai;
        s.embedding.model = "text-embedding-3-small".into();
        s.embedding.dimensions = 384;
        s.embedding.openai.base_url = self.openai_url();
        s.embedding.openai.api_key = Secret("sk-test".into());
    }

    /// Points `s`'s parsing at this fake LlamaParse: key `llx-test`, a job polled after 50 ms, then at most
    /// every 200 ms.
    pub fn parse_with(&self, s: &mut upload_pipeline::Settings) {
        use upload_pipeline::settings::{ParserKind, Secret};
        s.parsing.parser = ParserKind::Llamaparse;
        s.parsing.llamaparse.base_url = self.url.clone();
        s.parsing.llamaparse.api_key = Secret("llx-test".into());
        s.parsing.llamaparse.poll_interval = Duration::from_millis(50);
        s.parsing.llamaparse.poll_interval_max = Duration::from_millis(200);
    }

    /// Points `s`'s reranker at this fake, speaking `api`: model `fake-reranker`, key `rerank-test`, on for every
    /// search.
    pub fn rerank_with(
        &self,
        s: &mut upload_pipeline::Settings,
        api: upload_pipeline::settings::RerankApi,
    ) {
        use upload_pipeline::settings::Secret;
        let r = &mut s.search.rerank;
        r.enabled = true;
        r.api_style = api;
        r.base_url = self.url.clone();
        r.api_key = Secret("rerank-test".into());
        r.model = "fake-reranker".into();
    }

    /// Calls served so far.
    pub async fn stats(&self) -> Stats {
        self.http
            .get(format!("{}/_fake/stats", self.url))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats JSON")
    }

    /// Replaces the configuration.
    pub async fn configure(&self, config: &FakeConfig) {
        let resp = self
            .http
            .put(format!("{}/_fake/config", self.url))
            .json(config)
            .send()
            .await
            .expect("configure");
        assert!(resp.status().is_success());
    }
}

impl Drop for FakeProviders {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves until the process ends.
pub async fn serve(addr: SocketAddr, config: FakeConfig) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!(
        "fake-providers listening on http://{}",
        listener.local_addr()?
    );
    axum::serve(listener, router(config)).await
}

async fn stats(State(s): State<Shared>) -> Json<Stats> {
    Json(s.lock().stats.clone())
}

async fn get_config(State(s): State<Shared>) -> Json<WireConfig> {
    let inner = s.lock();
    Json(WireConfig {
        providers: inner.config.clone(),
        rerank: Some(inner.rerank.clone()),
    })
}

async fn put_config(State(s): State<Shared>, Json(config): Json<WireConfig>) -> StatusCode {
    let mut inner = s.lock();
    inner.config = config.providers;
    if let Some(rerank) = config.rerank {
        inner.rerank = rerank;
    }
    StatusCode::NO_CONTENT
}

async fn reset(State(s): State<Shared>) -> StatusCode {
    let mut inner = s.lock();
    inner.stats = Stats::default();
    inner.requests.clear();
    inner.tokens.clear();
    inner.uploads.clear();
    inner.rerank_windows.clear();
    StatusCode::NO_CONTENT
}

/// The fault a request gets, if any.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    ServerError,
    Timeout(Duration),
    Malformed,
    Reset,
    Quota,
}

fn roll(f: &Faults) -> Option<Fault> {
    let r: f64 = rand::random();
    let mut edge = 0.0;
    for (rate, fault) in [
        (f.server_error, Fault::ServerError),
        (
            f.timeout,
            Fault::Timeout(Duration::from_millis(f.hang_ms.max(1))),
        ),
        (f.malformed, Fault::Malformed),
        (f.reset, Fault::Reset),
        (f.insufficient_quota, Fault::Quota),
    ] {
        edge += rate;
        if r < edge {
            return Some(fault);
        }
    }
    None
}

/// An answer whose connection is cut after the first bytes.
fn cut_connection() -> Response {
    let stream = futures::stream::iter(vec![
        Ok::<Bytes, std::io::Error>(Bytes::from_static(b"{\"object\":\"list\",\"data\":[")),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "injected connection reset",
        )),
    ]);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("response")
}

fn malformed() -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        "{\"object\": \"list\", \"data\": [{\"index\": 0, \"embedding\": [0.1, ",
    )
        .into_response()
}

/// The key a request carries: `Authorization: Bearer`, or Azure's `api-key` header when `azure`.
fn request_key(headers: &HeaderMap, azure: bool) -> Option<String> {
    if let (true, Some(k)) = (azure, headers.get("api-key").and_then(|v| v.to_str().ok())) {
        return Some(k.to_owned());
    }
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_follows_its_median_and_tail() {
        let l = Latency::lognormal(10.0, 100.0);
        let mut draws: Vec<f64> = (0..20_000)
            .map(|_| l.sample().as_secs_f64() * 1000.0)
            .collect();
        draws.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let median = draws[10_000];
        let p99 = draws[19_800];
        assert!((8.0..12.5).contains(&median), "{median}");
        assert!((70.0..140.0).contains(&p99), "{p99}");
        assert_eq!(Latency::default().sample(), Duration::ZERO);
        let u = Latency::between(2000.0, 8000.0);
        let draws: Vec<f64> = (0..5_000).map(|_| u.sample().as_secs_f64()).collect();
        assert!(draws.iter().all(|d| (2.0..=8.0).contains(d)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((4.8..5.2).contains(&mean), "{mean}");
    }
}
