//! A durable job queue on Redis Streams, plugged into apalis as a [`Backend`](apalis_core::backend::Backend).
//!
//! One queue is four Redis keys under `{prefix}:{<name>}:` (the braces keep a queue's keys in one cluster slot):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `stream` | stream + consumer group `workers` | jobs waiting (after the group's last-delivered id) and jobs in flight (its pending entries list) |
//! | `delayed` | sorted set | envelopes of failed attempts, scored by the time (Redis clock, ms) they are due again |
//! | `dead` | stream, capped | dead letters: payload, attempts and last error |
//! | `live` | set | the ids of the jobs that are waiting, in flight or delayed |
//! | `again` | hash | payloads of live jobs that must run once more when their live copy ends ([`Queue::push_again`]) |
//!
//! Delivery is at-least-once:
//! - workers read with `XREADGROUP ... BLOCK`, so an idle worker wakes the moment a job is pushed;
//! - while a job runs its worker keeps its claim fresh (`XCLAIM ... JUSTID`, which does not count a delivery), so a
//!   job that runs for ten times `reclaim_after` is never handed to a second worker;
//! - a killed worker's claims go stale; any replica takes them over with `XAUTOCLAIM` after `reclaim_after / 2` of
//!   idleness, checking every `reclaim_after / 4`, so the job runs again within `reclaim_after`;
//! - the acknowledgement (`XACK` + `XDEL`, batched) happens after the handler returns, so acknowledged entries leave
//!   Redis at once and its memory stays bounded;
//! - every run counts as an attempt (`a` in the envelope plus the stream's delivery count), so a job that keeps
//!   crashing its process is dead-lettered after `max_deliveries` like one that keeps failing;
//! - a push is deduplicated by job id in the same atomic step as the `XADD`: a job whose id is still waiting, in
//!   flight or delayed (`live`) is not added again, so re-pushing (the reconciler, a redelivered stage, a retry
//!   request) never duplicates live work. The id leaves `live` when its job is acknowledged or dead-lettered;
//! - a handler can tell when its claim was taken over ([`Delivery::claim_lost`]), so it stops before it calls a
//!   paid provider again.
//!
//! Failed attempts go to the `delayed` set with exponential backoff and jitter (or the delay the handler asked
//! for), and any worker's promoter moves them back into the stream when due. Permanent errors, payloads that do
//! not decode and jobs out of attempts go to the dead letters, which can be listed, replayed and purged.
//!
//! Where things live: the producer side is [`Broker`] (`broker.rs`), [`QueueHandle`] (`handle.rs`) and
//! [`Queue`] (`typed.rs`), with `stats.rs` and `dead_letters.rs` for inspection and repair. The consumer side is
//! [`Consumer`] and its shared state (`consumer.rs`), the apalis [`StreamBackend`] (`backend.rs`), its fetch
//! loop (`fetch.rs`), the [`AckLayer`] middleware (`ack.rs`) that records each job's end (`outcome.rs`), and the
//! background tasks (`tasks.rs`). `envelope.rs` owns the wire format of a job, `scripts.rs` the Lua scripts.

mod ack;
mod backend;
mod broker;
mod consumer;
mod dead_letters;
mod delivery;
mod envelope;
mod error;
mod fetch;
mod handle;
mod outcome;
mod scripts;
mod stats;
mod tasks;
mod typed;

use std::time::{SystemTime, UNIX_EPOCH};

pub use ack::{AckLayer, AckService};
pub use backend::StreamBackend;
pub use broker::Broker;
pub use consumer::{Consumer, ConsumerHandle};
pub use dead_letters::DeadLetter;
pub use delivery::{Claim, Delivery, current_claim_lost};
pub use error::{JobError, QueueError};
pub use handle::QueueHandle;
pub use stats::QueueStats;
pub use typed::Queue;

/// The consumer group every worker of a queue joins.
pub const GROUP: &str = "workers";

/// How many entries one script call or pipeline handles at most, so no Redis call grows with the backlog.
const BATCH: usize = 1000;

/// A job id: time-ordered (ms since the epoch) with 64 random bits, so ids sort by creation.
pub fn new_job_id() -> String {
    format!("{:012x}{:016x}", now_ms(), rand::random::<u64>())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The time part of a stream entry id (`<ms>-<seq>`).
pub(crate) fn entry_time_ms(id: &str) -> u64 {
    id.split('-')
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0)
}
