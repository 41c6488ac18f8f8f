//! Fake rerankers: Cohere (`POST /v2/rerank`), Jina AI and Cohere v1 (`POST /v1/rerank`) and Hugging Face
//! text-embeddings-inference (`POST /rerank`), each with its own request and answer shapes and error bodies; keys,
//! a per-key request window, scripted failures (`fail_next`, `hang_next`) and random faults.
//!
//! Scores are predictable: a document scores the share of the query's distinct words it holds ([`score`]),
//! whatever the model, so a test can tell what order a reranked search must come back in.

use std::{collections::BTreeSet, time::Instant};

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Fault, Faults, Latency, Shared, Window, cut_connection, request_key, roll};

/// The rerankers' side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RerankConfig {
    /// Keys accepted as `Authorization: Bearer`; empty accepts any request.
    pub keys: Vec<String>,
    /// Latency of every answer.
    pub latency: Latency,
    /// Requests per key per window; past it, 429 with `Retry-After`.
    pub requests: Option<Window>,
    /// Injected faults (5xx, hangs of `hang_ms`, malformed answers, cut connections; `insufficient_quota` is a
    /// 402).
    pub faults: Faults,
    /// The next requests answer these statuses, in order, whatever the rest says (a 429 with `Retry-After:
    /// retry_after_s`).
    pub fail_next: Vec<u16>,
    /// The next this many requests hang for `faults.hang_ms`, then answer 504.
    pub hang_next: u64,
    /// `Retry-After` of scripted 429s, in seconds.
    pub retry_after_s: u64,
    /// Every request gets 401 while set, as if its key had been revoked.
    pub key_revoked: bool,
    /// Most documents per request (text-embeddings-inference's `--max-client-batch-size`, 32 by default);
    /// 0: no limit. Past it, 413 as TEI answers.
    pub max_documents: usize,
}

/// How much `document` answers `query`: the share of the query's distinct words (letters and digits, any case)
/// that the document holds, 0 to 1.
pub fn score(query: &str, document: &str) -> f64 {
    let words = |text: &str| -> BTreeSet<String> {
        text.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    };
    let (asked, held) = (words(query), words(document));
    if asked.is_empty() {
        return 0.0;
    }
    asked.intersection(&held).count() as f64 / asked.len() as f64
}

/// The indices of `documents` best first by [`score`] (ties in the order given), as the fake ranks them.
pub fn ranking(query: &str, documents: &[&str]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..documents.len()).collect();
    order.sort_by(|a, b| score(query, documents[*b]).total_cmp(&score(query, documents[*a])));
    order
}

/// Which protocol a request came in.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Protocol {
    /// `/v2/rerank`.
    Cohere,
    /// `/v1/rerank`: Jina, and Cohere's v1, which share a shape.
    Jina,
    /// `/rerank`.
    Tei,
}

pub(super) async fn cohere(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    rerank(s, Protocol::Cohere, headers, body).await
}

pub(super) async fn jina(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    rerank(s, Protocol::Jina, headers, body).await
}

pub(super) async fn tei(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    rerank(s, Protocol::Tei, headers, body).await
}

/// An error in the protocol's own body: Cohere `{"id", "message"}`, Jina (FastAPI) `{"detail"}`, TEI
/// `{"error", "error_type"}`.
fn error(protocol: Protocol, status: StatusCode, message: &str) -> Response {
    let body = match protocol {
        Protocol::Cohere => json!({ "id": uuid::Uuid::new_v4().to_string(), "message": message }),
        Protocol::Jina => json!({ "detail": message }),
        Protocol::Tei => {
            let kind = match status.as_u16() {
                401 => "unauthorized",
                413 => "validation",
                429 => "overloaded",
                424 => "backend",
                503 => "unhealthy",
                _ => "empty",
            };
            json!({ "error": message, "error_type": kind })
        }
    };
    (status, Json(body)).into_response()
}

/// A validated request.
struct Request {
    query: String,
    documents: Vec<String>,
    top_n: Option<usize>,
    /// Whether the answer carries the documents' text (Jina's default; TEI's `return_text`).
    return_documents: bool,
}

