//! `[chunking]`: how parsed documents are cut into chunks.

use serde::{Deserialize, Serialize};

use super::{SettingsError, ensure};

/// How parsed documents are cut into chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkingSettings {
    /// Largest chunk, in tokens (cl100k_base).
    pub max_tokens: usize,
    /// Tokens repeated from the end of one chunk at the start of the next.
    pub overlap_tokens: usize,
    /// Most chunks one document may have; more fails the document.
    pub max_chunks: usize,
}

impl ChunkingSettings {
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        ensure(
            self.max_tokens >= 16,
            "chunking.max_tokens",
            "must be at least 16",
        )?;
        ensure(
            self.overlap_tokens < self.max_tokens,
            "chunking.overlap_tokens",
            "must be below chunking.max_tokens",
        )?;
        ensure(
            self.max_chunks > 0,
            "chunking.max_chunks",
            "must be above 0",
        )
    }
}
