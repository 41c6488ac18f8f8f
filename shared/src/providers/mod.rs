//! Providers behind traits: parsers turn uploads into Markdown sections, embedders turn text into vectors,
//! rerankers reorder a search's hits. Clients know nothing of the database or the queues; every failure is
//! classified once, here, as [`ProviderError`].

pub mod hashing;
mod http;
pub mod llamaparse;
pub mod local;
pub mod openai;
pub mod rerank;

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use crate::{
    parsing::{DocKind, Section},
    quota::Quota,
    settings::{EmbedderKind, ParserKind, Settings},
};

pub use http::retry_after;
pub use rerank::{Ranked, RerankFuture, Reranker};

#[allow(missing_docs)]
pub type EmbedFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Vec<f32>>, ProviderError>> + Send + 'a>>;

/// What [`Embedder::embed_keeping`] returns.
pub type KeepingFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Vec<f32>>, PartialEmbedding>> + Send + 'a>>;

/// A call that failed part-way: the vectors of the inputs it had already (the first `done.len()`, in order,
/// each paid for), and why it stopped.
#[derive(Debug)]
pub struct PartialEmbedding {
    /// Vectors of a prefix of the inputs.
    pub done: Vec<Vec<f32>>,
    /// Why the rest has none.
    pub error: ProviderError,
}

#[allow(missing_docs)]
pub type ParseFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Section>, ProviderError>> + Send + 'a>>;

/// Turns texts into vectors of [`Embedder::dimensions`], one per text, in order.
pub trait Embedder: Send + Sync {
    /// The model name stored with the vectors.
    fn model(&self) -> &str;
    #[allow(missing_docs)]
    fn dimensions(&self) -> usize;
    /// Whether vectors are worth keeping in the embedding cache (a paid call or a model run; not hashing).
    fn cacheable(&self) -> bool {
        true
    }
    #[allow(missing_docs)]
    fn embed<'a>(&'a self, texts: &'a [String]) -> EmbedFuture<'a>;
    /// Like [`Embedder::embed`], but a call sent as several requests that fails part-way returns the vectors its
    /// earlier requests got, so that its caller can keep what was paid for. An embedder that sends one request
    /// (or computes locally) has none to give.
    fn embed_keeping<'a>(&'a self, texts: &'a [String]) -> KeepingFuture<'a> {
        Box::pin(async move {
            self.embed(texts).await.map_err(|error| PartialEmbedding {
                done: Vec::new(),
                error,
            })
        })
    }
}

/// An upload to parse.
#[derive(Debug, Clone)]
pub struct ParseInput {
    /// The file name given at upload (for messages and for providers that look at extensions).
    pub filename: String,
    /// What the upload was detected as.
    pub kind: DocKind,
    #[allow(missing_docs)]
    pub bytes: Arc<Vec<u8>>,
}

/// Turns an upload into Markdown sections (one per page where the format has pages).
pub trait Parser: Send + Sync {
    /// Names the parser and every setting that changes its output for `kind`: the parse cache key, and what
    /// `document_parsed.parser` records.
    fn key(&self, kind: DocKind) -> String;
    /// Whether results for `kind` are worth caching (a remote, paid call).
    fn cacheable(&self, kind: DocKind) -> bool;
    #[allow(missing_docs)]
    fn parse<'a>(&'a self, input: &'a ParseInput) -> ParseFuture<'a>;
}

