//! An OpenAI-compatible embeddings client: OpenAI, Azure OpenAI (deployment URLs with `api-key`, or the v1
//! endpoint), and servers that speak the same protocol (vLLM, text-embeddings-inference, Ollama).
//!
//! Texts are packed into requests within the provider's limits (inputs and tokens per request, tokens per
//! input; over-long inputs are truncated with a warning). Smaller limits are learnt from the answers: 413 and
//! 422 shrink the batch, a context-length 400 shrinks the per-input limit, `max_tokens_per_request` the request
//! budget; what is learnt holds for the life of the process. With a fleet budget no request costs more tokens
//! than [`Budget::largest_request`]: a large batch at a low token limit goes as several requests, one after the
//! other in the same [`Turn`](crate::quota::Turn), each granted within `quota.max_wait`. A refused key (401/403)
//! pauses the provider fleet-wide. Answers are read tolerantly: errors nested or flat, `code` a string, a number
//! or null, vectors as floats or base64, results in any order, usage missing.
//! The client never sleeps or retries on its own: a retryable error goes back to the queue with the time the
//! provider named.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use base64::Engine as _;
use reqwest::{StatusCode, header::HeaderMap};
use serde::Deserialize;
use tiktoken_rs::CoreBPE;

use super::{EmbedFuture, Embedder, ProviderError, http};
use crate::{
    quota::{Budget, Permit, Quota, openai_limits},
    settings::{ApiStyle, EmbeddingSettings, EncodingFormat, Settings},
};

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

