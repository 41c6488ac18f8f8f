//! The pipeline's stages, their queues, and the jobs those queues carry.
//!
//! Each stage has one queue named after it (`parse`, `chunk`, `embed`). Until the document stages land, each
//! stage queue carries [`synthetic::SyntheticJob`]s: simulated work with failures injected on request, which
//! exercises the fleet end to end (demo, tests, load tests).

pub mod synthetic;

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
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 3] = [Stage::Parse, Stage::Chunk, Stage::Embed];

    /// The name of the stage and of its queue.
    pub const fn as_str(self) -> &'static str {
        match self {
            Stage::Parse => "parse",
            Stage::Chunk => "chunk",
            Stage::Embed => "embed",
        }
    }

    /// This stage's concurrency per worker process, from the settings.
    pub fn concurrency(self, settings: &crate::settings::StageConcurrency) -> usize {
        match self {
            Stage::Parse => settings.parse,
            Stage::Chunk => settings.chunk,
            Stage::Embed => settings.embed,
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
#[error("unknown stage {0:?}: expected parse, chunk or embed")]
pub struct UnknownStage(pub String);

impl FromStr for Stage {
    type Err = UnknownStage;
    fn from_str(s: &str) -> Result<Self, UnknownStage> {
        match s.trim() {
            "parse" => Ok(Stage::Parse),
            "chunk" => Ok(Stage::Chunk),
            "embed" => Ok(Stage::Embed),
            other => Err(UnknownStage(other.to_owned())),
        }
    }
}

/// Registers the handler of each stage in `stages` with the runtime.
pub fn register(
    runtime: crate::runtime::Runtime,
    stages: &[Stage],
) -> Result<crate::runtime::Runtime, crate::runtime::RuntimeError> {
    let context = synthetic::SyntheticContext::new(&runtime);
    stages.iter().try_fold(runtime, |rt, &stage| {
        let ctx = context.clone();
        let concurrency = stage.concurrency(&rt.settings().worker.concurrency);
        rt.stage(stage.as_str(), concurrency, move |job, delivery| {
            synthetic::run(ctx.clone(), job, delivery)
        })
    })
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
            err.contains("ocr") && err.contains("parse, chunk or embed"),
            "{err}"
        );
    }
}
