//! The three `/rerank` protocols on the wire: the request bodies, the answers (read tolerantly, checked strictly:
//! every index in range, none twice, finite scores, as many results as asked for), and what a refusal means.

use reqwest::{StatusCode, header::HeaderMap};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Ranked;
use crate::{
    providers::{ProviderError, http},
    settings::RerankApi,
};

/// The path of the protocol's endpoint below `base_url`.
pub(super) fn path(api: RerankApi) -> &'static str {
    match api {
        RerankApi::Cohere => "/v2/rerank",
        RerankApi::Jina => "/v1/rerank",
        RerankApi::Tei => "/rerank",
    }
}

/// The request asking for the `top_n` best of `documents`. TEI serves one model, answers every document, and
/// truncates long ones only when asked; Jina returns the documents' text unless told not to.
pub(super) fn body(
    api: RerankApi,
    model: &str,
    query: &str,
    documents: &[String],
    top_n: usize,
) -> Value {
    match api {
        RerankApi::Cohere => {
            json!({ "model": model, "query": query, "documents": documents, "top_n": top_n })
        }
        RerankApi::Jina => json!({
            "model": model, "query": query, "documents": documents, "top_n": top_n, "return_documents": false,
        }),
        RerankApi::Tei => json!({
            "query": query, "texts": documents, "truncate": true, "raw_scores": false, "return_text": false,
        }),
    }
}

/// A result as Cohere and Jina (`relevance_score`) or TEI (`score`) write it.
#[derive(Deserialize)]
struct Item {
    index: i64,
    #[serde(alias = "score")]
    relevance_score: f64,
}

/// Cohere and Jina wrap the results (`{"results": [...], ...}`); TEI answers the bare list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Answer {
    Wrapped { results: Vec<Item> },
    Bare(Vec<Item>),
}

/// The ranking in an answer to a request of `documents` documents asking for the `top_n` best: best first (ties
/// in the order answered), at most `top_n`.
pub(super) fn decode(
    api: RerankApi,
    text: &str,
    documents: usize,
    top_n: usize,
) -> Result<Vec<Ranked>, ProviderError> {
    let provider = api.as_str();
    let items = match serde_json::from_str::<Answer>(text) {
        Ok(Answer::Wrapped { results } | Answer::Bare(results)) => results,
        Err(e) => {
            return Err(ProviderError::transient(
                provider,
                format!("unreadable rerank answer: {e}"),
            ));
        }
    };
    let invalid = |what: String| {
        ProviderError::permanent(
            provider,
            format!("{provider} answered an invalid ranking: {what}"),
        )
    };
    let expected = top_n.min(documents);
    if items.len() < expected || items.len() > documents {
        return Err(invalid(format!(
            "{} results for the best {expected} of {documents} documents",
            items.len()
        )));
    }
    let mut seen = vec![false; documents];
    let mut ranked = Vec::with_capacity(items.len());
    for item in items {
        let index = usize::try_from(item.index)
            .ok()
            .filter(|i| *i < documents)
            .ok_or_else(|| invalid(format!("index {} of {documents} documents", item.index)))?;
        if std::mem::replace(&mut seen[index], true) {
            return Err(invalid(format!("document {index} ranked twice")));
        }
        if !item.relevance_score.is_finite() {
            return Err(invalid(format!(
                "document {index} scored {}",
                item.relevance_score
            )));
        }
        ranked.push(Ranked {
            index,
            score: item.relevance_score,
        });
    }
    // Stable: ties keep the order they were answered in.
    ranked.sort_by(|a, b| b.score.total_cmp(&a.score));
    ranked.truncate(top_n);
    Ok(ranked)
}

/// What a refused request means for the next one.
pub(super) enum Failure {
    /// Give up with this error.
    Error(ProviderError),
    /// Too many documents in one request: at most this many next time.
    FewerDocuments(usize),
}

/// The message of an error body: Cohere's `{"message"}`, Jina's (FastAPI) `{"detail"}` (a string or a list of
/// `{"msg"}`), TEI's `{"error", "error_type"}`, or an OpenAI-style `{"error": {"message"}}`; else the body's start.
fn error_message(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let text = |v: &Value| -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("message").and_then(Value::as_str).map(str::to_owned),
            Value::Array(items) => Some(
                items
                    .iter()
                    .filter_map(|i| i.get("msg").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            _ => None,
        }
    };
    ["message", "detail", "error"]
        .iter()
        .find_map(|k| v.get(k).and_then(text).filter(|m| !m.is_empty()))
        .unwrap_or_else(|| body.chars().take(300).collect())
}

