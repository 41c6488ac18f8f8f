//! Rerankers: a cross-encoder scores each of a search's best fused hits against the query, and the hits are
//! reordered by that score. One client speaks the three common `/rerank` protocols (`search.rerank.api_style`):
//! Cohere (`/v2/rerank`), Jina AI (`/v1/rerank`) and Hugging Face text-embeddings-inference (`/rerank`), with a
//! bearer key.
//!
//! Failures are classified as the embedder's are ([`ProviderError`]): timeouts, connection failures, 5xx and
//! unreadable answers are transient, 429 is a rate limit with the time the provider named, 401/403 a refused key,
//! other 4xx permanent, and an answer that parses but ranks wrongly (an index out of range or twice, a non-finite
//! score, too few results) permanent. With the fleet's quota a call takes its share of `requests_per_minute`
//! first and waits at most `search.rerank.max_wait` for it; a 429 cools every replica down for its Retry-After, a
//! refused key pauses the provider fleet-wide until a probe call succeeds. The client never retries: a search
//! someone waits on answers in fused order instead (see the search handler).
//!
//! A server that refuses a request as too large (413, or TEI's "batch size 50 > maximum allowed batch size 32")
//! is sent smaller ones from then on, concurrently, and their rankings merged: a cross-encoder scores each
//! document on its own, so scores from different requests compare.

mod wire;

use std::{
    future::Future,
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use self::wire::Failure;
use super::{ProviderError, http};
use crate::{
    quota::{Budget, Quota, rerank_limits},
    settings::{RerankApi, RerankSettings},
};

/// Most rerank calls one process makes at once (the fleet budget's per-process concurrency ceiling, halved on
/// each 429).
const MAX_IN_FLIGHT: usize = 32;
/// Most times one call sends smaller requests before giving up.
const MAX_ADAPTATIONS: usize = 4;

/// One document's place in a ranking: its index among the documents sent, and the reranker's score (higher is
/// more relevant; Cohere, Jina and TEI by default answer 0 to 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked {
    /// Its index among the documents sent.
    pub index: usize,
    /// The reranker's relevance score.
    pub score: f64,
}

#[allow(missing_docs)]
pub type RerankFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Ranked>, ProviderError>> + Send + 'a>>;

/// Orders documents by their relevance to a query.
pub trait Reranker: Send + Sync {
    /// The provider's name: the `provider` label of its metrics, and of its budget and pause in the fleet's quota.
    fn provider(&self) -> &'static str;
    /// The model that scores.
    fn model(&self) -> &str;
    /// The `top_n` documents most relevant to `query`, best first.
    fn rerank<'a>(
        &'a self,
        query: &'a str,
        documents: &'a [String],
        top_n: usize,
    ) -> RerankFuture<'a>;
}

/// See the module documentation.
pub struct HttpReranker {
    http: reqwest::Client,
    api: RerankApi,
    url: String,
    api_key: String,
    model: String,
    /// Longest a whole call may take: the budget wait, and one request.
    deadline: Duration,
    /// Longest one request waits for its share of the budget (a concurrency slot, the fleet's requests, a 429's
    /// cool-down) before the search goes unreranked.
    max_wait: Duration,
    /// Most documents per request, learnt from refusals.
    max_documents: AtomicUsize,
    budget: Option<Budget>,
}

