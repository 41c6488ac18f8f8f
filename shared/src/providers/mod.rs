//! Providers behind traits: embedders turn text into vectors. Clients know nothing of the database or queues.

pub mod hashing;
pub mod openai;

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use crate::settings::{EmbeddingProvider, EmbeddingSettings};

/// A future an embedder returns.
pub type EmbedFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Vec<f32>>, EmbedError>> + Send + 'a>>;

/// Turns texts into vectors of [`Embedder::dimensions`], one per text, in order.
pub trait Embedder: Send + Sync {
    /// The model name stored with the vectors.
    fn model(&self) -> &str;
    /// Vector dimensions.
    fn dimensions(&self) -> usize;
    /// Embeds `texts`.
    fn embed<'a>(&'a self, texts: &'a [String]) -> EmbedFuture<'a>;
}

/// Why embedding failed, classified once where it happened.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EmbedError {
    /// The provider asked us to slow down (429 rate limit); retry after the time it named, if any.
    #[error("rate limited by the embedding provider: {message}")]
    RateLimited {
        /// The provider's message.
        message: String,
        /// When to try again.
        retry_after: Option<Duration>,
    },
    /// The account is out of quota or credit: retrying never helps until someone pays.
    #[error("the embedding provider's quota is exhausted: {0}")]
    QuotaExhausted(String),
    /// A timeout, connection failure or server error: worth retrying.
    #[error("the embedding provider failed: {0}")]
    Transient(String),
    /// The request itself is wrong (4xx, dimension mismatch): retrying sends the same wrong request.
    #[error("the embedding request was refused: {0}")]
    Permanent(String),
}

impl EmbedError {
    /// Whether another attempt can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::RateLimited { .. } | Self::Transient(_))
    }

    /// The delay the provider asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Builds the configured embedder.
pub fn embedder(settings: &EmbeddingSettings) -> Result<Arc<dyn Embedder>, EmbedError> {
    Ok(match settings.provider {
        EmbeddingProvider::Hashing => Arc::new(hashing::HashingEmbedder::new(
            &settings.model,
            settings.dimensions as usize,
        )),
        EmbeddingProvider::Openai => Arc::new(openai::OpenAiEmbedder::new(settings)?),
    })
}
