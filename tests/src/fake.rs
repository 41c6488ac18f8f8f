//! Fake LlamaParse (v1 and v2) and OpenAI embeddings on one port, speaking the published protocols
//! (`../shared/specs/providers.md`) closely enough that the official Python clients work against it unchanged.
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
//!   the project's local parsers, page by page.
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
    extract::{Multipart, Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use upload_pipeline::{
    parsing::{self, DocKind, Limits},
    providers::hashing::HashingEmbedder,
};

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

/// The OpenAI side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OpenAiConfig {
    /// Keys accepted as `Authorization: Bearer` or `api-key`; empty accepts any request.
    pub keys: Vec<String>,
    /// Latency of every answer.
    pub latency: Latency,
    /// Requests per key per window (RPM).
    pub requests: Option<Window>,
    /// Tokens per key per window (TPM).
    pub tokens: Option<Window>,
    /// Also send `retry-after` (seconds) on 429s; the real service often does not.
    pub retry_after_header: bool,
    /// Injected faults.
    pub faults: Faults,
    /// Every request gets 429 `insufficient_quota` while set.
    pub quota_exhausted: bool,
    /// Every request gets 401 `invalid_api_key` while set, as if its key had been revoked.
    pub key_revoked: bool,
    /// The next this many requests get 503, whatever the rates say (deterministic retry tests).
    pub fail_next: u64,
    /// Models served and their native dimensions.
    pub models: HashMap<String, usize>,
    /// Most inputs per request (OpenAI: 2,048; text-embeddings-inference: 32, answered with 422).
    pub max_inputs: usize,
    /// Most tokens per input.
    pub max_input_tokens: usize,
    /// Most tokens per request.
    pub max_request_tokens: usize,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            latency: Latency::default(),
            requests: None,
            tokens: None,
            retry_after_header: false,
            faults: Faults::default(),
            quota_exhausted: false,
            key_revoked: false,
            fail_next: 0,
            models: [
                ("text-embedding-3-small", 1536),
                ("text-embedding-3-large", 3072),
                ("text-embedding-ada-002", 1536),
            ]
            .into_iter()
            .map(|(m, d)| (m.to_owned(), d))
            .collect(),
            max_inputs: 2048,
            max_input_tokens: 8192,
            max_request_tokens: 300_000,
        }
    }
}

/// The LlamaParse side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LlamaParseConfig {
    /// Keys accepted as `Authorization: Bearer`; empty accepts any request.
    pub keys: Vec<String>,
    /// Latency of every answer.
    pub latency: Latency,
    /// How long a job takes from upload to done.
    pub job_duration: Latency,
    /// Uploads per window (the real service: 50 per 10 s per organisation).
    pub uploads: Option<Window>,
    /// Injected faults.
    pub faults: Faults,
    /// Every upload gets 402 while set (credits exhausted).
    pub credits_exhausted: bool,
    /// Every request gets 401 while set, as if its key had been revoked.
    pub key_revoked: bool,
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
}

struct Job {
    done_at: Instant,
    v2: bool,
    tier: String,
    name: String,
    outcome: Result<Vec<parsing::Section>, (String, String)>,
    created: chrono::DateTime<chrono::Utc>,
}

