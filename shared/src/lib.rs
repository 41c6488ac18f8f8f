//! # upload-pipeline
//!
//! A durable job-queue worker fleet that turns uploaded documents into vector-searchable chunks.
//!
//! ```text
//!  service ──upload──▶ producer ──push──▶ [parse] ──▶ worker(parse) ──push──▶ [chunk] ──▶ worker(chunk)
//!                                         Redis                               Redis
//!                                 ──push──▶ [embed] ──▶ worker(embed) ──▶ Postgres + pgvector ◀── agents
//! ```
//!
//! This crate is the library both binaries stand on; `producer/` and `workers/` only wire it together.
//!
//! | module | owns |
//! |---|---|
//! | [`settings`] | one typed, validated `Settings`: defaults, then a TOML file, then the environment |
//! | [`telemetry`] | tracing subscriber and the Prometheus recorder |
//! | [`metrics`] | every metric name, help text and bucket |
//! | [`queue`] | the durable Redis Streams queue and its apalis backend: at-least-once delivery, retries, dead letters |
//! | [`runtime`] | the worker runtime: one apalis worker per stage, health, metrics, restarts, graceful drain |
//! | [`jobs`] | the stages, their queue names, and the jobs their queues carry |
//! | [`retry`] | failed documents: re-running one from the stage that gave up, and the failures by stage and reason |
//! | [`shutdown`] | the SIGTERM / SIGINT future |
//!
//! The transport ([`queue`]) knows nothing of documents: it moves typed jobs and guarantees that each is run
//! until it succeeds, fails permanently or runs out of attempts, even when workers are killed.

pub mod api;
pub mod auth;
pub mod chunking;
pub mod client;
pub mod db;
pub mod documents;
pub mod helper;
pub mod jobs;
pub mod metrics;
pub mod parsing;
pub mod providers;
pub mod queue;
pub mod quota;
pub mod ratelimit;
pub mod reconciler;
pub mod retry;
pub mod runtime;
pub mod settings;
pub mod shutdown;
pub mod telemetry;

pub use settings::Settings;
