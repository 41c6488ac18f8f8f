//! Fake OpenAI embeddings (and Azure OpenAI's deployment route): keys, quota, injected faults, validation in
//! the order the real API checks, per-key request and token windows with the `x-ratelimit-*` headers, and
//! deterministic vectors.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use upload_pipeline::providers::hashing::HashingEmbedder;

use super::{Fault, Faults, Latency, Shared, Window, cut_connection, malformed, request_key, roll};

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
    /// These requests get 503: their numbers in the order served, from 1 (a call that fails part-way).
    pub fail_requests: Vec<u64>,
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
            fail_requests: Vec::new(),
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

pub(super) async fn azure_embeddings(
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

pub(super) async fn embeddings(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
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

/// One embeddings call, in the order the real API answers: key, quota, injected faults, validation, the
/// per-key rate limits, then the vectors.
async fn embed_request(s: Shared, headers: HeaderMap, body: Value, azure: bool) -> Response {
    let (config, fail_now) = take_config(&s);
    tokio::time::sleep(config.latency.sample()).await;
    let key = request_key(&headers, azure);
    if let Some(refusal) = refused_key(&config, key.as_deref()) {
        return refusal;
    }
    if config.quota_exhausted {
        return insufficient_quota();
    }
    let fault = if fail_now {
        Some(Fault::ServerError)
    } else {
        roll(&config.faults).inspect(|_| s.lock().stats.faults += 1)
    };
    if let Some(fault) = fault {
        return injected(fault).await;
    }
    let request = match EmbedRequest::validate(&body, &config) {
        Ok(request) => request,
        Err(refusal) => return *refusal,
    };
    let who = key.unwrap_or_else(|| "anonymous".into());
    let (mut rate_headers, limited) = admit(&s, &config, who, &request);
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
    let mut resp = embeddings_answer(&s, &request);
    resp.headers_mut().extend(rate_headers);
    resp
}

/// Counts the request and takes the configuration it is served with; true when `fail_next` or `fail_requests`
/// fails it.
fn take_config(s: &Shared) -> (OpenAiConfig, bool) {
    let mut inner = s.lock();
    inner.stats.embedding_requests += 1;
    let scripted = inner
        .config
        .openai
        .fail_requests
        .contains(&inner.stats.embedding_requests);
    let fail_now = inner.config.openai.fail_next > 0 || scripted;
    if inner.config.openai.fail_next > 0 {
        inner.config.openai.fail_next -= 1;
    }
    if fail_now {
        inner.stats.faults += 1;
    }
    (inner.config.openai.clone(), fail_now)
}

/// OpenAI's 401 for a missing, unknown or revoked key; `None` when the key is accepted.
fn refused_key(config: &OpenAiConfig, key: Option<&str>) -> Option<Response> {
    let accepted = !config.key_revoked
        && (config.keys.is_empty() || key.is_some_and(|k| config.keys.iter().any(|c| c == k)));
    if accepted {
        return None;
    }
    Some(match key {
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
    })
}

fn insufficient_quota() -> Response {
    openai_error(
        StatusCode::TOO_MANY_REQUESTS,
        "You exceeded your current quota, please check your plan and billing details.",
        "insufficient_quota",
        Some("insufficient_quota"),
    )
}

/// The answer to a request that drew `fault`.
async fn injected(fault: Fault) -> Response {
    match fault {
        Fault::ServerError if rand::random::<bool>() => openai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
        ),
        Fault::ServerError => openai_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "The server is overloaded or not ready yet.",
            "server_error",
            None,
        ),
        Fault::Timeout(d) => {
            tokio::time::sleep(d).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Fault::Malformed => malformed(),
        Fault::Reset => cut_connection(),
        Fault::Quota => insufficient_quota(),
    }
}

/// A 400 `invalid_request_error` saying `message`.
fn invalid(message: &str) -> Response {
    openai_error(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        None,
    )
}

/// The answer refusing an invalid request (boxed: a `Response` is large for an `Err`).
type Refusal = Box<Response>;

fn refuse<T>(answer: Response) -> Result<T, Refusal> {
    Err(Box::new(answer))
}

/// An embeddings request that passed validation.
struct EmbedRequest {
    model: String,
    texts: Vec<String>,
    base64: bool,
    dimensions: usize,
    /// Tokens over all inputs.
    total: usize,
}

impl EmbedRequest {
    /// Validates `body` in the order the real API checks; `Err` is the answer refusing it.
    fn validate(body: &Value, config: &OpenAiConfig) -> Result<Self, Refusal> {
        let Some(obj) = body.as_object() else {
            return refuse(invalid("The body must be a JSON object."));
        };
        if let Some(unknown) = obj.keys().find(|k| {
            !["model", "input", "encoding_format", "dimensions", "user"].contains(&k.as_str())
        }) {
            return refuse(invalid(&format!(
                "Unrecognized request argument supplied: {unknown}"
            )));
        }
        let (model, native) = model_of(obj, config)?;
        let texts = texts_of(obj, config)?;
        let encoding = obj
            .get("encoding_format")
            .and_then(Value::as_str)
            .unwrap_or("float");
        if !["float", "base64"].contains(&encoding) {
            return refuse(invalid(&format!(
                "'{encoding}' is not one of ['float', 'base64'] - 'encoding_format'"
            )));
        }
        let dimensions = dimensions_of(obj, model, native)?;
        let total = token_total(&texts, config)?;
        Ok(Self {
            model: model.to_owned(),
            texts,
            base64: encoding == "base64",
            dimensions,
            total,
        })
    }
}

type Object = serde_json::Map<String, Value>;

/// The requested model and its native dimensions.
fn model_of<'a>(obj: &'a Object, config: &OpenAiConfig) -> Result<(&'a str, usize), Refusal> {
    let Some(model) = obj.get("model").and_then(Value::as_str) else {
        return refuse(invalid("you must provide a model parameter"));
    };
    let Some(&native) = config.models.get(model) else {
        return refuse(openai_error(
            StatusCode::NOT_FOUND,
            &format!("The model `{model}` does not exist or you do not have access to it."),
            "invalid_request_error",
            Some("model_not_found"),
        ));
    };
    Ok((model, native))
}

