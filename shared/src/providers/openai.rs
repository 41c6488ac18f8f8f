//! An OpenAI-compatible embeddings client: OpenAI, Azure OpenAI (deployment URLs with `api-key`, or the v1
//! endpoint), and servers that speak the same protocol (vLLM, text-embeddings-inference, Ollama).
//!
//! Texts are packed into requests within the provider's limits (inputs and tokens per request, tokens per
//! input; over-long inputs are truncated with a warning). Smaller limits are learnt from the answers: 413 and
//! 422 shrink the batch, a context-length 400 shrinks the per-input limit, `max_tokens_per_request` the request
//! budget; what is learnt holds for the life of the process. With a fleet budget no request costs more tokens
//! than [`Budget::largest_request`]: a large batch at a low token limit goes as several requests, one after the
//! other in the same [`Turn`](crate::quota::Turn), each granted within `quota.max_wait`. A refused key (401/403)
//! pauses the provider fleet-wide. Answers are read tolerantly (`answer.rs`).
//! The client never sleeps or retries on its own: a retryable error goes back to the queue with the time the
//! provider named.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use reqwest::header::HeaderMap;
use tiktoken_rs::CoreBPE;

use self::answer::{Failure, classify};
use super::{EmbedFuture, Embedder, KeepingFuture, PartialEmbedding, ProviderError, http};
use crate::{
    quota::{Budget, Permit, Quota, Turn, openai_limits},
    settings::{ApiStyle, EmbeddingSettings, EncodingFormat, Settings},
};

mod answer;

const PROVIDER: &str = "the embeddings API";
/// Most times one call shrinks its limits before giving up.
const MAX_ADAPTATIONS: usize = 12;

/// See the module documentation.
pub struct OpenAiEmbedder {
    http: reqwest::Client,
    url: String,
    style: ApiStyle,
    api_key: String,
    model: String,
    dimensions: usize,
    encoding: EncodingFormat,
    max_inputs: AtomicUsize,
    max_request_tokens: AtomicUsize,
    max_input_tokens: AtomicUsize,
    bpe: Arc<CoreBPE>,
    budget: Option<Budget>,
}

impl std::fmt::Debug for OpenAiEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiEmbedder")
            .field("url", &self.url)
            .field("model", &self.model)
            .field("dimensions", &self.dimensions)
            .finish_non_exhaustive()
    }
}

impl OpenAiEmbedder {
    /// A client for the configured endpoint.
    pub fn new(settings: &EmbeddingSettings) -> Result<Self, ProviderError> {
        let o = &settings.openai;
        let base = o.base_url.trim_end_matches('/');
        let url = match o.api_style {
            ApiStyle::Openai => format!("{base}/embeddings"),
            ApiStyle::Azure => format!(
                "{base}/openai/deployments/{}/embeddings?api-version={}",
                o.azure_deployment, o.azure_api_version
            ),
        };
        Ok(Self {
            http: http::client(PROVIDER, o.timeout)?,
            url,
            style: o.api_style,
            api_key: o.api_key.expose().to_owned(),
            model: settings.model.clone(),
            dimensions: settings.dimensions as usize,
            encoding: o.encoding_format,
            max_inputs: AtomicUsize::new(o.max_inputs),
            max_request_tokens: AtomicUsize::new(o.max_request_tokens),
            max_input_tokens: AtomicUsize::new(o.max_input_tokens),
            bpe: crate::chunking::tokenizer(),
            budget: None,
        })
    }

    /// A client whose calls take their share of the fleet's budget for this model and key first
    /// (`quota.openai`).
    pub fn with_quota(settings: &Settings, quota: &Quota) -> Result<Self, ProviderError> {
        let e = &settings.embedding;
        let budget = quota
            .budget(
                "openai",
                &e.model,
                e.openai.api_key.expose(),
                openai_limits(&settings.quota.openai),
                settings.worker.concurrency.embed,
            )
            .with_request_timeout(e.openai.timeout);
        Self::with_budget(e, budget)
    }

    /// A client whose calls take their share of `budget` first, its requests sized to what the budget can grant.
    pub fn with_budget(
        settings: &EmbeddingSettings,
        budget: Budget,
    ) -> Result<Self, ProviderError> {
        let mut me = Self::new(settings)?;
        me.budget = Some(budget);
        Ok(me)
    }

    /// The limits in force: inputs per request, tokens per request, tokens per input.
    pub fn limits(&self) -> (usize, usize, usize) {
        (
            self.max_inputs.load(Ordering::Relaxed),
            self.max_request_tokens.load(Ordering::Relaxed),
            self.max_input_tokens.load(Ordering::Relaxed),
        )
    }

    /// `text` cut to `limit` tokens, and its token count.
    fn fit(&self, text: &str, limit: usize) -> (String, usize, bool) {
        let tokens = self.bpe.encode_ordinary(text);
        if tokens.len() <= limit {
            // The API refuses empty strings; a blank chunk still gets a vector.
            let text = if text.is_empty() { " " } else { text };
            return (text.to_owned(), tokens.len().max(1), false);
        }
        let cut = self
            .bpe
            .decode(&tokens[..limit])
            .unwrap_or_else(|_| text.chars().take(limit * 3).collect());
        (cut, limit, true)
    }

