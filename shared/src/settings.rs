//! Typed, validated settings: built-in defaults, then an optional TOML file, then environment variables.
//!
//! Environment variables: `REDIS_URL`, `LOG_FORMAT` (`text` or `json`), `RUST_LOG` (a tracing filter), and any
//! field as `UPLOAD_PIPELINE__<SECTION>__<FIELD>`, e.g. `UPLOAD_PIPELINE__QUEUE__RECLAIM_AFTER=10s`.
//! `deploy/config.example.toml` documents every field. Settings are read once at start-up and passed down.

use std::{net::SocketAddr, path::Path, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A value has the wrong type or an unknown field was given.
    #[error("invalid settings: {0}")]
    Parse(#[from] Box<figment::Error>),
    /// A value is out of its allowed range.
    #[error("invalid setting `{field}`: {reason}")]
    Invalid {
        /// The dotted field name, e.g. `queue.max_deliveries`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// All settings of a producer or worker process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Redis that carries the queues and the fleet-wide state (`REDIS_URL`).
    pub redis_url: RedisUrl,
    /// PostgreSQL with pgvector, the source of truth (`DATABASE_URL`). The API and the workers never connect as a
    /// role that bypasses row-level security: when this URL names one (a superuser, or a role with BYPASSRLS),
    /// their pools connect as `database_app_role` instead, on the same server and database.
    pub database_url: RedisUrl,
    /// Where migrations run (`DATABASE_ADMIN_URL`): a role that may create the schema, the roles and indexes.
    /// Unset: `database_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_admin_url: Option<RedisUrl>,
    /// The role the API and the workers use: LOGIN, no superuser, no BYPASSRLS (the migrations create it).
    pub database_app_role: String,
    /// Its password, when the server asks for one (`DATABASE_APP_PASSWORD`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_app_password: Option<Secret>,
    /// The job queues.
    pub queue: QueueSettings,
    /// The producer's HTTP API.
    pub api: ApiSettings,
    /// How uploads become Markdown: the local parsers or LlamaParse.
    pub parsing: ParsingSettings,
    /// How chunks and queries become vectors: the local model, an OpenAI-compatible API, or hashing.
    pub embedding: EmbeddingSettings,
    /// How parsed documents are cut into chunks.
    pub chunking: ChunkingSettings,
    /// The fleet-wide provider budgets.
    pub quota: QuotaSettings,
    /// Limits and recovery of the document pipeline.
    pub pipeline: PipelineSettings,
    /// Worker processes.
    pub worker: WorkerSettings,
    /// Logging.
    pub log: LogSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            redis_url: RedisUrl("redis://127.0.0.1:6379".into()),
            database_url: RedisUrl("postgres://postgres@127.0.0.1:5432/upload_pipeline".into()),
            database_admin_url: None,
            database_app_role: "upload_pipeline_app".into(),
            database_app_password: None,
            queue: QueueSettings::default(),
            api: ApiSettings::default(),
            parsing: ParsingSettings::default(),
            embedding: EmbeddingSettings::default(),
            chunking: ChunkingSettings::default(),
            quota: QuotaSettings::default(),
            pipeline: PipelineSettings::default(),
            worker: WorkerSettings::default(),
            log: LogSettings::default(),
        }
    }
}

/// A connection URL (Redis or Postgres); its password is never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RedisUrl(pub String);

/// A secret (key, token secret): never printed, never logged.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// The JWT secret used when none is configured: accepted only while the API listens on a loopback address.
pub const DEV_JWT_SECRET: &str = "upload-pipeline-development-secret-do-not-use-in-production";

/// Settings of the producer's HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    /// Where `producer serve` listens.
    pub listen: SocketAddr,
    /// HS256 secret of the bearer tokens (`JWT_SECRET`); the built-in development secret only works on loopback.
    pub jwt_secret: Secret,
    /// Largest upload, in bytes; larger ones get 413 while they stream in.
    pub max_upload_bytes: u64,
    /// Largest `k` of a search.
    pub max_search_k: u32,
    /// A JWKS file (JSON Web Key Set) whose public keys verify RS256/PS256/ES256 tokens (Auth0, Supabase
    /// asymmetric keys), beside HS256 with `jwt_secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<std::path::PathBuf>,
    /// Required `iss` of tokens, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` of tokens, when set (Supabase: `authenticated`; Auth0: the API identifier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_audience: Option<String>,
    /// Dotted path of the boolean claim that grants operator rights (dead letters, quota).
    pub admin_claim: String,
    /// Uploads a user may make per minute, fleet-wide (0: no limit); past it, 429 with Retry-After.
    pub uploads_per_minute: u32,
    /// Uploads a user may make at once above that rate.
    pub upload_burst: u32,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            jwt_secret: Secret(DEV_JWT_SECRET.into()),
            max_upload_bytes: 50 * 1024 * 1024,
            max_search_k: 50,
            jwks_file: None,
            jwt_issuer: None,
            jwt_audience: None,
            admin_claim: "admin".into(),
            uploads_per_minute: 120,
            upload_burst: 20,
        }
    }
}