/// Reads `body` as `protocol` asks it; `Err` is the refusal.
fn validate(protocol: Protocol, body: &[u8]) -> Result<Request, Box<Response>> {
    let refuse = |status: StatusCode, message: String| Box::new(error(protocol, status, &message));
    let bad = |message: &str| refuse(StatusCode::BAD_REQUEST, message.to_owned());
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(&format!("invalid request body: {e}")))?;
    let query = match v.get("query").and_then(Value::as_str) {
        Some(q) if !q.trim().is_empty() => q.to_owned(),
        _ => return Err(bad("query must be a non-empty string")),
    };
    if protocol != Protocol::Tei && !v.get("model").is_some_and(Value::is_string) {
        return Err(bad("model is required"));
    }
    let field = if protocol == Protocol::Tei {
        "texts"
    } else {
        "documents"
    };
    let documents = v
        .get(field)
        .and_then(Value::as_array)
        .filter(|d| !d.is_empty())
        .ok_or_else(|| bad(&format!("{field} must be a non-empty list")))?
        .iter()
        .map(|d| match (protocol, d) {
            (_, Value::String(s)) => Some(s.clone()),
            // Jina and Cohere v1 also take `{"text": ...}` objects.
            (Protocol::Jina, Value::Object(o)) => {
                o.get("text").and_then(Value::as_str).map(str::to_owned)
            }
            _ => None,
        })
        .collect::<Option<Vec<String>>>()
        .ok_or_else(|| bad(&format!("{field} must hold strings")))?;
    let top_n = match v.get("top_n") {
        None | Some(Value::Null) => None,
        Some(n) => match n.as_u64() {
            Some(n) if n >= 1 => Some(n as usize),
            _ => return Err(bad("top_n must be a positive integer")),
        },
    };
    let return_documents = match protocol {
        Protocol::Cohere => false,
        Protocol::Jina => v
            .get("return_documents")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        Protocol::Tei => v
            .get("return_text")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    Ok(Request {
        query,
        documents,
        top_n,
        return_documents,
    })
}

/// What a request is scripted to get before anything else is looked at.
enum Scripted {
    Status(u16),
    Hang,
}

/// Counts the request, and takes its configuration and scripted answer.
fn take(s: &Shared) -> (RerankConfig, Option<Scripted>) {
    let mut inner = s.lock();
    inner.stats.rerank_requests += 1;
    let config = &mut inner.rerank;
    let scripted = if !config.fail_next.is_empty() {
        Some(Scripted::Status(config.fail_next.remove(0)))
    } else if config.hang_next > 0 {
        config.hang_next -= 1;
        Some(Scripted::Hang)
    } else {
        None
    };
    let config = config.clone();
    if scripted.is_some() {
        inner.stats.faults += 1;
    }
    (config, scripted)
}

/// One rerank call: scripted answers, key, faults, validation, the request window, then the ranking.
async fn rerank(s: Shared, protocol: Protocol, headers: HeaderMap, body: Bytes) -> Response {
    let (config, scripted) = take(&s);
    tokio::time::sleep(config.latency.sample()).await;
    match scripted {
        Some(Scripted::Status(status)) => return scripted_status(protocol, status, &config),
        Some(Scripted::Hang) => return hang(config.faults.hang_ms).await,
        None => {}
    }
    let key = request_key(&headers, false);
    let accepted = !config.key_revoked
        && (config.keys.is_empty() || key.as_ref().is_some_and(|k| config.keys.contains(k)));
    if !accepted {
        return error(protocol, StatusCode::UNAUTHORIZED, "invalid api token");
    }
    if let Some(fault) = roll(&config.faults) {
        s.lock().stats.faults += 1;
        return match fault {
            Fault::ServerError => error(
                protocol,
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal server error",
            ),
            Fault::Timeout(d) => hang(d.as_millis() as u64).await,
            Fault::Malformed => (
                StatusCode::OK,
                [("content-type", "application/json")],
                "{\"results\": [{\"index\": 0, ",
            )
                .into_response(),
            Fault::Reset => cut_connection(),
            Fault::Quota => error(
                protocol,
                StatusCode::PAYMENT_REQUIRED,
                "insufficient balance",
            ),
        };
    }
    let request = match validate(protocol, &body) {
        Ok(r) => r,
        Err(refusal) => return *refusal,
    };
    if config.max_documents > 0 && request.documents.len() > config.max_documents {
        return error(
            protocol,
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "batch size {} > maximum allowed batch size {}",
                request.documents.len(),
                config.max_documents
            ),
        );
    }
    if let Some(wait) = admit(&s, &config, key.unwrap_or_default()) {
        let mut resp = error(
            protocol,
            StatusCode::TOO_MANY_REQUESTS,
            "You are past the rate limit of your key; try again later.",
        );
        resp.headers_mut()
            .insert("retry-after", HeaderValue::from(wait));
        return resp;
    }
    s.lock().stats.reranked_documents += request.documents.len() as u64;
    answer(protocol, &request)
}

fn scripted_status(protocol: Protocol, status: u16, config: &RerankConfig) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = status.canonical_reason().unwrap_or("scripted failure");
    let mut resp = error(protocol, status, message);
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert("retry-after", HeaderValue::from(config.retry_after_s));
    }
    resp
}