    /// Every text's vector, in as many requests as the limits and the budget call for; failing part-way, the
    /// vectors of the texts done so far come back with the error.
    async fn embed_all(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, PartialEmbedding> {
        let mut out = Vec::with_capacity(texts.len());
        let mut adaptations = 0;
        // One place in the fleet's line for all the requests of this call.
        let mut turn = self.budget.as_ref().map(Budget::turn);
        let budget_tokens = self.budget_tokens();
        // The texts as sent (cut to the per-input limit) and their tokens, again when that limit is learnt.
        let mut fitted: Vec<(String, usize, bool)> = Vec::new();
        let mut fitted_for = 0;
        while out.len() < texts.len() {
            let (max_inputs, max_tokens, max_input_tokens) = self.limits();
            let (max_inputs, max_tokens) =
                (max_inputs.max(1), max_tokens.min(budget_tokens).max(1));
            if fitted_for != max_input_tokens {
                fitted = texts
                    .iter()
                    .map(|t| self.fit(t, max_input_tokens))
                    .collect();
                fitted_for = max_input_tokens;
            }
            let (batch, tokens) = next_batch(
                &fitted[out.len()..],
                max_inputs,
                max_tokens,
                max_input_tokens,
            );
            let more = out.len() + batch.len() < texts.len();
            let stopped = match reserve(turn.as_mut(), tokens, more).await {
                Ok(permit) => match self.request(&batch, tokens, permit).await {
                    Ok(vectors) => {
                        out.extend(vectors);
                        None
                    }
                    Err(Failure::Error(e)) => Some(e),
                    Err(adapt) => self.adapt(adapt, &mut adaptations).err(),
                },
                Err(e) => Some(e),
            };
            if let Some(error) = stopped {
                return Err(PartialEmbedding { done: out, error });
            }
        }
        Ok(out)
    }

    /// The most tokens one request may ask for: no more than the budget grants within quota.max_wait.
    fn budget_tokens(&self) -> usize {
        self.budget
            .as_ref()
            .and_then(|b| b.largest_request("tokens"))
            .map_or(usize::MAX, |t| (t.floor() as usize).max(1))
    }

    /// Lowers the limit a request was refused for (as too large) to what the answer allows, counting the call's
    /// `adaptations`; fails once there are too many, or nothing smaller is left to send.
    fn adapt(&self, refused: Failure, adaptations: &mut usize) -> Result<(), ProviderError> {
        *adaptations += 1;
        let (limit, what) = match refused {
            Failure::FewerInputs(n) => (&self.max_inputs, n),
            Failure::ShorterInputs(n) => (&self.max_input_tokens, n),
            Failure::FewerTokens(n) => (&self.max_request_tokens, n),
            Failure::Error(_) => unreachable!("handled by embed_all"),
        };
        let before = limit.fetch_min(what.max(1), Ordering::Relaxed);
        tracing::warn!(
            before,
            after = what.max(1),
            "The embeddings API refused a request as too large; sending smaller ones"
        );
        if *adaptations > MAX_ADAPTATIONS || before <= 1 {
            return Err(ProviderError::permanent(
                PROVIDER,
                "the embeddings API refuses even a single short input as too large",
            ));
        }
        Ok(())
    }

    async fn request(
        &self,
        texts: &[String],
        tokens: usize,
        permit: Option<Permit>,
    ) -> Result<Vec<Vec<f32>>, Failure> {
        let encoding = match self.encoding {
            EncodingFormat::Base64 => "base64",
            EncodingFormat::Float => "float",
        };
        let mut body =
            serde_json::json!({ "model": self.model, "input": texts, "encoding_format": encoding });
        if self.model.starts_with("text-embedding-3") {
            body["dimensions"] = self.dimensions.into();
        }
        let mut req = self.http.post(&self.url).json(&body);
        if !self.api_key.is_empty() {
            req = match self.style {
                ApiStyle::Openai => req.bearer_auth(&self.api_key),
                ApiStyle::Azure => req.header("api-key", &self.api_key),
            };
        }
        let started = std::time::Instant::now();
        let mut answer_headers = None;
        let result = async {
            let resp = req
                .send()
                .await
                .map_err(|e| Failure::Error(http::send_error(PROVIDER, &self.url, &e)))?;
            let status = resp.status();
            let headers = resp.headers().clone();
            answer_headers = Some(headers.clone());
            let text = resp
                .text()
                .await
                .map_err(|e| Failure::Error(http::send_error(PROVIDER, &self.url, &e)))?;
            if !status.is_success() {
                return Err(classify(status, &headers, &text, texts.len(), tokens));
            }
            answer::decode(&text, texts.len(), self.dimensions).map_err(Failure::Error)
        }
        .await;
        if let (Some(budget), Some(permit)) = (&self.budget, permit) {
            settle(budget, permit, &result, answer_headers.as_ref(), tokens).await;
        }
        let result = result.map(|(vectors, _)| vectors);
        let outcome = match &result {
            Ok(_) => "ok",
            Err(Failure::Error(e)) => e.outcome(),
            Err(_) => "too_large",
        };
        crate::metrics::provider_request(
            "openai",
            "embed",
            outcome,
            started.elapsed().as_secs_f64(),
        );
        if result.is_ok() {
            metrics::counter!(crate::metrics::PROVIDER_EMBEDDED_INPUTS, "provider" => "openai")
                .increment(texts.len() as u64);
        }
        result
    }
}

/// The next request's inputs, taken in order from the `rest` still to embed (as fitted: text, tokens, whether
/// truncated) within the limits, and their tokens. Warns of each truncated input it takes.
fn next_batch(
    rest: &[(String, usize, bool)],
    max_inputs: usize,
    max_tokens: usize,
    max_input_tokens: usize,
) -> (Vec<String>, usize) {
    // When tokens decide how many requests are left, they get about the same number each: a small last
    // request would leave part of the provider's window unused.
    let rest_tokens: usize = rest.iter().map(|(_, n, _)| n).sum();
    let by_tokens = rest_tokens.div_ceil(max_tokens);
    let target = if by_tokens > rest.len().div_ceil(max_inputs) {
        rest_tokens.div_ceil(by_tokens)
    } else {
        usize::MAX
    };
    let mut batch = Vec::new();
    let mut tokens = 0;
    for (text, n, truncated) in rest {
        if !batch.is_empty()
            && (batch.len() >= max_inputs || tokens >= target || tokens + n > max_tokens)
        {
            break;
        }
        if *truncated {
            tracing::warn!(
                limit = max_input_tokens,
                "An input is longer than the embedding model takes; its end is left out of its vector"
            );
            metrics::counter!(crate::metrics::PROVIDER_TRUNCATED_INPUTS, "provider" => "openai")
                .increment(1);
        }
        batch.push(text.clone());
        tokens += n;
    }
    (batch, tokens)
}

/// Reserves the next request's share of the fleet's budget in the call's `turn` (none without a budget), then
/// checks that the job is still ours before the request is sent.
async fn reserve(
    turn: Option<&mut Turn>,
    tokens: usize,
    more: bool,
) -> Result<Option<Permit>, ProviderError> {
    let permit = match turn {
        Some(turn) => Some(
            turn.acquire(&[("requests", 1.0), ("tokens", tokens as f64)], more)
                .await?,
        ),
        None => None,
    };
    // Each request is paid, and the wait for the budget may have outlived the job's claim: a job another
    // consumer took over stops here instead of repeating its work.
    if crate::queue::current_claim_lost() {
        if let Some(permit) = permit {
            permit.release().await;
        }
        return Err(ProviderError::transient(
            PROVIDER,
            "the job's claim was taken over by another consumer; stopping before the next request",
        ));
    }
    Ok(permit)
}

/// Settles a reservation from the answer: tokens used (or none, for a refused request), the provider's remaining
/// counts, a fleet-wide cool-down on 429 and a pause on `insufficient_quota` or a refused key.
async fn settle(
    budget: &Budget,
    permit: Permit,
    result: &Result<(Vec<Vec<f32>>, Option<u64>), Failure>,
    headers: Option<&HeaderMap>,
    tokens: usize,
) {
    let remaining: Vec<(&'static str, f64)> = headers
        .map(|h| {
            [
                ("requests", "x-ratelimit-remaining-requests"),
                ("tokens", "x-ratelimit-remaining-tokens"),
            ]
            .into_iter()
            .filter_map(|(dim, name)| {
                let v = h.get(name)?.to_str().ok()?.trim().parse::<f64>().ok()?;
                (v.is_finite() && v >= 0.0).then_some((dim, v))
            })
            .collect()
        })
        .unwrap_or_default();
    match result {
        Ok((_, used)) => {
            let used = used.unwrap_or(tokens as u64);
            budget
                .settle(permit, &[("tokens", used as f64)], &remaining, used)
                .await;
        }
        Err(Failure::Error(e)) => budget.settle_error(permit, e).await,
        // Refused as too large: the provider counted nothing; give the tokens back.
        Err(Failure::FewerInputs(_) | Failure::ShorterInputs(_) | Failure::FewerTokens(_)) => {
            budget
                .settle(permit, &[("tokens", 0.0)], &remaining, 0)
                .await;
        }
    }
}

impl Embedder for OpenAiEmbedder {
    fn model(&self) -> &str {
        &self.model
    }

    fn dimensions(&self) -> usize {
        self.dimensions
    }

    fn embed<'a>(&'a self, texts: &'a [String]) -> EmbedFuture<'a> {
        Box::pin(async move { self.embed_all(texts).await.map_err(|p| p.error) })
    }

    fn embed_keeping<'a>(&'a self, texts: &'a [String]) -> KeepingFuture<'a> {
        Box::pin(self.embed_all(texts))
    }
}