/// Which embedder turns chunks and queries into vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbedderKind {
    /// A deterministic lexical embedder with no model: offline, instant, for tests and smoke runs.
    Hashing,
    /// An OpenAI-compatible `/embeddings` endpoint (OpenAI, Azure OpenAI, vLLM, text-embeddings-inference, Ollama).
    Openai,
    /// all-MiniLM-L6-v2 (or another BERT sentence encoder) run in-process on the CPU with candle.
    Local,
}

/// Settings of the embedder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddingSettings {
    /// `hashing`, `openai` or `local`.
    #[serde(alias = "provider")]
    pub embedder: EmbedderKind,
    /// The model name sent to the provider and stored with every vector; a new name gets its own index.
    pub model: String,
    /// Vector dimensions (sent as `dimensions` to OpenAI text-embedding-3 models; checked against a local model).
    pub dimensions: u32,
    /// Chunks per embed job (each job is one or more provider requests within the provider's limits).
    pub batch_size: usize,
    /// The OpenAI-compatible client.
    pub openai: OpenAiSettings,
    /// The local model.
    pub local: LocalModelSettings,
}

impl Default for EmbeddingSettings {
    fn default() -> Self {
        Self {
            embedder: EmbedderKind::Hashing,
            model: "hashing-v1".into(),
            dimensions: 384,
            batch_size: 64,
            openai: OpenAiSettings::default(),
            local: LocalModelSettings::default(),
        }
    }
}

/// How requests are addressed: OpenAI's `{base_url}/embeddings` with a bearer key, or an Azure OpenAI deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiStyle {
    /// `POST {base_url}/embeddings`, `Authorization: Bearer` (OpenAI, vLLM, TEI, Ollama, Azure's `/openai/v1`).
    Openai,
    /// `POST {base_url}/openai/deployments/{azure_deployment}/embeddings?api-version=...`, header `api-key`.
    Azure,
}

/// How vectors travel in answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    /// Little-endian f32 bytes in base64: exact and a quarter of the size (what the official clients ask for).
    Base64,
    /// JSON numbers (for servers without base64 support).
    Float,
}

/// The OpenAI-compatible embeddings client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiSettings {
    /// `openai` or `azure`.
    pub api_style: ApiStyle,
    /// Base URL: up to `/v1` for OpenAI-style servers (`https://api.openai.com/v1`), the resource for Azure
    /// (`https://{resource}.openai.azure.com`).
    pub base_url: String,
    /// The key (`OPENAI_API_KEY`, or `AZURE_OPENAI_API_KEY` for Azure); empty for servers without auth.
    pub api_key: Secret,
    /// Azure only: the deployment name.
    pub azure_deployment: String,
    /// Azure only: the `api-version` query parameter.
    pub azure_api_version: String,
    /// `base64` or `float`.
    pub encoding_format: EncodingFormat,
    /// Most inputs per request (OpenAI: 2,048); smaller limits are learnt from 413/422 answers.
    pub max_inputs: usize,
    /// Most tokens per request (OpenAI: 300,000).
    pub max_request_tokens: usize,
    /// Most tokens per input (OpenAI: 8,192); longer inputs are truncated with a warning.
    pub max_input_tokens: usize,
    /// Timeout of one request.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for OpenAiSettings {
    fn default() -> Self {
        Self {
            api_style: ApiStyle::Openai,
            base_url: "https://api.openai.com/v1".into(),
            api_key: Secret(String::new()),
            azure_deployment: String::new(),
            azure_api_version: "2024-10-21".into(),
            encoding_format: EncodingFormat::Base64,
            max_inputs: 2048,
            max_request_tokens: 300_000,
            max_input_tokens: 8192,
            timeout: Duration::from_secs(60),
        }
    }
}

/// The in-process model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalModelSettings {
    /// A folder in the Hugging Face layout: `config.json`, `tokenizer.json`, `model.safetensors` (`make model`).
    pub model_dir: std::path::PathBuf,
    /// Longest input in tokens; longer inputs are truncated (all-MiniLM-L6-v2 was trained on 256).
    pub max_tokens: usize,
    /// Inputs per forward pass.
    pub batch_size: usize,
}

