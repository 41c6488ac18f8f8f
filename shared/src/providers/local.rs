//! In-process providers: the built-in parsers, and a BERT sentence encoder (all-MiniLM-L6-v2 by default) run on
//! the CPU with candle: mean pooling over the attention mask, then L2 normalisation, as sentence-transformers does.

use std::{path::Path, sync::Arc, time::Duration};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

use super::{EmbedFuture, Embedder, ParseFuture, ParseInput, Parser, ProviderError};
use crate::{
    parsing::{self, DocKind, Limits},
    settings::{EmbeddingSettings, PipelineSettings},
};

const PARSER: &str = "the local parser";
const EMBEDDER: &str = "the local model";

/// The built-in parsers, run on the blocking pool within `pipeline.parse_timeout`.
#[derive(Debug, Clone)]
pub struct LocalParser {
    limits: Limits,
    timeout: Duration,
}

impl LocalParser {
    /// A parser with the pipeline's limits.
    pub fn new(settings: &PipelineSettings) -> Self {
        Self {
            limits: Limits {
                max_pages: settings.max_pages,
                max_chars: settings.max_chars,
            },
            timeout: settings.parse_timeout,
        }
    }

    async fn run(&self, input: &ParseInput) -> Result<Vec<parsing::Section>, ProviderError> {
        let (kind, bytes, limits) = (input.kind, input.bytes.clone(), self.limits);
        let started = std::time::Instant::now();
        let parsed = tokio::time::timeout(
            self.timeout,
            tokio::task::spawn_blocking(move || parsing::parse(kind, &bytes, limits)),
        )
        .await;
        let result = match parsed {
            Err(_) => Err(ProviderError::permanent(
                PARSER,
                format!(
                    "parsing took longer than {} s",
                    self.timeout.as_secs_f64().round()
                ),
            )),
            // The parser panicked on this input: the same bytes would panic again.
            Ok(Err(join)) => Err(ProviderError::permanent(
                PARSER,
                format!("the parser crashed on this file: {join}"),
            )),
            Ok(Ok(Err(e))) => Err(ProviderError::permanent(
                PARSER,
                format!("{}: {e}", input.filename),
            )),
            Ok(Ok(Ok(sections))) => Ok(sections),
        };
        super::observe("local", "parse", started, &result);
        result
    }
}

impl Parser for LocalParser {
    fn key(&self, kind: DocKind) -> String {
        let kind = serde_json::to_value(kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        format!("local:{kind}")
    }

    fn cacheable(&self, _kind: DocKind) -> bool {
        false
    }

    fn parse<'a>(&'a self, input: &'a ParseInput) -> ParseFuture<'a> {
        Box::pin(self.run(input))
    }
}

/// A sentence encoder in the Hugging Face layout, loaded once and shared by every embed job of the process;
/// cheap to clone.
#[derive(Clone)]
pub struct LocalEmbedder {
    model: Arc<BertModel>,
    tokenizer: Arc<Tokenizer>,
    name: String,
    dimensions: usize,
    batch_size: usize,
}

impl std::fmt::Debug for LocalEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEmbedder")
            .field("model", &self.name)
            .field("dimensions", &self.dimensions)
            .finish_non_exhaustive()
    }
}

fn load_error(dir: &Path, what: impl std::fmt::Display) -> ProviderError {
    ProviderError::permanent(
        EMBEDDER,
        format!(
            "cannot load the model in {}: {what} (run `make model`, or set embedding.local.model_dir)",
            dir.display()
        ),
    )
}

impl LocalEmbedder {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from `embedding.local.model_dir`, and checks
    /// that the model's width is `embedding.dimensions`.
    pub fn load(settings: &EmbeddingSettings) -> Result<Self, ProviderError> {
        let dir = settings.local.model_dir.as_path();
        let config: Config = serde_json::from_slice(
            &std::fs::read(dir.join("config.json")).map_err(|e| load_error(dir, e))?,
        )
        .map_err(|e| load_error(dir, format!("config.json: {e}")))?;
        let mut tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| load_error(dir, e))?;
        tokenizer.with_padding(Some(PaddingParams::default()));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: settings.local.max_tokens,
                ..Default::default()
            }))
            .map_err(|e| load_error(dir, e))?;
        // Read into memory rather than mapped: mapping a file is `unsafe`, which this workspace forbids.
        let weights =
            std::fs::read(dir.join("model.safetensors")).map_err(|e| load_error(dir, e))?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)
            .map_err(|e| load_error(dir, e))?;
        let model = BertModel::load(vb, &config).map_err(|e| load_error(dir, e))?;
        let width = config.hidden_size;
        if width != settings.dimensions as usize {
            return Err(ProviderError::permanent(
                EMBEDDER,
                format!(
                    "the model in {} makes {width}-dimensional vectors but embedding.dimensions is {}",
                    dir.display(),
                    settings.dimensions
                ),
            ));
        }
        Ok(Self {
            model: Arc::new(model),
            tokenizer: Arc::new(tokenizer),
            name: settings.model.clone(),
            dimensions: width,
            batch_size: settings.local.batch_size,
        })
    }

    /// Embeds `texts` on the calling thread (CPU-bound; call from a blocking thread).
    pub fn embed_blocking(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, ProviderError> {
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(self.batch_size) {
            out.extend(self.forward(batch).map_err(|e| {
                ProviderError::permanent(EMBEDDER, format!("the model failed: {e}"))
            })?);
        }
        Ok(out)
    }

    fn forward(&self, texts: &[String]) -> candle_core::Result<Vec<Vec<f32>>> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let rows = encodings.len();
        let cols = encodings.first().map_or(0, |e| e.get_ids().len());
        let flat = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
            encodings
                .iter()
                .flat_map(|e| f(e).iter().copied())
                .collect()
        };
        let device = Device::Cpu;
        let ids = Tensor::from_vec(flat(&|e| e.get_ids()), (rows, cols), &device)?;
        let types = Tensor::from_vec(flat(&|e| e.get_type_ids()), (rows, cols), &device)?;
        let mask = Tensor::from_vec(flat(&|e| e.get_attention_mask()), (rows, cols), &device)?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?;
        // Mean over the real tokens: padding is masked out of both the sum and the count.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9f32, f32::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12f32, f32::MAX)?;
        mean.broadcast_div(&norms)?.to_vec2::<f32>()
    }
}

impl Embedder for LocalEmbedder {
    fn model(&self) -> &str {
        &self.name
    }

    fn dimensions(&self) -> usize {
        self.dimensions
    }

    fn embed<'a>(&'a self, texts: &'a [String]) -> EmbedFuture<'a> {
        let me = self.clone();
        let texts = texts.to_vec();
        Box::pin(async move {
            let started = std::time::Instant::now();
            let n = texts.len() as u64;
            let result = tokio::task::spawn_blocking(move || me.embed_blocking(&texts))
                .await
                .map_err(|e| {
                    ProviderError::permanent(EMBEDDER, format!("the model crashed: {e}"))
                })?;
            super::observe("local", "embed", started, &result);
            metrics::counter!(crate::metrics::PROVIDER_EMBEDDED_INPUTS, "provider" => "local")
                .increment(n);
            result
        })
    }
}