/// Why a provider call failed, classified once where it happened.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[allow(missing_docs)] // The variants' fields: which provider, its message, when to try again.
pub enum ProviderError {
    /// The provider asked us to slow down (429 rate limit); retry after the time it named, if any.
    #[error("rate limited by {provider}: {message}")]
    RateLimited {
        provider: &'static str,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The account is out of quota or credit: retrying never helps until someone pays, so the stage waits.
    #[error("{provider}'s quota is exhausted: {message}")]
    QuotaExhausted {
        provider: &'static str,
        message: String,
    },
    /// The provider refused our key (401/403: revoked, rotated, of another region or project). Not the
    /// document's fault and not for good: the provider is paused fleet-wide and the stage waits until a probe call
    /// finds the key working again or an operator resumes it.
    #[error("{provider} refused our key: {message}")]
    Unauthorized {
        provider: &'static str,
        message: String,
    },
    /// A timeout, connection failure, malformed answer or server error: worth retrying.
    #[error("{provider} failed: {message}")]
    Transient {
        provider: &'static str,
        message: String,
    },
    /// The fleet's budget for this provider is spoken for longer than `quota.max_wait`: the job waits in the
    /// queue instead of a worker slot, without spending an attempt.
    #[error("{provider}'s budget is in use; next slot in {} ms", retry_after.as_millis())]
    Throttled {
        provider: &'static str,
        /// When a slot frees up.
        retry_after: Duration,
    },
    /// The request or the document itself is refused (unsupported file, bad request, failed parse job):
    /// retrying sends the same thing again.
    #[error("{message}")]
    Permanent {
        provider: &'static str,
        /// A reason a user can read.
        message: String,
    },
}

impl ProviderError {
    /// Whether another attempt soon can succeed. Out of quota and a refused key are neither retryable nor
    /// permanent: the stage waits for the provider's pause to end.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. } | Self::Transient { .. } | Self::Throttled { .. }
        )
    }

    /// The delay the provider asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } => *retry_after,
            Self::Throttled { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The metric label of its kind.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::RateLimited { .. } => "rate_limited",
            Self::Throttled { .. } => "throttled",
            Self::QuotaExhausted { .. } => "quota",
            Self::Unauthorized { .. } => "unauthorized",
            Self::Transient { .. } => "transient",
            Self::Permanent { .. } => "permanent",
        }
    }

    pub(crate) fn transient(provider: &'static str, message: impl Into<String>) -> Self {
        Self::Transient {
            provider,
            message: message.into(),
        }
    }

    pub(crate) fn permanent(provider: &'static str, message: impl Into<String>) -> Self {
        Self::Permanent {
            provider,
            message: message.into(),
        }
    }
}

/// Records a provider call's outcome and duration.
pub(crate) fn observe<T>(
    provider: &'static str,
    operation: &'static str,
    started: std::time::Instant,
    result: &Result<T, ProviderError>,
) {
    let outcome = result.as_ref().err().map_or("ok", ProviderError::outcome);
    crate::metrics::provider_request(
        provider,
        operation,
        outcome,
        started.elapsed().as_secs_f64(),
    );
}

/// The (provider, operation) pairs whose requests a process running `parse` and/or `embed` reports, for the
/// metrics created at zero on start.
pub fn operations(
    settings: &Settings,
    parse: bool,
    embed: bool,
) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    if parse {
        // Plain text and Markdown are always parsed locally, LlamaParse or not.
        out.push(("local", "parse"));
        if settings.parsing.parser == ParserKind::Llamaparse {
            out.extend([
                ("llamaparse", "upload"),
                ("llamaparse", "poll"),
                ("llamaparse", "result"),
                ("llamaparse", "job"),
            ]);
        }
    }
    if embed {
        match settings.embedding.embedder {
            EmbedderKind::Openai => out.push(("openai", "embed")),
            EmbedderKind::Local => out.push(("local", "embed")),
            EmbedderKind::Hashing => {}
        }
    }
    out
}

/// Builds the configured embedder; with `quota`, remote calls take their share of the fleet's budget first.
pub fn embedder(
    settings: &Settings,
    quota: Option<&Quota>,
) -> Result<Arc<dyn Embedder>, ProviderError> {
    let e = &settings.embedding;
    Ok(match (e.embedder, quota) {
        (EmbedderKind::Hashing, _) => Arc::new(hashing::HashingEmbedder::new(
            &e.model,
            e.dimensions as usize,
        )),
        (EmbedderKind::Openai, Some(q)) => {
            Arc::new(openai::OpenAiEmbedder::with_quota(settings, q)?)
        }
        (EmbedderKind::Openai, None) => Arc::new(openai::OpenAiEmbedder::new(e)?),
        (EmbedderKind::Local, _) => Arc::new(local::LocalEmbedder::load(e)?),
    })
}