#[derive(Default)]
struct Inner {
    config: FakeConfig,
    stats: Stats,
    jobs: HashMap<String, Job>,
    requests: HashMap<String, VecDeque<(Instant, u64)>>,
    tokens: HashMap<String, VecDeque<(Instant, u64)>>,
    uploads: VecDeque<Instant>,
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
    let shared = Shared::default();
    {
        let mut inner = shared.lock();
        inner.config = config;
        inner.vectors = vectors;
    }
    Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/openai/v1/embeddings", post(embeddings))
        .route(
            "/openai/deployments/{deployment}/embeddings",
            post(azure_embeddings),
        )
        .route("/api/v2/parse/upload", post(v2_upload))
        .route("/api/v2/parse/{id}", get(v2_get))
        .route("/api/v1/parsing/upload", post(v1_upload))
        .route("/api/parsing/upload", post(v1_upload))
        .route("/api/v1/parsing/job/{id}", get(v1_job))
        .route("/api/parsing/job/{id}", get(v1_job))
        .route("/api/v1/parsing/job/{id}/result/{format}", get(v1_result))
        .route("/api/parsing/job/{id}/result/{format}", get(v1_result))
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let app = router_with_vectors(config, vectors);
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

async fn get_config(State(s): State<Shared>) -> Json<FakeConfig> {
    Json(s.lock().config.clone())
}

async fn put_config(State(s): State<Shared>, Json(config): Json<FakeConfig>) -> StatusCode {
    s.lock().config = config;
    StatusCode::NO_CONTENT
}

async fn reset(State(s): State<Shared>) -> StatusCode {
    let mut inner = s.lock();
    inner.stats = Stats::default();
    inner.requests.clear();
    inner.tokens.clear();
    inner.uploads.clear();
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

// ---------------------------------------------------------------------------------------------------------------
// OpenAI embeddings

fn openai_error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    (
        status,
        Json(json!({ "error": { "message": message, "type": kind, "param": null, "code": code } })),
    )
        .into_response()
}

/// Go-style duration, as OpenAI's reset headers.
fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let secs = format!("{:.3}", d.as_secs_f64());
        format!("{}s", secs.trim_end_matches('0').trim_end_matches('.'))
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

/// Drops entries older than the window and returns (used, time until the oldest leaves).
fn window_use(q: &mut VecDeque<(Instant, u64)>, w: &Window, now: Instant) -> (u64, Duration) {
    let span = Duration::from_millis(w.window_ms);
    while q
        .front()
        .is_some_and(|(t, _)| now.duration_since(*t) >= span)
    {
        q.pop_front();
    }
    let used = q.iter().map(|(_, n)| n).sum();
    let reset = q.front().map_or(Duration::ZERO, |(t, _)| {
        span.saturating_sub(now.duration_since(*t))
    });
    (used, reset)
}

async fn azure_embeddings(
    State(s): State<Shared>,
    Path(deployment): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !q.contains_key("api-version") {
        return openai_error(
            StatusCode::NOT_FOUND,
            "Resource not found",
            "invalid_request_error",
            Some("404"),
        );
    }
    let mut body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                &format!("invalid JSON: {e}"),
                "invalid_request_error",
                None,
            );
        }
    };
    // The deployment names the model.
    if body.get("model").is_none() {
        body["model"] = Value::String(deployment);
    }
    embed_request(s, headers, body, true).await
}

async fn embeddings(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    match serde_json::from_slice::<Value>(&body) {
        Ok(v) => embed_request(s, headers, v, false).await,
        Err(e) => openai_error(
            StatusCode::BAD_REQUEST,
            &format!(
                "We could not parse the JSON body of your request. ({e}) (HINT: This likely means you aren't using your HTTP library correctly.)"
            ),
            "invalid_request_error",
            None,
        ),
    }
}

/// A key as OpenAI shows it in a 401: its first three and last four characters (all hidden when that would be
/// most of it).
fn masked(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 12 {
        return "*".repeat(chars.len());
    }
    let (head, tail) = (&chars[..3], &chars[chars.len() - 4..]);
    format!(
        "{}{}{}",
        head.iter().collect::<String>(),
        "*".repeat(chars.len() - 7),
        tail.iter().collect::<String>()
    )
}

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

