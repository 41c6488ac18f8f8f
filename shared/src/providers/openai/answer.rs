//! Reading the embeddings API's answers, read tolerantly: the vectors of a success (floats or base64, results in
//! any order, usage missing), and what a refusal means for the next request: an error to give up with, or a
//! smaller limit to retry under. Error bodies may be nested or flat, with `code` a string, a number or null.

use base64::Engine as _;
use reqwest::{StatusCode, header::HeaderMap};
use serde::Deserialize;

use super::PROVIDER;
use crate::providers::{ProviderError, http};

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
pub(super) enum Failure {
    /// Give up with this error.
    Error(ProviderError),
    /// The batch had too many inputs: at most this many next time.
    FewerInputs(usize),
    /// An input had too many tokens: at most this many next time.
    ShorterInputs(usize),
    /// The request had too many tokens: at most this many next time.
    FewerTokens(usize),
}

/// The vectors of an answer, and the tokens it says were used.
pub(super) fn decode(
    text: &str,
    expected: usize,
    dimensions: usize,
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
            if v.len() != dimensions {
                return Err(ProviderError::permanent(
                    PROVIDER,
                    format!(
                        "the model answered {} dimensions but {} are configured (embedding.dimensions)",
                        v.len(),
                        dimensions
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

pub(super) fn classify(
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
