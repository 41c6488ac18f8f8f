//! The functional integration tests, one module per concern, in one binary (one link, one process). Tests that
//! measure time or rates are in `measured`, and the fleet run behind the process's metrics recorder in
//! `observability`.

mod bounded;
mod exactly_once;
mod hostile;
mod local_model;
mod pipeline;
mod providers;
mod queue;
mod retry;
mod search;
mod security;
mod tls;