/// The inputs of an embeddings request as texts (token arrays are decoded).
fn inputs(input: &Value) -> Result<Vec<String>, String> {
    let bpe = upload_pipeline::chunking::tokenizer();
    let tokens = |arr: &Vec<Value>| -> Result<String, String> {
        let ids: Vec<u32> = arr
            .iter()
            .map(|t| {
                t.as_u64()
                    .map(|n| n as u32)
                    .ok_or("token arrays hold integers")
            })
            .collect::<Result<_, _>>()?;
        bpe.decode(&ids).map_err(|e| format!("invalid tokens: {e}"))
    };
    match input {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) if items.iter().all(Value::is_string) => Ok(items
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .collect()),
        Value::Array(items) if items.iter().all(Value::is_number) => Ok(vec![tokens(items)?]),
        Value::Array(items) if items.iter().all(Value::is_array) => items
            .iter()
            .map(|v| tokens(v.as_array().expect("array")))
            .collect(),
        _ => Err("'input' must be a string, an array of strings, or token arrays".into()),
    }
}

async fn embed_request(s: Shared, headers: HeaderMap, body: Value, azure: bool) -> Response {
    let (config, fail_now) = {
        let mut inner = s.lock();
        inner.stats.embedding_requests += 1;
        let fail_now = inner.config.openai.fail_next > 0;
        if fail_now {
            inner.config.openai.fail_next -= 1;
            inner.stats.faults += 1;
        }
        (inner.config.openai.clone(), fail_now)
    };
    tokio::time::sleep(config.latency.sample()).await;
    let key = request_key(&headers, azure);
    let refused = config.key_revoked
        || (!config.keys.is_empty() && !key.as_ref().is_some_and(|k| config.keys.contains(k)));
    if refused {
        return match &key {
            None => openai_error(
                StatusCode::UNAUTHORIZED,
                "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) if you're accessing the API from your browser and are prompted for a username and password. You can obtain an API key from https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                None,
            ),
            Some(k) => openai_error(
                StatusCode::UNAUTHORIZED,
                &format!(
                    "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
                    masked(k)
                ),
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
        };
    }
    let quota = || {
        openai_error(
            StatusCode::TOO_MANY_REQUESTS,
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            Some("insufficient_quota"),
        )
    };
    if config.quota_exhausted {
        return quota();
    }
    let fault = if fail_now {
        Some(Fault::ServerError)
    } else {
        roll(&config.faults).inspect(|_| s.lock().stats.faults += 1)
    };
    if let Some(fault) = fault {
        match fault {
            Fault::ServerError => {
                return if rand::random::<bool>() {
                    openai_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "The server had an error while processing your request. Sorry about that!",
                        "server_error",
                        None,
                    )
                } else {
                    openai_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "The server is overloaded or not ready yet.",
                        "server_error",
                        None,
                    )
                };
            }
            Fault::Timeout(d) => {
                tokio::time::sleep(d).await;
                return StatusCode::GATEWAY_TIMEOUT.into_response();
            }
            Fault::Malformed => return malformed(),
            Fault::Reset => return cut_connection(),
            Fault::Quota => return quota(),
        }
    }
    // Validation, in the order the real API checks.
    let Some(obj) = body.as_object() else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "The body must be a JSON object.",
            "invalid_request_error",
            None,
        );
    };
    if let Some(unknown) = obj.keys().find(|k| {
        !["model", "input", "encoding_format", "dimensions", "user"].contains(&k.as_str())
    }) {
        return openai_error(
            StatusCode::BAD_REQUEST,
            &format!("Unrecognized request argument supplied: {unknown}"),
            "invalid_request_error",
            None,
        );
    }
    let Some(model) = obj.get("model").and_then(Value::as_str) else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "you must provide a model parameter",
            "invalid_request_error",
            None,
        );
    };
    let Some(&native) = config.models.get(model) else {
        return openai_error(
            StatusCode::NOT_FOUND,
            &format!("The model `{model}` does not exist or you do not have access to it."),
            "invalid_request_error",
            Some("model_not_found"),
        );
    };
    let texts = match obj.get("input").map(inputs) {
        Some(Ok(t)) => t,
        Some(Err(m)) => {
            return openai_error(StatusCode::BAD_REQUEST, &m, "invalid_request_error", None);
        }
        None => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "'input' is a required property",
                "invalid_request_error",
                None,
            );
        }
    };
    if texts.is_empty() || texts.iter().any(String::is_empty) {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.",
            "invalid_request_error",
            None,
        );
    }
    if texts.len() > config.max_inputs {
        // text-embeddings-inference answers a batch over its limit with 422; OpenAI with 400.
        let status = if config.max_inputs < 2048 {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::BAD_REQUEST
        };
        return openai_error(
            status,
            &format!(
                "batch size {} > maximum allowed batch size {}",
                texts.len(),
                config.max_inputs
            ),
            "invalid_request_error",
            None,
        );
    }
    let encoding = obj
        .get("encoding_format")
        .and_then(Value::as_str)
        .unwrap_or("float");
    if !["float", "base64"].contains(&encoding) {
        return openai_error(
            StatusCode::BAD_REQUEST,
            &format!("'{encoding}' is not one of ['float', 'base64'] - 'encoding_format'"),
            "invalid_request_error",
            None,
        );
    }
    let dims = match obj.get("dimensions") {
        None | Some(Value::Null) => native,
        Some(d) if model.starts_with("text-embedding-3") => match d.as_u64() {
            Some(d) if d >= 1 && d as usize <= native => d as usize,
            _ => {
                return openai_error(
                    StatusCode::BAD_REQUEST,
                    &format!("Invalid value for 'dimensions': must be between 1 and {native}."),
                    "invalid_request_error",
                    None,
                );
            }
        },
        Some(_) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "This model does not support specifying dimensions.",
                "invalid_request_error",
                None,
            );
        }
    };
    let bpe = upload_pipeline::chunking::tokenizer();
    let counts: Vec<usize> = texts.iter().map(|t| bpe.encode_ordinary(t).len()).collect();
    if let Some(&long) = counts.iter().find(|&&n| n > config.max_input_tokens) {
        return openai_error(
            StatusCode::BAD_REQUEST,
            &format!(
                "This model's maximum context length is {} tokens, however you requested {long} tokens ({long} in your prompt; 0 for the completion). Please reduce your prompt; or completion length.",
                config.max_input_tokens
            ),
            "invalid_request_error",
            None,
        );
    }
    let total: usize = counts.iter().sum();
    if total > config.max_request_tokens {
        return openai_error(
            StatusCode::BAD_REQUEST,
            &format!(
                "Requested {total} tokens, max {} tokens per request",
                config.max_request_tokens
            ),
            "max_tokens_per_request",
            Some("max_tokens_per_request"),
        );
    }

    // Rate limits, per key, over sliding windows: the request counts against both budgets only if admitted.
    let who = key.unwrap_or_else(|| "anonymous".into());
    let now = Instant::now();
    let mut rate_headers = HeaderMap::new();
    let mut limited: Option<(String, Duration)> = None;
    {
        let mut inner = s.lock();
        let inner = &mut *inner;
        let rq = inner.requests.entry(who.clone()).or_default();
        let tq = inner.tokens.entry(who).or_default();
        let mut admit = true;
        for (name, window, queue, cost) in [
            ("requests", config.requests, &mut *rq, 1u64),
            ("tokens", config.tokens, &mut *tq, total as u64),
        ] {
            let Some(w) = window else { continue };
            let (used, reset) = window_use(queue, &w, now);
            let over = used + cost > w.limit;
            if over && admit {
                admit = false;
                let unit = if name == "requests" { "RPM" } else { "TPM" };
                limited = Some((
                    format!(
                        "Rate limit reached for {model} in organization org-fake on {name} per min ({unit}): Limit {}, Used {used}, Requested {cost}. Please try again in {}. Visit https://platform.openai.com/account/rate-limits to learn more.",
                        w.limit,
                        go_duration(reset.max(Duration::from_millis(1)))
                    ),
                    reset.max(Duration::from_millis(1)),
                ));
            }
            rate_headers.insert(
                axum::http::HeaderName::from_bytes(format!("x-ratelimit-limit-{name}").as_bytes())
                    .expect("header"),
                HeaderValue::from(w.limit),
            );
            rate_headers.insert(
                axum::http::HeaderName::from_bytes(
                    format!("x-ratelimit-remaining-{name}").as_bytes(),
                )
                .expect("header"),
                HeaderValue::from(w.limit.saturating_sub(used + if over { 0 } else { cost })),
            );
            rate_headers.insert(
                axum::http::HeaderName::from_bytes(format!("x-ratelimit-reset-{name}").as_bytes())
                    .expect("header"),
                HeaderValue::from_str(&go_duration(reset)).expect("header"),
            );
        }
        if admit {
            rq.push_back((now, 1));
            tq.push_back((now, total as u64));
            inner.stats.embedded_inputs += texts.len() as u64;
            inner.stats.embedded_tokens += total as u64;
        } else {
            inner.stats.rate_limited += 1;
        }
    }
    rate_headers.insert(
        "x-request-id",
        HeaderValue::from_str(&format!("req_{}", uuid::Uuid::new_v4().simple())).expect("id"),
    );
    if let Some((message, reset)) = limited {
        let mut resp = openai_error(
            StatusCode::TOO_MANY_REQUESTS,
            &message,
            "requests",
            Some("rate_limit_exceeded"),
        );
        if config.retry_after_header {
            rate_headers.insert(
                "retry-after",
                HeaderValue::from(reset.as_secs_f64().ceil() as u64),
            );
        }
        resp.headers_mut().extend(rate_headers);
        return resp;
    }

    let embedder = HashingEmbedder::new(model, dims);
    let fixed = s.lock().vectors.clone();
    let data: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let v = fixed.get(t).cloned().unwrap_or_else(|| embedder.vector(t));
            let embedding = if encoding == "base64" {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    let mut resp = Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": { "prompt_tokens": total, "total_tokens": total },
    }))
    .into_response();
    resp.headers_mut().extend(rate_headers);
    resp
}