impl Default for LocalModelSettings {
    fn default() -> Self {
        Self {
            model_dir: "models/all-MiniLM-L6-v2".into(),
            max_tokens: 256,
            batch_size: 16,
        }
    }
}

/// The fleet-wide provider budgets (see `upload_pipeline::quota`); a limit of 0 is no limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaSettings {
    /// Longest a call waits in-process for its budget; a longer wait defers the job to the queue instead.
    /// Embedding requests are sized so that one is granted within it; a single chunk that never could be
    /// (`chunking.max_tokens` against `quota.openai.tokens_per_minute`) is refused at start-up.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Embeddings (OpenAI-compatible).
    pub openai: OpenAiQuota,
    /// LlamaParse.
    pub llamaparse: LlamaParseQuota,
}

impl Default for QuotaSettings {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_secs(30),
            openai: OpenAiQuota::default(),
            llamaparse: LlamaParseQuota::default(),
        }
    }
}

/// The embedding provider's limits (per model and key) and the fleet's daily budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiQuota {
    /// Requests per minute (OpenAI tier 1: 3,000).
    pub requests_per_minute: u64,
    /// Tokens per minute (OpenAI tier 1: 1,000,000).
    pub tokens_per_minute: u64,
    /// Tokens per UTC day for the whole fleet; past it, jobs wait for the next day.
    pub daily_tokens: u64,
    /// Price, for the cost metric (text-embedding-3-small: 0.02).
    pub usd_per_million_tokens: f64,
}

impl Default for OpenAiQuota {
    fn default() -> Self {
        Self {
            requests_per_minute: 3000,
            tokens_per_minute: 1_000_000,
            daily_tokens: 0,
            usd_per_million_tokens: 0.02,
        }
    }
}

/// LlamaParse's limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlamaParseQuota {
    /// Uploads per `window` (LlamaCloud: 50 per 10 s per organisation).
    pub uploads: u64,
    /// The upload window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Pages per UTC day for the whole fleet; past it, parse jobs wait for the next day.
    pub pages_per_day: u64,
}

impl Default for LlamaParseQuota {
    fn default() -> Self {
        Self {
            uploads: 50,
            window: Duration::from_secs(10),
            pages_per_day: 0,
        }
    }
}

/// Which parser turns uploads into Markdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParserKind {
    /// The built-in parsers (text, Markdown, HTML, PDF text layer, DOCX), in-process.
    Local,
    /// LlamaParse (LlamaCloud) for PDF, DOCX and HTML; text and Markdown stay local, being Markdown already.
    Llamaparse,
}

/// Settings of the parse stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParsingSettings {
    /// `local` or `llamaparse`.
    pub parser: ParserKind,
    /// The LlamaParse client.
    pub llamaparse: LlamaParseSettings,
}

impl Default for ParsingSettings {
    fn default() -> Self {
        Self {
            parser: ParserKind::Local,
            llamaparse: LlamaParseSettings::default(),
        }
    }
}

/// LlamaParse API generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LlamaParseApi {
    /// `/api/v2/parse` (current).
    V2,
    /// `/api/v1/parsing` (older, still served).
    V1,
}

/// LlamaCloud region; keys work only in their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Region {
    /// `https://api.cloud.llamaindex.ai`.
    Na,
    /// `https://api.cloud.eu.llamaindex.ai`.
    Eu,
}

/// The LlamaParse client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlamaParseSettings {
    /// `v2` or `v1`.
    pub api_version: LlamaParseApi,
    /// `na` or `eu`: picks the base URL when `base_url` is empty.
    pub region: Region,
    /// Overrides the region's base URL (a proxy, or the fake server in tests).
    pub base_url: String,
    /// `llx-...` key (`LLAMA_CLOUD_API_KEY`).
    pub api_key: Secret,
    /// v2 tier: `fast`, `cost_effective`, `agentic` or `agentic_plus` (v1 maps it to a parse mode).
    pub tier: String,
    /// v2 `version`: `latest` or a date.
    pub version: String,
    /// Timeout of one HTTP request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// First wait before polling a job; each further wait grows by this much.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Longest wait between two polls.
    #[serde(with = "humantime_serde")]
    pub poll_interval_max: Duration,
    /// Longest a parse job may take at LlamaParse before the attempt is given up (and retried).
    #[serde(with = "humantime_serde")]
    pub job_timeout: Duration,
}

