//! The benchmark scenarios of `make bench` (the `bench` binary) and their reporting: each scenario measures
//! against real Postgres, Redis and processes, returns its figures, and `report` turns them into JSON, a Markdown
//! summary and PNG plots under `tests/bench-results/`.

pub mod backlog;
pub mod fleet;
pub mod pgcount;
pub mod pipeline;
pub mod plot;
pub mod report;
pub mod scale;
pub mod search;
pub mod stats;