/// The inputs, none empty and no more than the batch limit.
fn texts_of(obj: &Object, config: &OpenAiConfig) -> Result<Vec<String>, Refusal> {
    let texts = match obj.get("input").map(inputs) {
        Some(Ok(t)) => t,
        Some(Err(m)) => return refuse(invalid(&m)),
        None => return refuse(invalid("'input' is a required property")),
    };
    if texts.is_empty() || texts.iter().any(String::is_empty) {
        return refuse(invalid(
            "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.",
        ));
    }
    if texts.len() > config.max_inputs {
        // text-embeddings-inference answers a batch over its limit with 422; OpenAI with 400.
        let status = if config.max_inputs < 2048 {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::BAD_REQUEST
        };
        return refuse(openai_error(
            status,
            &format!(
                "batch size {} > maximum allowed batch size {}",
                texts.len(),
                config.max_inputs
            ),
            "invalid_request_error",
            None,
        ));
    }
    Ok(texts)
}

/// The dimensions asked for (text-embedding-3 models only), else the model's own.
fn dimensions_of(obj: &Object, model: &str, native: usize) -> Result<usize, Refusal> {
    match obj.get("dimensions") {
        None | Some(Value::Null) => Ok(native),
        Some(d) if model.starts_with("text-embedding-3") => match d.as_u64() {
            Some(d) if d >= 1 && d as usize <= native => Ok(d as usize),
            _ => refuse(invalid(&format!(
                "Invalid value for 'dimensions': must be between 1 and {native}."
            ))),
        },
        Some(_) => refuse(invalid(
            "This model does not support specifying dimensions.",
        )),
    }
}