impl Default for LlamaParseSettings {
    fn default() -> Self {
        Self {
            api_version: LlamaParseApi::V2,
            region: Region::Na,
            base_url: String::new(),
            api_key: Secret(String::new()),
            tier: "cost_effective".into(),
            version: "latest".into(),
            request_timeout: Duration::from_secs(60),
            // More eager than LlamaCloud's own client (1 s growing by 1 s to 5 s): a job done just after a poll is
            // seen at most 1.5 s late instead of 5. `make bench` (pipeline-realistic, jobs of 2-8 s) measured the
            // old schedule at a 10.5-10.8 s upload-to-queryable p95, most of it polling overshoot; 2 s at most
            // gave 9.7-9.9 s. The cost: a poll every 1.5 s per running job instead of every 5 s.
            poll_interval: Duration::from_millis(500),
            poll_interval_max: Duration::from_millis(1500),
            job_timeout: Duration::from_secs(30 * 60),
        }
    }
}

impl LlamaParseSettings {
    /// The base URL in use: `base_url`, or the region's.
    pub fn url(&self) -> &str {
        if !self.base_url.is_empty() {
            return self.base_url.trim_end_matches('/');
        }
        match self.region {
            Region::Na => "https://api.cloud.llamaindex.ai",
            Region::Eu => "https://api.cloud.eu.llamaindex.ai",
        }
    }
}

/// How parsed documents are cut into chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChunkingSettings {
    /// Largest chunk, in tokens (cl100k_base).
    pub max_tokens: usize,
    /// Tokens repeated from the end of one chunk at the start of the next.
    pub overlap_tokens: usize,
    /// Most chunks one document may have; more fails the document.
    pub max_chunks: usize,
}

impl Default for ChunkingSettings {
    fn default() -> Self {
        Self {
            max_tokens: 512,
            overlap_tokens: 64,
            max_chunks: 20_000,
        }
    }
}

/// Limits and recovery of the document pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineSettings {
    /// A stage untouched this long (running stages touch their row every third of it) is checked by the
    /// reconciler, which pushes its job again when it is nowhere in Redis (Redis down between commit and push).
    /// Pushes are deduplicated by job id, so a short value never duplicates work. Must exceed
    /// `pipeline.reconcile_interval`.
    #[serde(with = "humantime_serde")]
    pub reconcile_after: Duration,
    /// How often the reconciler looks (a Redis that lost its data is noticed within one interval).
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// Most pages a document may have.
    pub max_pages: usize,
    /// Most characters of text a document may yield.
    pub max_chars: usize,
    /// Longest time one parse (and one chunking) of a document may take. In a worker the local parsers run in
    /// a helper process that is killed at this deadline.
    #[serde(with = "humantime_serde")]
    pub parse_timeout: Duration,
    /// Address space a worker's parse helper process may use, in MiB (0: no bound); a parse that needs more
    /// fails its document instead of starving the worker.
    pub parse_memory_mb: u64,
    /// How long a stage waits before asking a provider that is out of quota again (documents wait, never fail).
    #[serde(with = "humantime_serde")]
    pub quota_wait: Duration,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            reconcile_after: Duration::from_secs(30),
            reconcile_interval: Duration::from_secs(10),
            max_pages: 2_000,
            max_chars: 20_000_000,
            parse_timeout: Duration::from_secs(120),
            parse_memory_mb: 2048,
            quota_wait: Duration::from_secs(60),
        }
    }
}

impl RedisUrl {
    /// The URL itself, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.0.find("://"), self.0.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                write!(f, "{}://***{}", &self.0[..scheme], &self.0[at..])
            }
            _ => write!(f, "{}", self.0),
        }
    }
}

/// Settings of the job queues.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSettings {
    /// Prefix of every Redis key; give each deployment (or test) its own.
    pub key_prefix: String,
    /// Upper bound on how long the jobs of a killed worker wait before another replica runs them. Live workers
    /// refresh their claims every quarter of it; claims idle for half of it are taken over.
    #[serde(with = "humantime_serde")]
    pub reclaim_after: Duration,
    /// Attempts a job gets (runs that failed, panicked or never finished) before it goes to the dead letters.
    pub max_deliveries: u32,
    /// How long an idle worker's blocking read waits before it looks around (stale claims, shutdown).
    #[serde(with = "humantime_serde")]
    pub block_timeout: Duration,
    /// Backoff before the second attempt; it doubles per attempt, with jitter.
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    /// Longest backoff between two attempts.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Dead letters kept per queue; the oldest are dropped beyond it.
    pub dead_letter_max: u64,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            key_prefix: "upload-pipeline".into(),
            reclaim_after: Duration::from_secs(30),
            max_deliveries: 5,
            block_timeout: Duration::from_secs(5),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            dead_letter_max: 100_000,
        }
    }
}

