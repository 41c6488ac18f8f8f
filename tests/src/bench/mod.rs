//! The benchmark scenarios of `make bench` (the `bench` binary) and their reporting: each scenario measures
//! against real Postgres, Redis and processes, returns its figures, and `report` turns them into JSON, a Markdown
//! summary and PNG plots under `tests/bench-results/`. The reporting (`plot`, `report`) and the `bench` binary need
//! the `bench` feature, so test builds do not compile plotters.

pub mod backlog;
pub mod corpus;
pub mod fleet;
pub mod pgcount;
pub mod pipeline;
#[cfg(feature = "bench")]
pub mod plot;
pub mod quality;
#[cfg(feature = "bench")]
pub mod report;
pub mod scale;
pub mod search;
pub mod stats;