// ---------------------------------------------------------------------------------------------------------------
// LlamaParse

fn detail(status: StatusCode, detail: impl Into<Value>) -> Response {
    (status, Json(json!({ "detail": detail.into() }))).into_response()
}

/// Auth, credits, the upload window and injected faults, common to every LlamaParse call; `Some` answers at once.
async fn llama_gate(s: &Shared, headers: &HeaderMap, upload: bool) -> Option<Response> {
    let config = s.lock().config.llamaparse.clone();
    tokio::time::sleep(config.latency.sample()).await;
    let key = request_key(headers, false);
    if key.is_none() && (config.key_revoked || !config.keys.is_empty()) {
        return Some(detail(StatusCode::UNAUTHORIZED, "Not authenticated"));
    }
    if config.key_revoked
        || (!config.keys.is_empty() && !key.as_ref().is_some_and(|k| config.keys.contains(k)))
    {
        return Some(detail(
            StatusCode::UNAUTHORIZED,
            "Invalid authentication token",
        ));
    }
    if upload && config.credits_exhausted {
        return Some(detail(
            StatusCode::PAYMENT_REQUIRED,
            "You have exhausted your free credits. Please upgrade your plan.",
        ));
    }
    if let Some(fault) = roll(&config.faults) {
        s.lock().stats.faults += 1;
        return Some(match fault {
            Fault::ServerError => {
                detail(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
            }
            Fault::Timeout(d) => {
                tokio::time::sleep(d).await;
                StatusCode::GATEWAY_TIMEOUT.into_response()
            }
            Fault::Malformed => malformed(),
            Fault::Reset => cut_connection(),
            Fault::Quota => detail(
                StatusCode::PAYMENT_REQUIRED,
                "You have exhausted your free credits. Please upgrade your plan.",
            ),
        });
    }
    if let (true, Some(w)) = (upload, config.uploads) {
        let now = Instant::now();
        let mut inner = s.lock();
        let span = Duration::from_millis(w.window_ms);
        while inner
            .uploads
            .front()
            .is_some_and(|t| now.duration_since(*t) >= span)
        {
            inner.uploads.pop_front();
        }
        if inner.uploads.len() as u64 >= w.limit {
            inner.stats.rate_limited += 1;
            return Some(detail(
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit exceeded. Please try again later.",
            ));
        }
        inner.uploads.push_back(now);
        inner.stats.parse_uploads_admitted += 1;
    }
    None
}

struct Upload {
    name: String,
    bytes: Vec<u8>,
    fields: HashMap<String, String>,
}

async fn read_upload(mut form: Multipart) -> Result<Upload, Response> {
    let mut file = None;
    let mut fields = HashMap::new();
    loop {
        match form.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or_default().to_owned();
                if name == "file" || name == "upload_file" {
                    let filename = field.file_name().unwrap_or("upload").to_owned();
                    let bytes = field.bytes().await.map_err(|e| {
                        detail(StatusCode::BAD_REQUEST, format!("unreadable file: {e}"))
                    })?;
                    file = Some((filename, bytes.to_vec()));
                } else {
                    let text = field.text().await.map_err(|e| {
                        detail(StatusCode::BAD_REQUEST, format!("unreadable field: {e}"))
                    })?;
                    fields.insert(name, text);
                }
            }
            Ok(None) => break,
            Err(e) => {
                return Err(detail(
                    StatusCode::BAD_REQUEST,
                    format!("malformed multipart body: {e}"),
                ));
            }
        }
    }
    let Some((name, bytes)) = file else {
        return Err(detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!([{ "type": "missing", "loc": ["body", "file"], "msg": "Field required" }]),
        ));
    };
    Ok(Upload {
        name,
        bytes,
        fields,
    })
}