/// The smallest number in `message` below `current`: the limit a server names ("batch size 50 > maximum allowed
/// batch size 32").
fn named_limit(message: &str, current: usize) -> Option<usize> {
    message
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<usize>().ok())
        .filter(|n| (1..current).contains(n))
        .min()
}

/// What a refusal of a request of `documents` documents means: 429 a rate limit (its Retry-After) or, when it
/// says so, an exhausted quota; 402 an exhausted quota; 401, 403 and Cohere's 498 a refused key; 413, or a 400/422
/// about the batch size, fewer documents per request; timeouts, conflicts and 5xx transient; any other 4xx
/// permanent.
pub(super) fn classify(
    api: RerankApi,
    status: StatusCode,
    headers: &HeaderMap,
    body: &str,
    documents: usize,
) -> Failure {
    let provider = api.as_str();
    let message = error_message(body);
    let lower = message.to_ascii_lowercase();
    let out_of_quota = ["month", "credit", "balance", "insufficient", "billing"]
        .iter()
        .any(|w| lower.contains(w));
    let error = match status.as_u16() {
        429 if out_of_quota => ProviderError::QuotaExhausted { provider, message },
        429 => http::rate_limited(provider, headers, message),
        402 => ProviderError::QuotaExhausted { provider, message },
        401 | 403 | 498 => {
            tracing::warn!(provider, status = status.as_u16(), %message, "The reranker refused our key: check search.rerank.api_key");
            ProviderError::Unauthorized {
                provider,
                message: format!("HTTP {status}: {message}"),
            }
        }
        413 | 400 | 422
            if documents > 1
                && (status == StatusCode::PAYLOAD_TOO_LARGE || lower.contains("batch size")) =>
        {
            return Failure::FewerDocuments(
                named_limit(&message, documents).unwrap_or(documents / 2),
            );
        }
        408 | 409 | 424 | 425 | 500..=599 => {
            ProviderError::transient(provider, format!("HTTP {status}: {message}"))
        }
        _ => ProviderError::permanent(provider, format!("HTTP {status}: {message}")),
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
            Failure::FewerDocuments(n) => panic!("expected an error, got fewer documents ({n})"),
        }
    }

    #[test]
    fn each_protocol_is_asked_in_its_own_shape() {
        let docs = ["a".to_owned(), "b".to_owned()];
        let cohere = body(RerankApi::Cohere, "rerank-v3.5", "q", &docs, 1);
        assert_eq!(
            cohere,
            json!({"model": "rerank-v3.5", "query": "q", "documents": ["a", "b"], "top_n": 1})
        );
        let jina = body(RerankApi::Jina, "jina-reranker-v2", "q", &docs, 2);
        assert_eq!(jina["return_documents"], false);
        assert_eq!(jina["documents"], json!(["a", "b"]));
        let tei = body(RerankApi::Tei, "bge", "q", &docs, 1);
        assert_eq!(tei["texts"], json!(["a", "b"]));
        assert!(tei.get("model").is_none() && tei.get("top_n").is_none());
        assert_eq!(
            [RerankApi::Cohere, RerankApi::Jina, RerankApi::Tei].map(path),
            ["/v2/rerank", "/v1/rerank", "/rerank"]
        );
    }

    #[test]
    fn answers_are_read_best_first_in_every_shape() {
        let cohere = r#"{"id": "x", "results": [{"index": 2, "relevance_score": 0.9}, {"index": 0, "relevance_score": 0.2}], "meta": {"billed_units": {"search_units": 1}}}"#;
        let ranked = decode(RerankApi::Cohere, cohere, 3, 2).unwrap();
        assert_eq!(
            ranked
                .iter()
                .map(|r| (r.index, r.score))
                .collect::<Vec<_>>(),
            [(2, 0.9), (0, 0.2)]
        );
        let jina = r#"{"model": "m", "usage": {"total_tokens": 12}, "results": [{"index": 1, "relevance_score": 0.5, "document": {"text": "b"}}]}"#;
        assert_eq!(decode(RerankApi::Jina, jina, 2, 1).unwrap()[0].index, 1);
        // TEI answers every document, in any order; the best top_n are kept.
        let tei = r#"[{"index": 0, "score": 0.1}, {"index": 2, "score": 0.7}, {"index": 1, "score": 0.7}]"#;
        let ranked = decode(RerankApi::Tei, tei, 3, 2).unwrap();
        assert_eq!(ranked.iter().map(|r| r.index).collect::<Vec<_>>(), [2, 1]);
    }

    #[test]
    fn an_invalid_ranking_is_a_permanent_error_that_says_what_is_wrong() {
        for (answer, says) in [
            (
                r#"[{"index": 3, "score": 0.1}, {"index": 0, "score": 0.2}]"#,
                "index 3 of 3",
            ),
            (
                r#"[{"index": -1, "score": 0.1}, {"index": 0, "score": 0.2}]"#,
                "index -1",
            ),
            (
                r#"[{"index": 1, "score": 0.1}, {"index": 1, "score": 0.2}]"#,
                "document 1 ranked twice",
            ),
            (
                r#"[{"index": 1, "score": 0.1}]"#,
                "1 results for the best 2 of 3",
            ),
        ] {
            let e = decode(RerankApi::Tei, answer, 3, 2).unwrap_err();
            assert!(!e.is_retryable(), "{e:?}");
            assert_eq!(e.outcome(), "permanent");
            assert!(e.to_string().contains(says), "{e} lacks {says}");
            assert!(
                e.to_string().contains("tei answered an invalid ranking"),
                "{e}"
            );
        }
        let cut = decode(RerankApi::Cohere, r#"{"results": [{"index": 0, "#, 1, 1).unwrap_err();
        assert!(cut.is_retryable(), "{cut:?}");
    }

    #[test]
    fn refusals_are_classified_as_the_embedder_classifies_them() {
        let h = HeaderMap::new();
        let api = RerankApi::Cohere;
        let mut retry = HeaderMap::new();
        retry.insert("retry-after", "3".parse().unwrap());
        let e = error(classify(
            api,
            StatusCode::TOO_MANY_REQUESTS,
            &retry,
            r#"{"message": "slow down"}"#,
            5,
        ));
        assert_eq!(
            (e.outcome(), e.retry_after()),
            ("rate_limited", Some(Duration::from_secs(3)))
        );
        let trial = r#"{"message": "You are using a Trial key, which is limited to 1000 API calls / month."}"#;
        let e = error(classify(api, StatusCode::TOO_MANY_REQUESTS, &h, trial, 5));
        assert_eq!(e.outcome(), "quota");
        for status in [401, 403, 498] {
            let status = StatusCode::from_u16(status).unwrap();
            let e = error(classify(
                api,
                status,
                &h,
                r#"{"message": "invalid api token"}"#,
                5,
            ));
            assert!(
                matches!(&e, ProviderError::Unauthorized { message, .. } if message.contains("invalid api token")),
                "{e:?}"
            );
        }
        let jina = r#"{"detail": [{"loc": ["body", "model"], "msg": "field required"}]}"#;
        let e = error(classify(
            RerankApi::Jina,
            StatusCode::UNPROCESSABLE_ENTITY,
            &h,
            jina,
            5,
        ));
        assert_eq!(
            e,
            ProviderError::permanent("jina", "HTTP 422 Unprocessable Entity: field required")
        );
        let tei = r#"{"error": "Model is overloaded", "error_type": "overloaded"}"#;
        let e = error(classify(
            RerankApi::Tei,
            StatusCode::SERVICE_UNAVAILABLE,
            &h,
            tei,
            5,
        ));
        assert_eq!(
            e,
            ProviderError::transient("tei", "HTTP 503 Service Unavailable: Model is overloaded")
        );
        assert!(
            error(classify(
                api,
                StatusCode::INTERNAL_SERVER_ERROR,
                &h,
                "oops",
                5
            ))
            .is_retryable()
        );
        assert!(
            !error(classify(api, StatusCode::NOT_FOUND, &h, "no such model", 5)).is_retryable()
        );
    }

    #[test]
    fn too_many_documents_name_the_smaller_batch() {
        let h = HeaderMap::new();
        let tei = r#"{"error": "batch size 50 > maximum allowed batch size 32", "error_type": "validation"}"#;
        for status in [
            StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::UNPROCESSABLE_ENTITY,
        ] {
            assert!(matches!(
                classify(RerankApi::Tei, status, &h, tei, 50),
                Failure::FewerDocuments(32)
            ));
        }
        assert!(matches!(
            classify(RerankApi::Cohere, StatusCode::PAYLOAD_TOO_LARGE, &h, "", 40),
            Failure::FewerDocuments(20)
        ));
        // One document too many is not something fewer documents fixes.
        assert!(matches!(
            classify(RerankApi::Tei, StatusCode::PAYLOAD_TOO_LARGE, &h, tei, 1),
            Failure::Error(ProviderError::Permanent { .. })
        ));
    }
}