async fn hang(ms: u64) -> Response {
    tokio::time::sleep(std::time::Duration::from_millis(ms.max(1))).await;
    StatusCode::GATEWAY_TIMEOUT.into_response()
}

/// Admits a request of `key` within the window; `Some(seconds)` to wait when it is full.
fn admit(s: &Shared, config: &RerankConfig, key: String) -> Option<u64> {
    let w = config.requests?;
    let now = Instant::now();
    let span = std::time::Duration::from_millis(w.window_ms);
    let mut inner = s.lock();
    let inner = &mut *inner;
    let q = inner.rerank_windows.entry(key).or_default();
    while q.front().is_some_and(|t| now.duration_since(*t) >= span) {
        q.pop_front();
    }
    if q.len() as u64 >= w.limit {
        inner.stats.rate_limited += 1;
        let reset = q
            .front()
            .map_or(span, |t| span.saturating_sub(now.duration_since(*t)));
        return Some(reset.as_secs_f64().ceil().max(1.0) as u64);
    }
    q.push_back(now);
    None
}

/// The ranking in the protocol's shape: best first, the `top_n` best (TEI: all).
fn answer(protocol: Protocol, request: &Request) -> Response {
    let docs: Vec<&str> = request.documents.iter().map(String::as_str).collect();
    let mut order = ranking(&request.query, &docs);
    if protocol != Protocol::Tei {
        order.truncate(request.top_n.unwrap_or(docs.len()));
    }
    let items = order.into_iter().map(|i| {
        let relevance = score(&request.query, docs[i]);
        match protocol {
            Protocol::Tei if request.return_documents => {
                json!({ "index": i, "score": relevance, "text": docs[i] })
            }
            Protocol::Tei => json!({ "index": i, "score": relevance }),
            _ if request.return_documents => {
                json!({ "index": i, "relevance_score": relevance, "document": { "text": docs[i] } })
            }
            _ => json!({ "index": i, "relevance_score": relevance }),
        }
    });
    let results: Vec<Value> = items.collect();
    let tokens: usize = docs
        .iter()
        .map(|d| d.split_whitespace().count())
        .sum::<usize>()
        + request.query.split_whitespace().count();
    let body = match protocol {
        Protocol::Cohere => json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "results": results,
            "meta": { "api_version": { "version": "2" }, "billed_units": { "search_units": 1 } },
        }),
        // Jina's answer, with the fields Cohere's v1 answer adds (the official clients of both read it).
        Protocol::Jina => json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "model": "fake-reranker",
            "usage": { "total_tokens": tokens },
            "results": results,
            "meta": { "api_version": { "version": "1" }, "billed_units": { "search_units": 1 } },
        }),
        Protocol::Tei => Value::Array(results),
    };
    Json(body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_score_the_share_of_the_query_words_they_hold() {
        assert_eq!(
            score("Harbour pilot ladder", "the PILOT climbs the ladder"),
            2.0 / 3.0
        );
        assert_eq!(score("", "anything"), 0.0);
        assert_eq!(
            ranking(
                "pilot ladder",
                &["no match", "pilot", "pilot ladder", "ladder"]
            ),
            [2, 1, 3, 0]
        );
    }

    #[test]
    fn each_protocol_reads_its_own_request_shape() {
        let cohere = validate(
            Protocol::Cohere,
            br#"{"model": "m", "query": "q", "documents": ["a"], "top_n": 1}"#,
        );
        assert!(cohere.is_ok());
        let tei = validate(
            Protocol::Tei,
            br#"{"query": "q", "texts": ["a", "b"], "truncate": true}"#,
        )
        .ok()
        .unwrap();
        assert_eq!(tei.documents, ["a", "b"]);
        let jina = validate(
            Protocol::Jina,
            br#"{"model": "m", "query": "q", "documents": [{"text": "a"}]}"#,
        )
        .ok()
        .unwrap();
        assert!(jina.return_documents);
        for (protocol, body) in [
            (Protocol::Cohere, r#"{"query": "q", "documents": ["a"]}"#),
            (
                Protocol::Cohere,
                r#"{"model": "m", "query": "q", "documents": []}"#,
            ),
            (Protocol::Tei, r#"{"query": "q", "documents": ["a"]}"#),
            (
                Protocol::Jina,
                r#"{"model": "m", "query": "q", "documents": ["a"], "top_n": 0}"#,
            ),
        ] {
            let refused = validate(protocol, body.as_bytes()).err().expect(body);
            assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{body}");
        }
    }
}