/// Starts a job: parses with the project's local parsers (the result waits until the job's time is up).
fn start_job(
    s: &Shared,
    upload: Upload,
    v2: bool,
    tier: String,
    max_pages: Option<usize>,
) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    let config = s.lock().config.llamaparse.clone();
    let outcome = if rand::random::<f64>() < config.faults.job_error {
        s.lock().stats.faults += 1;
        Err((
            "PDF_IS_BROKEN".to_owned(),
            "Injected failure: the document could not be parsed".to_owned(),
        ))
    } else {
        match DocKind::detect(&upload.name, &upload.bytes) {
            Err(e) => Err(("UNSUPPORTED_FILE_TYPE".to_owned(), e.to_string())),
            Ok(kind) => {
                let limits = Limits {
                    max_pages: max_pages.unwrap_or(10_000),
                    max_chars: 50_000_000,
                };
                parsing::parse(kind, &upload.bytes, limits)
                    .map_err(|e| ("PARSE_ERROR".to_owned(), e.to_string()))
            }
        }
    };
    s.lock().jobs.insert(
        id.clone(),
        Job {
            done_at: Instant::now() + config.job_duration.sample(),
            v2,
            tier,
            name: upload.name,
            outcome,
            created: chrono::Utc::now(),
        },
    );
    id
}

