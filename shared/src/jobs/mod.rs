//! The pipeline's stages, their queues, and the jobs those queues carry.
//!
//! Each stage has one queue named after it: `parse` ([`parse`]), `chunk` ([`chunk`]) and `embed` ([`embed`])
//! carry the document pipeline; `synthetic` ([`synthetic`]) carries simulated work with failures injected on
//! request, for load tests of a deployment and the fleet's own tests. A worker runs the stages it is given.

pub mod chunk;
pub mod embed;
pub mod parse;
pub mod pipeline;
pub mod synthetic;

pub use pipeline::{EmbedJob, Pipeline, StageJob};

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// A stage of the pipeline; each has its own queue and scales on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Uploaded bytes to Markdown.
    Parse,
    /// Markdown to token-bounded chunks.
    Chunk,
    /// Chunks to vectors.
    Embed,
    /// Simulated work, for load tests (not part of the document pipeline).
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

    /// The document's status while this stage is due or running (`parsing`, `chunking`, `embedding`).
    pub const fn document_status(self) -> &'static str {
        match self {
            Stage::Parse => "parsing",
            Stage::Chunk => "chunking",
            Stage::Embed => "embedding",
            Stage::Synthetic => "synthetic",
        }
    }

    /// The document statuses from which this stage may start: its own, and `queued` for the first stage.
    /// A `ready` or `failed` document is never moved by a stage (only a retry request re-opens a failure).
    pub fn startable_from(self) -> &'static [&'static str] {
        match self {
            Stage::Parse => &["queued", "parsing"],
            Stage::Chunk => &["chunking"],
            Stage::Embed => &["embedding"],
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

/// Whether any of `stages` needs the database (the document stages do; synthetic does not).
pub fn needs_pipeline(stages: &[Stage]) -> bool {
    stages.iter().any(|s| *s != Stage::Synthetic)
}

/// Registers the handler of each stage in `stages` with the runtime; the document stages need `pipeline`.
pub fn register(
    runtime: crate::runtime::Runtime,
    stages: &[Stage],
    pipeline: Option<&Pipeline>,
) -> Result<crate::runtime::Runtime, crate::runtime::RuntimeError> {
    let mut rt = runtime;
    for &stage in stages {
        let concurrency = stage.concurrency(&rt.settings().worker.concurrency);
        let queue = stage.as_str();
        if stage == Stage::Synthetic {
            let ctx = synthetic::SyntheticContext::new(&rt);
            rt = rt.stage(queue, concurrency, move |job, delivery| {
                synthetic::run(ctx.clone(), job, delivery)
            })?;
            continue;
        }
        let p = pipeline
            .cloned()
            .ok_or(crate::runtime::RuntimeError::MissingPipeline(queue))?;
        rt = match stage {
            Stage::Parse => rt.stage(queue, concurrency, move |job, d| {
                parse::run(p.clone(), job, d)
            })?,
            Stage::Chunk => rt.stage(queue, concurrency, move |job, d| {
                chunk::run(p.clone(), job, d)
            })?,
            Stage::Embed => rt.stage(queue, concurrency, move |job, d| {
                embed::run(p.clone(), job, d)
            })?,
            Stage::Synthetic => unreachable!("handled above"),
        };
    }
    Ok(rt)
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
}
