//! The two state machines of the document stages, as types: a [`Stage`] of the pipeline and the [`JobState`] of its
//! `upload_jobs` row. Both are stored as text, in the exact strings of the CHECK constraints of
//! `migrations/20261124000001_schema.sql`; the document's own status is [`DocumentStatus`].

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::documents::DocumentStatus;

/// A stage of the pipeline; each has its own queue and scales on its own. Stored as `upload_jobs.stage`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type,
)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum Stage {
    /// Uploaded bytes to Markdown.
    Parse,
    /// Markdown to token-bounded chunks.
    Chunk,
    /// Chunks to vectors.
    Embed,
    /// Simulated work, for load tests (not part of the document pipeline: never stored).
    Synthetic,
}

impl Stage {
    /// The document pipeline's stages, in order.
    pub const PIPELINE: [Stage; 3] = [Stage::Parse, Stage::Chunk, Stage::Embed];
    /// Every stage.
    pub const ALL: [Stage; 4] = [Stage::Parse, Stage::Chunk, Stage::Embed, Stage::Synthetic];

    /// The name of the stage and of its queue.
    pub const fn as_str(self) -> &'static str {
        match self {
            Stage::Parse => "parse",
            Stage::Chunk => "chunk",
            Stage::Embed => "embed",
            Stage::Synthetic => "synthetic",
        }
    }

    /// The document's status while this stage is due or running (`parsing`, `chunking`, `embedding`); synthetic
    /// work has no document.
    pub const fn document_status(self) -> Option<DocumentStatus> {
        match self {
            Stage::Parse => Some(DocumentStatus::Parsing),
            Stage::Chunk => Some(DocumentStatus::Chunking),
            Stage::Embed => Some(DocumentStatus::Embedding),
            Stage::Synthetic => None,
        }
    }

    /// The document statuses from which this stage may start: its own, and `queued` for the first stage.
    /// A `ready` or `failed` document is never moved by a stage (only a retry request re-opens a failure).
    pub const fn startable_from(self) -> &'static [DocumentStatus] {
        match self {
            Stage::Parse => &[DocumentStatus::Queued, DocumentStatus::Parsing],
            Stage::Chunk => &[DocumentStatus::Chunking],
            Stage::Embed => &[DocumentStatus::Embedding],
            Stage::Synthetic => &[],
        }
    }

    /// The stage after this one in the document pipeline.
    pub const fn next(self) -> Option<Stage> {
        match self {
            Stage::Parse => Some(Stage::Chunk),
            Stage::Chunk => Some(Stage::Embed),
            Stage::Embed | Stage::Synthetic => None,
        }
    }

    /// This stage's concurrency per worker process, from the settings.
    pub fn concurrency(self, settings: &crate::settings::StageConcurrency) -> usize {
        match self {
            Stage::Parse => settings.parse,
            Stage::Chunk => settings.chunk,
            Stage::Embed => settings.embed,
            Stage::Synthetic => settings.synthetic,
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stage name that is not one of `parse`, `chunk`, `embed`.
#[derive(Debug, thiserror::Error)]
#[error("unknown stage {0:?}: expected parse, chunk, embed or synthetic")]
pub struct UnknownStage(pub String);

impl FromStr for Stage {
    type Err = UnknownStage;
    fn from_str(s: &str) -> Result<Self, UnknownStage> {
        match s.trim() {
            "parse" => Ok(Stage::Parse),
            "chunk" => Ok(Stage::Chunk),
            "embed" => Ok(Stage::Embed),
            "synthetic" => Ok(Stage::Synthetic),
            other => Err(UnknownStage(other.to_owned())),
        }
    }
}

/// The state of one stage of one document (`upload_jobs.state`). `queued`, `running` and `failed` are unsettled
/// (the reconciler watches them, and a job may still move them); `done` and `dead` are settled, and only a retry
/// request re-opens a `dead` stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for its job (also while the provider's budget is spent).
    Queued,
    /// A job holds it.
    Running,
    /// Finished; the next stage is queued (or the document ready).
    Done,
    /// The last attempt failed; the queue will retry.
    Failed,
    /// Gave up; the document failed.
    Dead,
}

impl JobState {
    /// The stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Dead => "dead",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_parse_from_their_names_and_reject_others() {
        for stage in Stage::ALL {
            assert_eq!(stage.as_str().parse::<Stage>().unwrap(), stage);
        }
        let err = "ocr".parse::<Stage>().unwrap_err().to_string();
        assert!(
            err.contains("ocr") && err.contains("parse, chunk, embed or synthetic"),
            "{err}"
        );
    }

    #[test]
    fn names_are_the_stored_strings() {
        let stages: Vec<_> = Stage::PIPELINE.iter().map(|s| s.as_str()).collect();
        assert_eq!(stages, ["parse", "chunk", "embed"]);
        let states = [
            JobState::Queued,
            JobState::Running,
            JobState::Done,
            JobState::Failed,
            JobState::Dead,
        ];
        let states: Vec<_> = states.iter().map(|s| s.as_str()).collect();
        assert_eq!(states, ["queued", "running", "done", "failed", "dead"]);
        for state in ["queued", "running", "done", "failed", "dead"] {
            let json = serde_json::to_string(state).unwrap();
            let parsed: JobState = serde_json::from_str(&json).unwrap();
            assert_eq!(parsed.as_str(), state);
        }
        let statuses: Vec<_> = Stage::PIPELINE
            .iter()
            .filter_map(|s| s.document_status())
            .map(DocumentStatus::as_str)
            .collect();
        assert_eq!(statuses, ["parsing", "chunking", "embedding"]);
    }
}