impl QueueSettings {
    /// The delay before attempt `failed_attempt + 1`: `retry_base * 2^(failed_attempt - 1)`, capped at
    /// `retry_max`, of which a random half is kept ("equal jitter"), so retries of a burst spread out.
    pub fn backoff(&self, failed_attempt: u32) -> Duration {
        let exp = failed_attempt.saturating_sub(1).min(30);
        let full = self
            .retry_base
            .saturating_mul(1u32 << exp)
            .min(self.retry_max);
        let half = full / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// Settings of worker processes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    /// Where `/healthz` and `/metrics` are served.
    pub metrics_addr: SocketAddr,
    /// How long in-flight jobs may take to finish after SIGTERM before the worker gives them back and exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Jobs one process runs at once, per stage.
    pub concurrency: StageConcurrency,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
            shutdown_grace: Duration::from_secs(30),
            concurrency: StageConcurrency::default(),
        }
    }
}

/// Per-stage concurrency of one worker process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StageConcurrency {
    /// Parse jobs at once (CPU- or provider-bound).
    pub parse: usize,
    /// Chunk jobs at once (CPU-bound).
    pub chunk: usize,
    /// Embed jobs at once (provider- or model-bound).
    pub embed: usize,
    /// Synthetic jobs at once (load tests).
    pub synthetic: usize,
}

