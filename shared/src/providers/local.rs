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

/// Makes every [`LocalParser`] of this process parse in a helper process: `exe --parse-one <kind> …`, which
/// must call [`parse_helper_main`] (see [`crate::helper`], which chunking shares). A helper that passes
/// `pipeline.parse_timeout` is killed, and one that passes `pipeline.parse_memory_mb` dies of it, failing the
/// document either way while the worker goes on.
pub fn use_parse_helper(exe: std::path::PathBuf) {
    crate::helper::register(exe);
}

/// What a parse helper writes to stdout.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum HelperAnswer {
    Sections(Vec<parsing::Section>),
    Error(String),
}

/// The parse helper process: caps its own address space at `memory_mb` MiB (0: none), reads the document from
/// stdin, parses it, and writes the sections (or why not) to stdout as JSON. Returns the exit code.
pub fn parse_helper_main(kind: &str, max_pages: usize, max_chars: usize, memory_mb: u64) -> i32 {
    let Ok(kind) = serde_json::from_value::<DocKind>(serde_json::Value::String(kind.to_owned()))
    else {
        eprintln!("unknown document kind {kind:?}");
        return 2;
    };
    if let Err(e) = crate::helper::bound_memory(memory_mb) {
        eprintln!("{e}");
        return 2;
    }
    let input = match crate::helper::read_input() {
        Ok(input) => input,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let answer = match parsing::parse(
        kind,
        &input,
        Limits {
            max_pages,
            max_chars,
        },
    ) {
        Ok(sections) => HelperAnswer::Sections(sections),
        Err(e) => HelperAnswer::Error(e.to_string()),
    };
    crate::helper::write_answer(&answer)
}

/// The built-in parsers, within `pipeline.parse_timeout` (and `parse_memory_mb` in a helper process).
#[derive(Debug, Clone)]
pub struct LocalParser {
    limits: Limits,
    timeout: Duration,
    memory_mb: u64,
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
            memory_mb: settings.parse_memory_mb,
        }
    }

    fn too_slow(&self) -> ProviderError {
        ProviderError::permanent(
            PARSER,
            format!(
                "parsing took longer than {} s",
                self.timeout.as_secs_f64().round()
            ),
        )
    }

    /// Parses in a helper process; the process is killed at the deadline (dropping the child kills it).
    async fn run_isolated(
        &self,
        exe: &Path,
        input: &ParseInput,
    ) -> Result<Vec<parsing::Section>, ProviderError> {
        use crate::helper::HelperError;
        let kind = serde_json::to_value(input.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let args = [
            "--parse-one".to_owned(),
            kind,
            "--parse-max-pages".to_owned(),
            self.limits.max_pages.to_string(),
            "--parse-max-chars".to_owned(),
            self.limits.max_chars.to_string(),
            "--parse-memory-mb".to_owned(),
            self.memory_mb.to_string(),
        ];
        let output = match crate::helper::run(exe, &args, input.bytes.clone(), self.timeout).await {
            Ok(output) => output,
            Err(HelperError::TimedOut) => return Err(self.too_slow()),
            Err(HelperError::Start(e)) => {
                return Err(ProviderError::transient(
                    PARSER,
                    format!("cannot start the parse helper: {e}"),
                ));
            }
            Err(HelperError::Wait(e)) => {
                return Err(ProviderError::transient(
                    PARSER,
                    format!("the parse helper failed: {e}"),
                ));
            }
        };
        let past_memory = || {
            ProviderError::permanent(
                PARSER,
                format!(
                    "{}: parsing needs more than {} MiB of memory",
                    input.filename, self.memory_mb
                ),
            )
        };
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            if stderr.contains("memory allocation") || stderr.contains("out of memory") {
                return Err(past_memory());
            }
            use std::os::unix::process::ExitStatusExt;
            let how = output
                .status
                .signal()
                .map_or_else(|| output.status.to_string(), |s| format!("signal {s}"));
            return Err(ProviderError::permanent(
                PARSER,
                format!("the parser crashed on this file ({how})"),
            ));
        }
        match serde_json::from_slice::<HelperAnswer>(&output.stdout) {
            Ok(HelperAnswer::Sections(sections)) => Ok(sections),
            // A reader that asked for more than the bound allows fails its allocation gracefully (an I/O
            // "out of memory") instead of aborting: the same bound, reached at another place.
            Ok(HelperAnswer::Error(e)) if self.memory_mb > 0 && e.contains("out of memory") => {
                Err(past_memory())
            }
            Ok(HelperAnswer::Error(e)) => Err(ProviderError::permanent(
                PARSER,
                format!("{}: {e}", input.filename),
            )),
            Err(e) => Err(ProviderError::transient(
                PARSER,
                format!("unreadable answer of the parse helper: {e}"),
            )),
        }
    }

    async fn run(&self, input: &ParseInput) -> Result<Vec<parsing::Section>, ProviderError> {
        if let Some(exe) = crate::helper::registered() {
            let started = std::time::Instant::now();
            let result = self.run_isolated(exe, input).await;
            super::observe("local", "parse", started, &result);
            return result;
        }
        let (kind, bytes, limits) = (input.kind, input.bytes.clone(), self.limits);
        let started = std::time::Instant::now();
        let parsed = tokio::time::timeout(
            self.timeout,
            tokio::task::spawn_blocking(move || parsing::parse(kind, &bytes, limits)),
        )
        .await;
        let result = match parsed {
            Err(_) => Err(self.too_slow()),
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
            "cannot load the model in {}: {what} (run `make model`, or set embedding.local.model_dir; \
             or choose embedding.embedder = \"openai\", or \"hashing\" for vectors that are not semantic)",
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