/// The tokens of all inputs, each within the context length and all within the per-request limit.
fn token_total(texts: &[String], config: &OpenAiConfig) -> Result<usize, Refusal> {
    let bpe = upload_pipeline::chunking::tokenizer();
    let counts: Vec<usize> = texts.iter().map(|t| bpe.encode_ordinary(t).len()).collect();
    if let Some(&long) = counts.iter().find(|&&n| n > config.max_input_tokens) {
        return refuse(invalid(&format!(
            "This model's maximum context length is {} tokens, however you requested {long} tokens ({long} in your prompt; 0 for the completion). Please reduce your prompt; or completion length.",
            config.max_input_tokens
        )));
    }
    let total: usize = counts.iter().sum();
    if total > config.max_request_tokens {
        return refuse(openai_error(
            StatusCode::BAD_REQUEST,
            &format!(
                "Requested {total} tokens, max {} tokens per request",
                config.max_request_tokens
            ),
            "max_tokens_per_request",
            Some("max_tokens_per_request"),
        ));
    }
    Ok(total)
}

/// Rate limits, per key, over sliding windows: the request counts against both budgets only if admitted.
/// Returns the `x-ratelimit-*` headers and, when refused, the 429's message and the time until a retry helps.
fn admit(
    s: &Shared,
    config: &OpenAiConfig,
    who: String,
    request: &EmbedRequest,
) -> (HeaderMap, Option<(String, Duration)>) {
    let now = Instant::now();
    let mut rate_headers = HeaderMap::new();
    let mut limited: Option<(String, Duration)> = None;
    let mut inner = s.lock();
    let inner = &mut *inner;
    let rq = inner.requests.entry(who.clone()).or_default();
    let tq = inner.tokens.entry(who).or_default();
    for (name, window, queue, cost) in [
        ("requests", config.requests, &mut *rq, 1u64),
        ("tokens", config.tokens, &mut *tq, request.total as u64),
    ] {
        let Some(w) = window else { continue };
        let (used, reset) = window_use(queue, &w, now);
        let over = used + cost > w.limit;
        if over && limited.is_none() {
            let unit = if name == "requests" { "RPM" } else { "TPM" };
            let wait = reset.max(Duration::from_millis(1));
            limited = Some((
                format!(
                    "Rate limit reached for {} in organization org-fake on {name} per min ({unit}): Limit {}, Used {used}, Requested {cost}. Please try again in {}. Visit https://platform.openai.com/account/rate-limits to learn more.",
                    request.model,
                    w.limit,
                    go_duration(wait)
                ),
                wait,
            ));
        }
        let remaining = w.limit.saturating_sub(used + if over { 0 } else { cost });
        window_headers(&mut rate_headers, name, w.limit, remaining, reset);
    }
    if limited.is_none() {
        rq.push_back((now, 1));
        tq.push_back((now, request.total as u64));
        inner.stats.embedded_inputs += request.texts.len() as u64;
        inner.stats.embedded_tokens += request.total as u64;
    } else {
        inner.stats.rate_limited += 1;
    }
    (rate_headers, limited)
}

/// `x-ratelimit-{limit,remaining,reset}-<name>`.
fn window_headers(
    headers: &mut HeaderMap,
    name: &str,
    limit: u64,
    remaining: u64,
    reset: Duration,
) {
    let header = |kind: &str| {
        axum::http::HeaderName::from_bytes(format!("x-ratelimit-{kind}-{name}").as_bytes())
            .expect("header")
    };
    headers.insert(header("limit"), HeaderValue::from(limit));
    headers.insert(header("remaining"), HeaderValue::from(remaining));
    headers.insert(
        header("reset"),
        HeaderValue::from_str(&go_duration(reset)).expect("header"),
    );
}

/// The 200: a vector per input (fixed ones where configured, else hashed), as floats or base64.
fn embeddings_answer(s: &Shared, request: &EmbedRequest) -> Response {
    let embedder = HashingEmbedder::new(&request.model, request.dimensions);
    let fixed = s.lock().vectors.clone();
    let data: Vec<Value> = request
        .texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let v = fixed.get(t).cloned().unwrap_or_else(|| embedder.vector(t));
            let embedding = if request.base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    Json(json!({
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": { "prompt_tokens": request.total, "total_tokens": request.total },
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

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