/// Counts an upload, passes it through the gate and reads its form; `Err` is the answer to give instead.
async fn accept_upload(
    s: &Shared,
    headers: &HeaderMap,
    form: Multipart,
) -> Result<Upload, Response> {
    s.lock().stats.parse_uploads += 1;
    if let Some(r) = llama_gate(s, headers, true).await {
        return Err(r);
    }
    read_upload(form).await
}

async fn v2_upload(State(s): State<Shared>, headers: HeaderMap, form: Multipart) -> Response {
    let upload = match accept_upload(&s, &headers, form).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let Some(raw) = upload.fields.get("configuration") else {
        return detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!([{ "type": "missing", "loc": ["body", "configuration"], "msg": "Field required" }]),
        );
    };
    let config: Value = match serde_json::from_str(raw) {
        Ok(Value::Object(c)) => Value::Object(c),
        _ => {
            return detail(
                StatusCode::BAD_REQUEST,
                "configuration must be a JSON object",
            );
        }
    };
    const KNOWN: &[&str] = &[
        "tier",
        "version",
        "page_ranges",
        "processing_options",
        "output_options",
        "processing_control",
        "disable_cache",
        "agentic_options",
        "input_options",
        "webhook_configurations",
        "crop_box",
        "client_name",
    ];
    if let Some(unknown) = config
        .as_object()
        .and_then(|c| c.keys().find(|k| !KNOWN.contains(&k.as_str())))
    {
        return detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!([{ "type": "extra_forbidden", "loc": ["body", "configuration", unknown], "msg": "Extra inputs are not permitted" }]),
        );
    }
    let tier = config
        .get("tier")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !["fast", "cost_effective", "agentic", "agentic_plus"].contains(&tier) {
        return detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!([{ "type": "enum", "loc": ["body", "configuration", "tier"], "msg": "Input should be 'fast', 'cost_effective', 'agentic' or 'agentic_plus'" }]),
        );
    }
    if config.get("version").and_then(Value::as_str).is_none() {
        return detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!([{ "type": "missing", "loc": ["body", "configuration", "version"], "msg": "Field required" }]),
        );
    }
    let max_pages = config
        .pointer("/page_ranges/max_pages")
        .and_then(Value::as_u64)
        .map(|n| n as usize);
    let tier = tier.to_owned();
    let id = start_job(&s, upload, true, tier, max_pages);
    let inner = s.lock();
    Json(v2_job(&id, &inner.jobs[&id])).into_response()
}