impl Default for StageConcurrency {
    fn default() -> Self {
        Self {
            parse: 4,
            chunk: 4,
            embed: 16,
            synthetic: 16,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `text` for people, `json` for log pipelines (`LOG_FORMAT`).
    pub format: LogFormat,
    /// A tracing filter such as `info,upload_pipeline=debug` (`RUST_LOG`).
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Settings {
    /// Loads defaults, then `file` (TOML) if given, then the environment, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let mut fig = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(SettingsError::Invalid {
                    field: "config file",
                    reason: format!("{} does not exist", file.display()),
                });
            }
            fig = fig.merge(Toml::file(file));
        }
        let fig = fig
            .merge(
                Env::prefixed("UPLOAD_PIPELINE__")
                    .split("__")
                    .lowercase(true),
            )
            .merge(Env::raw().only(&["REDIS_URL"]).map(|_| "redis_url".into()))
            .merge(
                Env::raw()
                    .only(&["DATABASE_URL"])
                    .map(|_| "database_url".into()),
            )
            .merge(
                Env::raw()
                    .only(&["DATABASE_ADMIN_URL"])
                    .map(|_| "database_admin_url".into()),
            )
            .merge(
                Env::raw()
                    .only(&["DATABASE_APP_PASSWORD"])
                    .map(|_| "database_app_password".into()),
            )
            .merge(
                Env::raw()
                    .only(&["JWT_SECRET"])
                    .map(|_| "api.jwt_secret".into()),
            )
            .merge(
                Env::raw()
                    .only(&["OPENAI_API_KEY", "AZURE_OPENAI_API_KEY"])
                    .map(|_| "embedding.openai.api_key".into()),
            )
            .merge(
                Env::raw()
                    .only(&["LLAMA_CLOUD_API_KEY"])
                    .map(|_| "parsing.llamaparse.api_key".into()),
            )
            .merge(
                Env::raw()
                    .only(&["LOG_FORMAT"])
                    .map(|_| "log.format".into()),
            )
            .merge(Env::raw().only(&["RUST_LOG"]).map(|_| "log.filter".into()));
        let settings: Settings = fig.extract().map_err(Box::new)?;
        settings.validate()?;
        Ok(settings)
    }

    /// The settings as JSON with every secret and every password in a URL replaced by `***`: what an operator
    /// may print to see what a process will run with (`producer settings`).
    pub fn redacted(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("settings serialize to JSON");
        let urls = [
            &["redis_url"][..],
            &["database_url"],
            &["database_admin_url"],
        ];
        for path in urls {
            if let Some(slot) = pointer(&mut value, path)
                && let Some(url) = slot.as_str().map(|u| RedisUrl(u.to_owned()))
            {
                *slot = format!("{url:?}").into();
            }
        }
        let secrets = [
            &["database_app_password"][..],
            &["api", "jwt_secret"],
            &["embedding", "openai", "api_key"],
            &["parsing", "llamaparse", "api_key"],
        ];
        for path in secrets {
            if let Some(slot) = pointer(&mut value, path)
                && slot.as_str().is_some_and(|s| !s.is_empty())
            {
                *slot = "***".into();
            }
        }
        value
    }

    /// Checks every value against its allowed range.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |field, reason: &str| {
            Err(SettingsError::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        let url = self.redis_url.expose();
        if !(url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("redis+unix://")
            || url.starts_with("unix://"))
        {
            return invalid(
                "redis_url",
                "must start with redis://, rediss://, redis+unix:// or unix://",
            );
        }
        let db = self.database_url.expose();
        if !(db.starts_with("postgres://") || db.starts_with("postgresql://")) {
            return invalid(
                "database_url",
                "must start with postgres:// or postgresql://",
            );
        }
        if let Some(admin) = &self.database_admin_url
            && !(admin.expose().starts_with("postgres://")
                || admin.expose().starts_with("postgresql://"))
        {
            return invalid(
                "database_admin_url",
                "must start with postgres:// or postgresql://",
            );
        }
        if self.database_app_role.is_empty()
            || !self
                .database_app_role
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return invalid(
                "database_app_role",
                "must be a role name of lowercase letters, digits and '_'",
            );
        }
        if self.api.admin_claim.is_empty() {
            return invalid("api.admin_claim", "must name a claim");
        }
        if self.api.uploads_per_minute > 0 && self.api.upload_burst == 0 {
            return invalid(
                "api.upload_burst",
                "must be at least 1 when uploads_per_minute is set",
            );
        }
        if self.api.jwt_secret.expose().len() < 16 {
            return invalid("api.jwt_secret", "must be at least 16 characters");
        }
        if self.api.jwt_secret.expose() == DEV_JWT_SECRET && !self.api.listen.ip().is_loopback() {
            return invalid(
                "api.jwt_secret",
                "set a secret of your own (JWT_SECRET) before listening beyond loopback",
            );
        }
        if self.api.max_upload_bytes == 0 || !(1..=100).contains(&self.api.max_search_k) {
            return invalid(
                "api",
                "max_upload_bytes must be above 0 and max_search_k between 1 and 100",
            );
        }
        let e = &self.embedding;
        if e.model.is_empty() || !(1..=2000).contains(&e.dimensions) {
            return invalid(
                "embedding",
                "model must be named and dimensions between 1 and 2000 (the HNSW limit)",
            );
        }
        if !(1..=2048).contains(&e.batch_size) {
            return invalid("embedding.batch_size", "must be between 1 and 2048");
        }
        let o = &e.openai;
        if !(o.base_url.starts_with("http://") || o.base_url.starts_with("https://")) {
            return invalid("embedding.openai.base_url", "must be an http(s) URL");
        }
        if o.api_style == ApiStyle::Azure && o.azure_deployment.is_empty() {
            return invalid(
                "embedding.openai.azure_deployment",
                "name the deployment when api_style is azure",
            );
        }
        if !(1..=2048).contains(&o.max_inputs)
            || o.max_input_tokens == 0
            || o.max_request_tokens < o.max_input_tokens
        {
            return invalid(
                "embedding.openai",
                "max_inputs must be 1 to 2048, max_input_tokens above 0 and at most max_request_tokens",
            );
        }
        if o.timeout.is_zero() {
            return invalid("embedding.openai.timeout", "must be above zero");
        }
        if e.local.max_tokens < 8 || !(1..=1024).contains(&e.local.batch_size) {
            return invalid(
                "embedding.local",
                "max_tokens must be at least 8 and batch_size between 1 and 1024",
            );
        }
        let l = &self.parsing.llamaparse;
        if !(l.base_url.is_empty()
            || l.base_url.starts_with("http://")
            || l.base_url.starts_with("https://"))
        {
            return invalid("parsing.llamaparse.base_url", "must be an http(s) URL");
        }
        if !["fast", "cost_effective", "agentic", "agentic_plus"].contains(&l.tier.as_str()) {
            return invalid(
                "parsing.llamaparse.tier",
                "must be fast, cost_effective, agentic or agentic_plus",
            );
        }
        if l.poll_interval.is_zero()
            || l.poll_interval > l.poll_interval_max
            || l.job_timeout < l.poll_interval_max
            || l.request_timeout.is_zero()
        {
            return invalid(
                "parsing.llamaparse",
                "poll_interval must be above zero and at most poll_interval_max, which is at most job_timeout; request_timeout above zero",
            );
        }
        let qs = &self.quota;
        if qs.max_wait > Duration::from_secs(600)
            || qs.llamaparse.window.is_zero()
            || !qs.openai.usd_per_million_tokens.is_finite()
            || qs.openai.usd_per_million_tokens < 0.0
        {
            return invalid(
                "quota",
                "max_wait must be at most 10m, llamaparse.window above zero, usd_per_million_tokens not negative",
            );
        }
        if self.pipeline.quota_wait.is_zero()
            || self.pipeline.quota_wait > Duration::from_secs(3600)
        {
            return invalid("pipeline.quota_wait", "must be between 1ms and 1h");
        }
        let pl = &self.pipeline;
        if pl.reconcile_interval.is_zero() {
            return invalid("pipeline.reconcile_interval", "must be above zero");
        }
        if pl.reconcile_after <= pl.reconcile_interval {
            return invalid(
                "pipeline.reconcile_after",
                "must exceed pipeline.reconcile_interval: the reconciler looks every reconcile_interval for \
                 stages untouched for reconcile_after (running stages touch theirs every third of it)",
            );
        }
        let c = &self.chunking;
        if c.max_tokens < 16 || c.overlap_tokens >= c.max_tokens || c.max_chunks == 0 {
            return invalid(
                "chunking",
                "max_tokens must be at least 16 and above overlap_tokens; max_chunks above 0",
            );
        }
        // A chunk the token budget can never grant within quota.max_wait would keep its document waiting for ever.
        if let Some((field, reason)) = crate::quota::oversized_request(self) {
            return Err(SettingsError::Invalid { field, reason });
        }
        let q = &self.queue;
        if q.key_prefix.is_empty()
            || q.key_prefix.len() > 100
            || q.key_prefix.contains(['{', '}', ' '])
        {
            return invalid(
                "queue.key_prefix",
                "must be 1 to 100 characters without spaces or braces",
            );
        }
        if q.reclaim_after < Duration::from_millis(200)
            || q.reclaim_after > Duration::from_secs(24 * 3600)
        {
            return invalid("queue.reclaim_after", "must be between 200ms and 24h");
        }
        if !(1..=1000).contains(&q.max_deliveries) {
            return invalid("queue.max_deliveries", "must be between 1 and 1000");
        }
        if q.block_timeout < Duration::from_millis(10) || q.block_timeout > Duration::from_secs(60)
        {
            return invalid("queue.block_timeout", "must be between 10ms and 60s");
        }
        if q.retry_base.is_zero() || q.retry_base > q.retry_max {
            return invalid(
                "queue.retry_base",
                "must be above zero and at most queue.retry_max",
            );
        }
        if q.dead_letter_max == 0 {
            return invalid("queue.dead_letter_max", "must be at least 1");
        }
        let w = &self.worker;
        if w.shutdown_grace > Duration::from_secs(3600) {
            return invalid("worker.shutdown_grace", "must be at most 1h");
        }
        for (field, n) in [
            ("worker.concurrency.parse", w.concurrency.parse),
            ("worker.concurrency.chunk", w.concurrency.chunk),
            ("worker.concurrency.embed", w.concurrency.embed),
            ("worker.concurrency.synthetic", w.concurrency.synthetic),
        ] {
            if !(1..=10_000).contains(&n) {
                return invalid(field, "must be between 1 and 10000");
            }
        }
        Ok(())
    }
}

