//! An OpenAI-compatible embeddings client (`POST {base_url}/embeddings`): OpenAI, and servers that speak the
//! same protocol (vLLM, text-embeddings-inference, Ollama, Azure OpenAI's v1 endpoint). Tolerant of their
//! variations: errors nested or flat, floats or base64, results in any order, missing usage.

use std::time::Duration;

use base64::Engine as _;
use reqwest::{StatusCode, header::HeaderMap};
use serde::Deserialize;

use super::{EmbedError, EmbedFuture, Embedder};
use crate::settings::EmbeddingSettings;

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct OpenAiEmbedder {
    http: reqwest::Client,
    url: String,
    api_key: String,
    model: String,
    dimensions: usize,
}

#[derive(Deserialize)]
struct Response {
    data: Vec<Item>,
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

impl OpenAiEmbedder {
    /// A client for the configured endpoint.
    pub fn new(settings: &EmbeddingSettings) -> Result<Self, EmbedError> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("upload-pipeline/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| EmbedError::Permanent(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            url: format!("{}/embeddings", settings.base_url.trim_end_matches('/')),
            api_key: settings.api_key.expose().to_owned(),
            model: settings.model.clone(),
            dimensions: settings.dimensions as usize,
        })
    }

    async fn request(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut body =
            serde_json::json!({ "model": self.model, "input": texts, "encoding_format": "float" });
        if self.model.starts_with("text-embedding-3") {
            body["dimensions"] = self.dimensions.into();
        }
        let mut req = self.http.post(&self.url).json(&body);
        if !self.api_key.is_empty() {
            req = req.bearer_auth(&self.api_key);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| EmbedError::Transient(format!("request to {} failed: {e}", self.url)))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp
            .text()
            .await
            .map_err(|e| EmbedError::Transient(format!("reading the answer failed: {e}")))?;
        if !status.is_success() {
            return Err(classify(status, &headers, &text));
        }
        let parsed: Response = serde_json::from_str(&text)
            .map_err(|e| EmbedError::Transient(format!("unreadable embeddings answer: {e}")))?;
        let mut items = parsed.data;
        items.sort_by_key(|i| i.index);
        if items.len() != texts.len() || items.iter().enumerate().any(|(i, it)| it.index != i) {
            return Err(EmbedError::Transient(format!(
                "asked for {} embeddings, got {}",
                texts.len(),
                items.len()
            )));
        }
        items
            .into_iter()
            .map(|it| {
                let v = match it.embedding {
                    EmbeddingValue::Floats(v) => v,
                    EmbeddingValue::Base64(b) => {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(b)
                            .map_err(|e| EmbedError::Transient(format!("bad base64 embedding: {e}")))?;
                        bytes
                            .chunks_exact(4)
                            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect()
                    }
                };
                if v.len() != self.dimensions {
                    return Err(EmbedError::Permanent(format!(
                        "the model answered {} dimensions but {} are configured (embedding.dimensions)",
                        v.len(),
                        self.dimensions
                    )));
                }
                Ok(v)
            })
            .collect()
    }
}

/// The error message and type of an error body, nested (`{"error": {...}}`) or flat.
fn error_fields(body: &str) -> (String, String) {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    let e = v.get("error").filter(|e| e.is_object()).unwrap_or(&v);
    let text = |k: &str| {
        e.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let message = match text("message") {
        m if m.is_empty() => body.chars().take(300).collect(),
        m => m,
    };
    let kind = [text("type"), text("code")]
        .into_iter()
        .find(|s| !s.is_empty())
        .unwrap_or_default();
    (message, kind)
}

/// Retry-After as `retry-after-ms`, seconds, or "try again in 2.5s" in the message.
fn retry_after(headers: &HeaderMap, message: &str) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    if let Some(ms) = header("retry-after-ms").filter(|ms| *ms > 0.0) {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    if let Some(s) = header("retry-after").filter(|s| *s > 0.0 && *s <= 3600.0) {
        return Some(Duration::from_secs_f64(s));
    }
    let lower = message.to_ascii_lowercase();
    let rest = &lower[lower.find("try again in ")? + "try again in ".len()..];
    let num: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let value: f64 = num.parse().ok()?;
    Some(if rest[num.len()..].starts_with("ms") {
        Duration::from_secs_f64(value / 1000.0)
    } else {
        Duration::from_secs_f64(value)
    })
}

fn classify(status: StatusCode, headers: &HeaderMap, body: &str) -> EmbedError {
    let (message, kind) = error_fields(body);
    match status.as_u16() {
        429 if kind == "insufficient_quota" => EmbedError::QuotaExhausted(message),
        429 => EmbedError::RateLimited {
            retry_after: retry_after(headers, &message),
            message,
        },
        402 => EmbedError::QuotaExhausted(message),
        408 | 409 | 500..=599 => EmbedError::Transient(format!("HTTP {status}: {message}")),
        _ => EmbedError::Permanent(format!("HTTP {status}: {message}")),
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
        Box::pin(self.request(texts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_nested_or_flat() {
        let h = HeaderMap::new();
        let quota = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, &h, quota),
            EmbedError::QuotaExhausted(_)
        ));
        let rate = r#"{"error":{"message":"Rate limit reached for requests. Please try again in 2.812s.","type":"requests","code":"rate_limit_exceeded"}}"#;
        let e = classify(StatusCode::TOO_MANY_REQUESTS, &h, rate);
        assert_eq!(e.retry_after(), Some(Duration::from_millis(2812)));
        assert!(e.is_retryable());
        let flat =
            r#"{"object":"error","message":"bad input","type":"BadRequestError","code":400}"#;
        let e = classify(StatusCode::BAD_REQUEST, &h, flat);
        assert_eq!(
            e,
            EmbedError::Permanent("HTTP 400 Bad Request: bad input".into())
        );
        assert!(classify(StatusCode::SERVICE_UNAVAILABLE, &h, "unhealthy").is_retryable());
        let mut h = HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, &h, "{}").retry_after(),
            Some(Duration::from_secs(7))
        );
    }
}