/// Builds the configured reranker, when there is one (`search.rerank.model` is set), and creates its series at
/// zero; with `quota`, its calls take their share of the fleet's budget first.
pub fn reranker(
    settings: &Settings,
    quota: Option<&Quota>,
) -> Result<Option<Arc<dyn Reranker>>, ProviderError> {
    let r = &settings.search.rerank;
    if !r.configured() {
        return Ok(None);
    }
    let client = match quota {
        Some(q) => rerank::HttpReranker::with_quota(r, q)?,
        None => rerank::HttpReranker::new(r)?,
    };
    crate::metrics::register_rerank(r.api_style.as_str());
    Ok(Some(Arc::new(client)))
}

/// Builds the configured parser; with `quota`, LlamaParse uploads take their share of the fleet's budget first.
pub fn parser(
    settings: &Settings,
    quota: Option<&Quota>,
) -> Result<Arc<dyn Parser>, ProviderError> {
    let local = local::LocalParser::new(&settings.pipeline);
    Ok(match (settings.parsing.parser, quota) {
        (ParserKind::Local, _) => Arc::new(local),
        (ParserKind::Llamaparse, Some(q)) => {
            Arc::new(llamaparse::LlamaParse::with_quota(settings, q)?)
        }
        (ParserKind::Llamaparse, None) => Arc::new(llamaparse::LlamaParse::new(
            &settings.parsing.llamaparse,
            settings.pipeline.max_pages,
            local,
        )?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_reports_the_operations_of_its_stages_and_providers() {
        let mut s = Settings::default();
        s.parsing.parser = ParserKind::Llamaparse;
        for (kind, embed) in [
            (EmbedderKind::Openai, vec![("openai", "embed")]),
            (EmbedderKind::Local, vec![("local", "embed")]),
            (EmbedderKind::Hashing, vec![]),
        ] {
            s.embedding.embedder = kind;
            assert_eq!(operations(&s, false, true), embed, "{kind:?}");
        }
        assert_eq!(operations(&s, true, false).len(), 5);
        s.parsing.parser = ParserKind::Local;
        assert_eq!(operations(&s, true, true), vec![("local", "parse")]);
    }

    #[test]
    fn a_reranker_is_built_only_when_a_model_is_named() {
        let mut s = Settings::default();
        assert!(reranker(&s, None).unwrap().is_none());
        s.search.rerank.model = "rerank-v3.5".into();
        s.search.rerank.api_style = crate::settings::RerankApi::Jina;
        let r = reranker(&s, None).unwrap().expect("a reranker");
        assert_eq!((r.provider(), r.model()), ("jina", "rerank-v3.5"));
    }

    #[test]
    fn a_budget_deferral_is_retryable_after_the_slot_it_names() {
        let e = ProviderError::Throttled {
            provider: "openai",
            retry_after: Duration::from_millis(1500),
        };
        assert!(e.is_retryable());
        assert_eq!(e.retry_after(), Some(Duration::from_millis(1500)));
        assert_eq!(e.outcome(), "throttled");
        assert_eq!(
            e.to_string(),
            "openai's budget is in use; next slot in 1500 ms"
        );
        let refused = ProviderError::permanent("openai", "bad input");
        assert_eq!(
            (refused.retry_after(), refused.outcome()),
            (None, "permanent")
        );
    }

    #[test]
    fn a_refused_key_is_neither_retried_soon_nor_permanent() {
        let e = ProviderError::Unauthorized {
            provider: "openai",
            message: "HTTP 401 Unauthorized: Incorrect API key provided".into(),
        };
        assert!(!e.is_retryable());
        assert_eq!((e.retry_after(), e.outcome()), (None, "unauthorized"));
        assert!(crate::metrics::PROVIDER_OUTCOMES.contains(&e.outcome()));
        assert_eq!(
            e.to_string(),
            "openai refused our key: HTTP 401 Unauthorized: Incorrect API key provided"
        );
    }

    #[test]
    fn the_configured_embedder_is_built_without_a_quota_too() {
        let mut s = Settings::default();
        s.embedding.embedder = EmbedderKind::Openai;
        s.embedding.model = "text-embedding-3-small".into();
        let e = embedder(&s, None).unwrap();
        assert_eq!((e.model(), e.cacheable()), ("text-embedding-3-small", true));
        s.embedding.embedder = EmbedderKind::Hashing;
        let e = embedder(&s, None).unwrap();
        assert_eq!(
            (e.dimensions(), e.cacheable()),
            (s.embedding.dimensions as usize, false)
        );
    }
}
