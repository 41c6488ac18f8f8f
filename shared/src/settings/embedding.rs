//! `[embedding]`: which embedder turns chunks and queries into vectors, and its OpenAI-compatible or local client.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Secret, SettingsError, ensure, is_http_url};

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
#[serde(deny_unknown_fields)]
pub struct EmbeddingSettings {
    /// `hashing`, `openai` or `local`.
    #[serde(alias = "provider")]
    pub embedder: EmbedderKind,
    /// The model name sent to the provider and stored with every vector; a new name gets its own index.
    pub model: String,
    /// Vector dimensions (sent as `dimensions` to OpenAI text-embedding-3 models; checked against a local model):
    /// 1 to 4,000. Up to 2,000 the HNSW index holds the vectors as they are; above, at half precision (`halfvec`).
    pub dimensions: u32,
    /// Chunks per embed job (each job is one or more provider requests within the provider's limits).
    pub batch_size: usize,
    /// The OpenAI-compatible client.
    pub openai: OpenAiSettings,
    /// The local model.
    pub local: LocalModelSettings,
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
#[serde(deny_unknown_fields)]
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

/// The in-process model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalModelSettings {
    /// A folder in the Hugging Face layout: `config.json`, `tokenizer.json`, `model.safetensors` (`make model`).
    pub model_dir: std::path::PathBuf,
    /// Longest input in tokens; longer inputs are truncated (all-MiniLM-L6-v2 was trained on 256).
    pub max_tokens: usize,
    /// Inputs per forward pass.
    pub batch_size: usize,
}

impl EmbeddingSettings {
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        ensure(
            !self.model.is_empty(),
            "embedding.model",
            "must name a model",
        )?;
        ensure(
            (1..=4000).contains(&self.dimensions),
            "embedding.dimensions",
            "must be between 1 and 4000 (the HNSW limit of halfvec; above 2000 the index holds half precision)",
        )?;
        ensure(
            (1..=2048).contains(&self.batch_size),
            "embedding.batch_size",
            "must be between 1 and 2048",
        )?;
        self.openai.validate()?;
        self.local.validate()
    }
}

impl OpenAiSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        ensure(
            is_http_url(&self.base_url),
            "embedding.openai.base_url",
            "must be an http(s) URL",
        )?;
        ensure(
            self.api_style != ApiStyle::Azure || !self.azure_deployment.is_empty(),
            "embedding.openai.azure_deployment",
            "name the deployment when embedding.openai.api_style is azure",
        )?;
        ensure(
            (1..=2048).contains(&self.max_inputs),
            "embedding.openai.max_inputs",
            "must be between 1 and 2048",
        )?;
        ensure(
            self.max_input_tokens > 0,
            "embedding.openai.max_input_tokens",
            "must be above 0",
        )?;
        ensure(
            self.max_request_tokens >= self.max_input_tokens,
            "embedding.openai.max_request_tokens",
            "must be at least embedding.openai.max_input_tokens",
        )?;
        ensure(
            !self.timeout.is_zero(),
            "embedding.openai.timeout",
            "must be above zero",
        )
    }
}

impl LocalModelSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        ensure(
            self.max_tokens >= 8,
            "embedding.local.max_tokens",
            "must be at least 8",
        )?;
        ensure(
            (1..=1024).contains(&self.batch_size),
            "embedding.local.batch_size",
            "must be between 1 and 1024",
        )
    }
}