#[derive(Deserialize)]
struct Response {
    data: Vec<Item>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Item {
    index: usize,
    embedding: EmbeddingValue,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EmbeddingValue {
    Floats(Vec<f32>),
    Base64(String),
}

/// What a failed request means for the next one.
enum Failure {
    /// Give up with this error.
    Error(ProviderError),
    /// The batch had too many inputs: at most this many next time.
    FewerInputs(usize),
    /// An input had too many tokens: at most this many next time.
    ShorterInputs(usize),
    /// The request had too many tokens: at most this many next time.
    FewerTokens(usize),
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
        let budget = quota.budget(
            "openai",
            &e.model,
            e.openai.api_key.expose(),
            openai_limits(&settings.quota.openai),
            settings.worker.concurrency.embed,
        );
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

    async fn embed_all(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, ProviderError> {
        let mut out = Vec::with_capacity(texts.len());
        let mut adaptations = 0;
        // One place in the fleet's line for all the requests of this call.
        let mut turn = self.budget.as_ref().map(Budget::turn);
        // No request asks for more tokens than the budget grants within quota.max_wait.
        let budget_tokens = self
            .budget
            .as_ref()
            .and_then(|b| b.largest_request("tokens"))
            .map_or(usize::MAX, |t| (t.floor() as usize).max(1));
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
            // When tokens decide how many requests are left, they get about the same number each: a small last
            // request would leave part of the provider's window unused.
            let rest = &fitted[out.len()..];
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
            let more = out.len() + batch.len() < texts.len();
            let permit = match turn.as_mut() {
                Some(turn) => Some(
                    turn.acquire(&[("requests", 1.0), ("tokens", tokens as f64)], more)
                        .await?,
                ),
                None => None,
            };
            // Each request is paid, and the wait for the budget may have outlived the job's claim: a job another
            // consumer took over stops here instead of repeating its work.
            if crate::queue::current_claim_lost() {
                return Err(ProviderError::transient(
                    PROVIDER,
                    "the job's claim was taken over by another consumer; stopping before the next request",
                ));
            }
            match self.request(&batch, tokens, permit).await {
                Ok(vectors) => out.extend(vectors),
                Err(Failure::Error(e)) => return Err(e),
                Err(adapt) => {
                    adaptations += 1;
                    let (limit, what) = match adapt {
                        Failure::FewerInputs(n) => (&self.max_inputs, n),
                        Failure::ShorterInputs(n) => (&self.max_input_tokens, n),
                        Failure::FewerTokens(n) => (&self.max_request_tokens, n),
                        Failure::Error(_) => unreachable!("handled above"),
                    };
                    let before = limit.fetch_min(what.max(1), Ordering::Relaxed);
                    tracing::warn!(
                        before,
                        after = what.max(1),
                        "The embeddings API refused a request as too large; sending smaller ones"
                    );
                    if adaptations > MAX_ADAPTATIONS || before <= 1 {
                        return Err(ProviderError::permanent(
                            PROVIDER,
                            "the embeddings API refuses even a single short input as too large",
                        ));
                    }
                }
            }
        }
        Ok(out)
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
            self.decode(&text, texts.len()).map_err(Failure::Error)
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

    /// The vectors of an answer, and the tokens it says were used.
    fn decode(
        &self,
        text: &str,
        expected: usize,
    ) -> Result<(Vec<Vec<f32>>, Option<u64>), ProviderError> {
        let parsed: Response = serde_json::from_str(text).map_err(|e| {
            ProviderError::transient(PROVIDER, format!("unreadable embeddings answer: {e}"))
        })?;
        let used = parsed
            .usage
            .and_then(|u| u.total_tokens.or(u.prompt_tokens));
        let mut items = parsed.data;
        items.sort_by_key(|i| i.index);
        if items.len() != expected || items.iter().enumerate().any(|(i, it)| it.index != i) {
            return Err(ProviderError::transient(
                PROVIDER,
                format!("asked for {expected} embeddings, got {}", items.len()),
            ));
        }
        items
            .into_iter()
            .map(|it| {
                let v = match it.embedding {
                    EmbeddingValue::Floats(v) => v,
                    EmbeddingValue::Base64(b) => {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(b)
                            .map_err(|e| {
                                ProviderError::transient(PROVIDER, format!("bad base64 embedding: {e}"))
                            })?;
                        bytes
                            .chunks_exact(4)
                            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect()
                    }
                };
                if v.len() != self.dimensions {
                    return Err(ProviderError::permanent(
                        PROVIDER,
                        format!(
                            "the model answered {} dimensions but {} are configured (embedding.dimensions)",
                            v.len(),
                            self.dimensions
                        ),
                    ));
                }
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(ProviderError::transient(PROVIDER, "the answer holds a non-finite number"));
                }
                Ok(v)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|vectors| (vectors, used))
    }
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

/// The message and kind (`type`, else `code`) of an error body, nested (`{"error": {...}}`) or flat, with `code`
/// a string, a number or null.
fn error_fields(body: &str) -> (String, String) {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    let e = v.get("error").filter(|e| e.is_object()).unwrap_or(&v);
    let text = |k: &str| match e.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    let message = match text("message") {
        m if m.is_empty() => match v.get("error").and_then(|e| e.as_str()) {
            Some(m) => m.to_owned(),
            None => body.chars().take(300).collect(),
        },
        m => m,
    };
    let (kind, code) = (text("type"), text("code"));
    let kind = if code == "insufficient_quota" || kind.is_empty() {
        code
    } else {
        kind
    };
    (message, kind)
}

/// The smallest number in `message` that is at least `floor` and below `current`: the limit a server names
/// ("maximum allowed batch size 32", "maximum context length is 512 tokens").
fn named_limit(message: &str, floor: usize, current: usize) -> Option<usize> {
    message
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<usize>().ok())
        .filter(|n| *n >= floor && *n < current)
        .min()
}

fn classify(
    status: StatusCode,
    headers: &HeaderMap,
    body: &str,
    inputs: usize,
    tokens: usize,
) -> Failure {
    let (message, kind) = error_fields(body);
    let lower = message.to_ascii_lowercase();
    let about_tokens = lower.contains("token") || lower.contains("context length");
    let error = match status.as_u16() {
        429 if kind == "insufficient_quota" || lower.contains("exceeded your current quota") => {
            ProviderError::QuotaExhausted {
                provider: PROVIDER,
                message,
            }
        }
        429 => http::rate_limited(PROVIDER, headers, message),
        402 => ProviderError::QuotaExhausted {
            provider: PROVIDER,
            message,
        },
        400 if kind == "max_tokens_per_request" || lower.contains("max_tokens_per_request") => {
            return Failure::FewerTokens(named_limit(&message, 1, tokens).unwrap_or(tokens / 2));
        }
        400 | 413 | 422
            if about_tokens
                && (lower.contains("maximum")
                    || lower.contains("less than")
                    || lower.contains("too long")
                    || kind == "context_length_exceeded") =>
        {
            let current = tokens.div_ceil(inputs.max(1)).max(2);
            let per_input = named_limit(&message, 8, usize::MAX).filter(|n| *n < current);
            return Failure::ShorterInputs(per_input.unwrap_or(current / 2));
        }
        413 | 422 if inputs > 1 => {
            return Failure::FewerInputs(named_limit(&message, 1, inputs).unwrap_or(inputs / 2));
        }
        401 | 403 => {
            tracing::warn!(status = status.as_u16(), %message, "The embeddings API refused our key: check embedding.openai.api_key");
            ProviderError::Unauthorized {
                provider: PROVIDER,
                message: format!("HTTP {status}: {message}"),
            }
        }
        408 | 409 | 424 | 425 | 500..=599 => {
            ProviderError::transient(PROVIDER, format!("HTTP {status}: {message}"))
        }
        _ => ProviderError::permanent(PROVIDER, format!("HTTP {status}: {message}")),
    };
    Failure::Error(error)
}

impl Embedder for OpenAiEmbedder {
    fn model(&self) -> &str {
        &self.model
    }

    fn dimensions(&self) -> usize {
        self.dimensions
    }

    fn embed<'a>(&'a self, texts: &'a [String]) -> EmbedFuture<'a> {
        Box::pin(self.embed_all(texts))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn error(f: Failure) -> ProviderError {
        match f {
            Failure::Error(e) => e,
            _ => panic!("expected an error"),
        }
    }

    #[test]
    fn errors_are_classified_nested_or_flat() {
        let h = HeaderMap::new();
        let quota = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        assert!(matches!(
            error(classify(StatusCode::TOO_MANY_REQUESTS, &h, quota, 1, 1)),
            ProviderError::QuotaExhausted { .. }
        ));
        let rate = r#"{"error":{"message":"Rate limit reached for requests. Please try again in 2.812s.","type":"requests","code":"rate_limit_exceeded"}}"#;
        let e = error(classify(StatusCode::TOO_MANY_REQUESTS, &h, rate, 1, 1));
        assert_eq!(e.retry_after(), Some(Duration::from_millis(2812)));
        assert!(e.is_retryable());
        let azure = r#"{"error":{"code":"429","message":"Requests have exceeded call rate limit. Please retry after 55 seconds."}}"#;
        let e = error(classify(StatusCode::TOO_MANY_REQUESTS, &h, azure, 1, 1));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(55)));
        let flat =
            r#"{"object":"error","message":"bad input","type":"BadRequestError","code":400}"#;
        let e = error(classify(StatusCode::BAD_REQUEST, &h, flat, 1, 1));
        assert_eq!(
            e,
            ProviderError::permanent(PROVIDER, "HTTP 400 Bad Request: bad input")
        );
        assert!(
            error(classify(
                StatusCode::SERVICE_UNAVAILABLE,
                &h,
                "unhealthy",
                1,
                1
            ))
            .is_retryable()
        );
        let refused = r#"{"error":{"message":"Incorrect API key provided: sk-te**st. You can find your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        for status in [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN] {
            let e = error(classify(status, &h, refused, 1, 1));
            assert!(
                matches!(&e, ProviderError::Unauthorized { message, .. } if message.contains("Incorrect API key")),
                "{e:?}"
            );
            assert!(!e.is_retryable());
        }
    }

    #[test]
    fn too_large_answers_name_the_smaller_limit() {
        let h = HeaderMap::new();
        let tei = r#"{"error":"batch size 64 > maximum allowed batch size 32","error_type":"validation"}"#;
        assert!(matches!(
            classify(StatusCode::UNPROCESSABLE_ENTITY, &h, tei, 64, 6400),
            Failure::FewerInputs(32)
        ));
        assert!(matches!(
            classify(StatusCode::PAYLOAD_TOO_LARGE, &h, "", 10, 100),
            Failure::FewerInputs(5)
        ));
        let ctx = r#"{"error":{"message":"This model's maximum context length is 512 tokens, however you requested 900 tokens (900 in your prompt; 0 for the completion).","type":"invalid_request_error","param":null,"code":null}}"#;
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, &h, ctx, 1, 900),
            Failure::ShorterInputs(512)
        ));
        let tei = r#"{"error":"Input validation error: `inputs` must have less than 512 tokens. Given: 900","error_type":"validation"}"#;
        assert!(matches!(
            classify(StatusCode::PAYLOAD_TOO_LARGE, &h, tei, 1, 900),
            Failure::ShorterInputs(512)
        ));
        let ollama = r#"{"error":"input is too long: the context length is exceeded"}"#;
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, &h, ollama, 2, 1000),
            Failure::ShorterInputs(250)
        ));
        let req = r#"{"error":{"message":"Requested 310000 tokens, max 300000 tokens per request","type":"max_tokens_per_request","code":"max_tokens_per_request"}}"#;
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, &h, req, 100, 310000),
            Failure::FewerTokens(300000)
        ));
    }
}