impl std::fmt::Debug for HttpReranker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpReranker")
            .field("url", &self.url)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl HttpReranker {
    /// A client of the configured reranker.
    pub fn new(settings: &RerankSettings) -> Result<Self, ProviderError> {
        let api = settings.api_style;
        let url = format!(
            "{}{}",
            settings.base_url.trim_end_matches('/'),
            wire::path(api)
        );
        Ok(Self {
            http: http::client(api.as_str(), settings.timeout)?,
            api,
            url,
            api_key: settings.api_key.expose().to_owned(),
            model: settings.model.clone(),
            deadline: settings.timeout + settings.max_wait,
            max_wait: settings.max_wait,
            max_documents: AtomicUsize::new(usize::MAX),
            budget: None,
        })
    }

    /// A client whose calls take their share of the fleet's budget for this model and key first, waiting at most
    /// `search.rerank.max_wait` for it.
    pub fn with_quota(settings: &RerankSettings, quota: &Quota) -> Result<Self, ProviderError> {
        let mut me = Self::new(settings)?;
        me.budget = Some(
            quota
                .budget_waiting(
                    settings.api_style.as_str(),
                    &settings.model,
                    settings.api_key.expose(),
                    rerank_limits(settings.requests_per_minute),
                    MAX_IN_FLIGHT,
                    settings.max_wait,
                )
                .with_request_timeout(settings.timeout),
        );
        Ok(me)
    }

    /// Most documents per request, as learnt so far.
    pub fn max_documents(&self) -> usize {
        self.max_documents.load(Ordering::Relaxed)
    }

    async fn rank(
        &self,
        query: &str,
        documents: &[String],
        top_n: usize,
    ) -> Result<Vec<Ranked>, ProviderError> {
        if documents.is_empty() || top_n == 0 {
            return Ok(Vec::new());
        }
        let mut adaptations = 0;
        loop {
            let per_request = self.max_documents().max(1);
            let parts = documents
                .chunks(per_request)
                .map(|part| async move { self.request(query, part, top_n.min(part.len())).await });
            let mut ranked = Vec::new();
            let mut smaller: Option<usize> = None;
            for (i, answer) in futures::future::join_all(parts)
                .await
                .into_iter()
                .enumerate()
            {
                match answer {
                    Ok(part) => ranked.extend(part.into_iter().map(|r| Ranked {
                        index: r.index + i * per_request,
                        ..r
                    })),
                    Err(Failure::Error(e)) => return Err(e),
                    Err(Failure::FewerDocuments(n)) => {
                        smaller = Some(smaller.map_or(n, |m| m.min(n)))
                    }
                }
            }
            let Some(limit) = smaller else {
                ranked.sort_by(|a, b| b.score.total_cmp(&a.score));
                ranked.truncate(top_n);
                return Ok(ranked);
            };
            adaptations += 1;
            let before = self
                .max_documents
                .fetch_min(limit.max(1), Ordering::Relaxed);
            tracing::warn!(
                provider = self.api.as_str(),
                before = before.min(documents.len()),
                after = limit.max(1),
                "The reranker refused a request as too large; sending fewer documents per request"
            );
            if per_request <= 1 {
                return Err(ProviderError::permanent(
                    self.api.as_str(),
                    "the reranker refuses even a request of one document as too large",
                ));
            }
            if adaptations > MAX_ADAPTATIONS {
                return Err(ProviderError::permanent(
                    self.api.as_str(),
                    format!(
                        "the reranker still refuses requests of {per_request} documents as too large after \
                         {MAX_ADAPTATIONS} smaller tries"
                    ),
                ));
            }
        }
    }

    /// One request: its share of the budget, the call, the budget settled and the call counted.
    async fn request(
        &self,
        query: &str,
        documents: &[String],
        top_n: usize,
    ) -> Result<Vec<Ranked>, Failure> {
        let permit = match &self.budget {
            // The whole wait is bounded, the process's concurrency slot included (after 429s it may be one).
            Some(budget) => Some(
                tokio::time::timeout(self.max_wait, budget.acquire(&[("requests", 1.0)]))
                    .await
                    .map_err(|_| {
                        Failure::Error(ProviderError::Throttled {
                            provider: self.api.as_str(),
                            retry_after: self.max_wait,
                        })
                    })?
                    .map_err(Failure::Error)?,
            ),
            None => None,
        };
        let started = Instant::now();
        let result = self.send(query, documents, top_n).await;
        if let (Some(budget), Some(permit)) = (&self.budget, permit) {
            match &result {
                Err(Failure::Error(e)) => budget.settle_error(permit, e).await,
                // Answered, or refused as too large: the request counted either way.
                _ => budget.settle(permit, &[], &[], 0).await,
            }
        }
        let outcome = match &result {
            Ok(_) => "ok",
            Err(Failure::Error(e)) => e.outcome(),
            Err(Failure::FewerDocuments(_)) => "too_large",
        };
        crate::metrics::provider_request(
            self.api.as_str(),
            "rerank",
            outcome,
            started.elapsed().as_secs_f64(),
        );
        result
    }

    async fn send(
        &self,
        query: &str,
        documents: &[String],
        top_n: usize,
    ) -> Result<Vec<Ranked>, Failure> {
        let provider = self.api.as_str();
        let body = wire::body(self.api, &self.model, query, documents, top_n);
        let mut req = self.http.post(&self.url).json(&body);
        if !self.api_key.is_empty() {
            req = req.bearer_auth(&self.api_key);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Failure::Error(http::send_error(provider, &self.url, &e)))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp
            .text()
            .await
            .map_err(|e| Failure::Error(http::send_error(provider, &self.url, &e)))?;
        if !status.is_success() {
            return Err(wire::classify(
                self.api,
                status,
                &headers,
                &text,
                documents.len(),
            ));
        }
        wire::decode(self.api, &text, documents.len(), top_n).map_err(Failure::Error)
    }
}

impl Reranker for HttpReranker {
    fn provider(&self) -> &'static str {
        self.api.as_str()
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn rerank<'a>(
        &'a self,
        query: &'a str,
        documents: &'a [String],
        top_n: usize,
    ) -> RerankFuture<'a> {
        Box::pin(async move {
            tokio::time::timeout(self.deadline, self.rank(query, documents, top_n))
                .await
                .unwrap_or_else(|_| {
                    Err(ProviderError::transient(
                        self.api.as_str(),
                        format!(
                            "no ranking within {:?} (search.rerank.timeout and max_wait)",
                            self.deadline
                        ),
                    ))
                })
        })
    }
}