fn v2_status(job: &Job) -> (&'static str, Option<String>) {
    if Instant::now() < job.done_at {
        return ("PENDING", None);
    }
    match &job.outcome {
        Ok(_) => ("COMPLETED", None),
        Err((code, message)) => ("FAILED", Some(format!("{code}: {message}"))),
    }
}

fn v2_job(id: &str, job: &Job) -> Value {
    let (status, error) = v2_status(job);
    let created = job
        .created
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    json!({
        "id": id,
        "project_id": "00000000-0000-4000-8000-000000000001",
        "status": status,
        "tier": job.tier,
        "created_at": created,
        "updated_at": created,
        "error_message": error,
        "name": job.name,
    })
}

async fn v2_get(
    State(s): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: axum::extract::RawQuery,
) -> Response {
    let expand: Vec<String> = query
        .0
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.strip_prefix("expand="))
        .flat_map(|v| v.split(',').map(|x| x.replace("%2C", ",")))
        .flat_map(|v| v.split(',').map(str::to_owned).collect::<Vec<_>>())
        .collect();
    {
        let mut inner = s.lock();
        if expand.is_empty() {
            inner.stats.parse_polls += 1;
        } else {
            inner.stats.parse_results += 1;
        }
    }
    if let Some(r) = llama_gate(&s, &headers, false).await {
        return r;
    }
    let inner = s.lock();
    let Some(job) = inner.jobs.get(&id).filter(|j| j.v2) else {
        return detail(StatusCode::NOT_FOUND, "Job not found");
    };
    let mut body = json!({ "job": v2_job(&id, job) });
    if let (Ok(sections), "COMPLETED") = (&job.outcome, v2_status(job).0) {
        let pages = page_list(sections);
        if expand.iter().any(|e| e == "markdown") {
            body["markdown"] = json!({ "pages": pages.iter().map(|(n, md)| json!({ "page_number": n, "markdown": md, "success": true })).collect::<Vec<_>>() });
        }
        if expand.iter().any(|e| e == "markdown_full") {
            body["markdown_full"] = Value::String(
                pages
                    .iter()
                    .map(|(_, m)| m.as_str())
                    .collect::<Vec<_>>()
                    .join("\n\n"),
            );
        }
        if expand.iter().any(|e| e == "text") {
            body["text"] = json!({ "pages": pages.iter().map(|(n, md)| json!({ "page_number": n, "text": md })).collect::<Vec<_>>() });
        }
        if expand.iter().any(|e| e == "text_full") {
            body["text_full"] = Value::String(
                pages
                    .iter()
                    .map(|(_, m)| m.as_str())
                    .collect::<Vec<_>>()
                    .join("\n\n"),
            );
        }
    }
    Json(body).into_response()
}