/// The value at `path` inside `value`, if there is one.
fn pointer<'a>(
    value: &'a mut serde_json::Value,
    path: &[&str],
) -> Option<&'a mut serde_json::Value> {
    path.iter().try_fold(value, |v, key| v.get_mut(*key))
}

#[cfg(test)]
// figment's Jail returns its own large error type; that is its API, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Settings::default().validate().unwrap();
    }

    #[test]
    fn the_redacted_settings_hide_every_secret_and_url_password_and_keep_the_rest() {
        let mut s = Settings {
            redis_url: RedisUrl("rediss://default:redis-pw@cache.example:6380/0".into()),
            database_url: RedisUrl("postgres://app:db-pw@db.example:5432/up".into()),
            database_admin_url: Some(RedisUrl("postgres://owner:owner-pw@db.example/up".into())),
            database_app_password: Some(Secret("app-pw".into())),
            ..Settings::default()
        };
        s.api.jwt_secret = Secret("jwt-pw".into());
        s.embedding.openai.api_key = Secret("sk-pw".into());
        s.parsing.llamaparse.api_key = Secret("llx-pw".into());
        let shown = s.redacted();
        let text = shown.to_string();
        for secret in [
            "redis-pw", "db-pw", "owner-pw", "app-pw", "jwt-pw", "sk-pw", "llx-pw",
        ] {
            assert!(!text.contains(secret), "{secret} shown in {text}");
        }
        assert_eq!(shown["redis_url"], "rediss://***@cache.example:6380/0");
        assert_eq!(shown["database_url"], "postgres://***@db.example:5432/up");
        assert_eq!(shown["api"]["jwt_secret"], "***");
        assert_eq!(shown["queue"]["max_deliveries"], 5);
        // Nothing set, nothing hidden: an empty key shows that it is missing.
        assert_eq!(
            Settings::default().redacted()["embedding"]["openai"]["api_key"],
            ""
        );
    }

    #[test]
    fn a_file_then_the_environment_override_the_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "up.toml",
                "[queue]\nreclaim_after = \"10s\"\nmax_deliveries = 3\n[worker.concurrency]\nembed = 2\n",
            )?;
            jail.set_env("UPLOAD_PIPELINE__QUEUE__MAX_DELIVERIES", "7");
            jail.set_env("REDIS_URL", "redis://:hunter2@example:6380/2");
            jail.set_env("LOG_FORMAT", "json");
            let s = Settings::load(Some(Path::new("up.toml"))).expect("valid");
            assert_eq!(s.queue.reclaim_after, Duration::from_secs(10));
            assert_eq!(s.queue.max_deliveries, 7);
            assert_eq!(s.worker.concurrency.embed, 2);
            assert_eq!(s.worker.concurrency.parse, 4);
            assert_eq!(s.log.format, LogFormat::Json);
            assert_eq!(s.redis_url.expose(), "redis://:hunter2@example:6380/2");
            assert!(
                !format!("{s:?}").contains("hunter2"),
                "the password must not be printed"
            );
            Ok(())
        });
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("UPLOAD_PIPELINE__QUEUE__MAX_DELIVERIES", "0");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.contains("queue.max_deliveries"), "{err}");
            jail.set_env("UPLOAD_PIPELINE__QUEUE__MAX_DELIVERIES", "5");
            jail.set_env("UPLOAD_PIPELINE__QUEUE__RECLAIM_AFTER", "soon");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.to_lowercase().contains("queue.reclaim_after"), "{err}");
            jail.set_env("UPLOAD_PIPELINE__QUEUE__RECLAIM_AFTER", "30s");
            jail.set_env("UPLOAD_PIPELINE__QUEUE__NO_SUCH_FIELD", "1");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.to_lowercase().contains("no_such_field"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_example_config_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config.example.toml");
        figment::Jail::expect_with(|_| {
            assert_eq!(
                Settings::load(Some(&path)).expect("the example parses"),
                Settings::default()
            );
            Ok(())
        });
    }

    #[test]
    fn provider_keys_come_from_their_variables_and_are_never_printed() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("OPENAI_API_KEY", "sk-very-secret-openai");
            jail.set_env("LLAMA_CLOUD_API_KEY", "llx-very-secret-llama");
            jail.set_env("UPLOAD_PIPELINE__PARSING__PARSER", "llamaparse");
            let s = Settings::load(None).expect("valid");
            assert_eq!(s.embedding.openai.api_key.expose(), "sk-very-secret-openai");
            assert_eq!(
                s.parsing.llamaparse.api_key.expose(),
                "llx-very-secret-llama"
            );
            let printed = format!("{s:?} {s:#?}");
            assert!(!printed.contains("very-secret"), "{printed}");
            jail.set_env("LLAMA_CLOUD_API_KEY", "");
            // Only a process that parses needs the key: the producer and the other stages load these settings,
            // and the parser refuses to start without it.
            let s = Settings::load(None).expect("valid without the key");
            let Err(err) = crate::providers::parser(&s, None) else {
                panic!("a LlamaParse parser without a key");
            };
            assert!(err.to_string().contains("LLAMA_CLOUD_API_KEY"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        let err = Settings::load(Some(Path::new("/nonexistent/up.toml"))).unwrap_err();
        assert!(err.to_string().contains("does not exist"));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let q = QueueSettings {
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(10),
            ..Default::default()
        };
        for _ in 0..100 {
            let first = q.backoff(1);
            assert!(
                first >= Duration::from_millis(500) && first <= Duration::from_secs(1),
                "{first:?}"
            );
            let third = q.backoff(3);
            assert!(
                third >= Duration::from_secs(2) && third <= Duration::from_secs(4),
                "{third:?}"
            );
            assert!(q.backoff(30) <= Duration::from_secs(10));
        }
    }
}
