//! The pipeline's stages, their queues, and the jobs those queues carry.
//!
//! Each stage has one queue named after it: `parse` ([`parse`]), `chunk` ([`chunk`]) and `embed` ([`embed`])
//! carry the document pipeline; `synthetic` ([`synthetic`]) carries simulated work with failures injected on
//! request, for load tests of a deployment and the fleet's own tests. A worker runs the stages it is given.
//!
//! The stage files hold the control flow only. Their state machines are types ([`Stage`], [`JobState`] and
//! [`DocumentStatus`](crate::documents::DocumentStatus)); the SQL that moves them, every transition a
//! compare-and-set, is in `store`; the SQL of what they read and write (sections, chunks, vectors, caches) is in
//! `content`; what every stage shares (payloads, errors, settling a failed attempt) is in [`pipeline`].

pub mod chunk;
mod content;
pub mod embed;
pub mod parse;
pub mod pipeline;
mod state;
pub(crate) mod store;
pub mod synthetic;

pub use pipeline::{EmbedJob, Pipeline, StageJob};
pub use state::{JobState, Stage, UnknownStage};

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