/// Sections as (page number from 1, Markdown).
fn page_list(sections: &[parsing::Section]) -> Vec<(u32, String)> {
    sections
        .iter()
        .enumerate()
        .map(|(i, s)| (s.page.unwrap_or(i as u32 + 1), s.markdown.clone()))
        .collect()
}

async fn v1_upload(State(s): State<Shared>, headers: HeaderMap, form: Multipart) -> Response {
    let upload = match accept_upload(&s, &headers, form).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let max_pages = match upload
        .fields
        .get("max_pages")
        .map(|m| m.trim().parse::<usize>())
    {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => {
            return detail(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!([{ "type": "int_parsing", "loc": ["body", "max_pages"], "msg": "Input should be a valid integer" }]),
            );
        }
    };
    let id = start_job(&s, upload, false, String::new(), max_pages);
    Json(json!({ "id": id, "status": "PENDING" })).into_response()
}

fn v1_status(job: &Job) -> Value {
    if Instant::now() < job.done_at {
        return json!({ "status": "PENDING" });
    }
    match &job.outcome {
        Ok(_) => json!({ "status": "SUCCESS" }),
        Err((code, message)) => {
            json!({ "status": "ERROR", "error_code": code, "error_message": message })
        }
    }
}

async fn v1_job(State(s): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    s.lock().stats.parse_polls += 1;
    if let Some(r) = llama_gate(&s, &headers, false).await {
        return r;
    }
    let inner = s.lock();
    let Some(job) = inner.jobs.get(&id).filter(|j| !j.v2) else {
        return detail(StatusCode::NOT_FOUND, "Job not found");
    };
    let mut body = v1_status(job);
    body["id"] = Value::String(id);
    Json(body).into_response()
}

async fn v1_result(
    State(s): State<Shared>,
    Path((id, format)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    s.lock().stats.parse_results += 1;
    if let Some(r) = llama_gate(&s, &headers, false).await {
        return r;
    }
    let inner = s.lock();
    let Some(job) = inner.jobs.get(&id).filter(|j| !j.v2) else {
        return detail(StatusCode::NOT_FOUND, "Job not found");
    };
    let not_ready = || {
        detail(
            StatusCode::NOT_FOUND,
            "Result not found. Check job status to see if it has completed.",
        )
    };
    if Instant::now() < job.done_at {
        return not_ready();
    }
    let Ok(sections) = &job.outcome else {
        return not_ready();
    };
    let pages = page_list(sections);
    let metadata =
        json!({ "job_pages": pages.len(), "job_is_cache_hit": false, "credits_used": pages.len() });
    let joined = pages
        .iter()
        .map(|(_, m)| m.as_str())
        .collect::<Vec<_>>()
        .join("\n---\n");
    match format.as_str() {
        "markdown" => Json(json!({ "markdown": joined, "job_metadata": metadata })).into_response(),
        "text" => Json(json!({ "text": joined, "job_metadata": metadata })).into_response(),
        "json" => Json(json!({
            "pages": pages.iter().map(|(n, md)| json!({ "page": n, "text": md, "md": md, "items": [] })).collect::<Vec<_>>(),
            "job_metadata": metadata,
        }))
        .into_response(),
        _ => detail(StatusCode::NOT_FOUND, "Not Found"),
    }
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

    #[test]
    fn refused_keys_are_shown_masked() {
        assert_eq!(
            masked("sk-SECRET-openai-5f0c1e9a7b3d"),
            "sk-**********************7b3d"
        );
        assert_eq!(masked("sk-wrong"), "********");
    }

    #[test]
    fn reset_headers_are_go_durations() {
        assert_eq!(go_duration(Duration::from_millis(12)), "12ms");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_secs(1)), "1s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
    }
}
