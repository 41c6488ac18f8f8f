//! Synthetic jobs: simulated work with failures injected on request. They exercise the queue and the worker
//! runtime exactly like real stage jobs do (same backend, retries, dead letters, drain), which makes them the
//! tool for the demo, the fleet's integration tests and load tests of a deployment.

use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::queue::{Delivery, JobError};

/// One unit of simulated work.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticJob {
    /// The job's number in its batch.
    pub seq: u64,
    /// How long the job works (sleeps), in ms.
    #[serde(default)]
    pub work_ms: u64,
    /// A failure to inject, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail: Option<Misbehave>,
    /// Log every start and finish to the Redis list `<key_prefix>:synthetic:<queue>:log`.
    #[serde(default)]
    pub record: bool,
}

/// A failure a synthetic job injects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Misbehave {
    /// What goes wrong.
    pub mode: FailMode,
    /// On how many first attempts it goes wrong; every attempt when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// With `error`: the delay the handler asks for before the next attempt, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// The kinds of injected failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// A retryable error (after `work_ms`).
    Error,
    /// A permanent error.
    Permanent,
    /// A panic in the handler.
    Panic,
    /// The whole worker process aborts mid-job, as on an out-of-memory kill.
    Crash,
}

/// One line of the synthetic log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// The job's `seq`.
    pub seq: u64,
    /// The job id.
    pub job: String,
    /// The attempt number, from 1.
    pub attempt: u32,
    /// `start` or `finish`.
    pub event: String,
    /// Wall-clock time, ms since the epoch.
    pub at_ms: u64,
    /// The worker process id.
    pub pid: u32,
}

/// What synthetic jobs need from their worker: a Redis connection for their log.
#[derive(Clone)]
pub struct SyntheticContext {
    conn: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for SyntheticContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyntheticContext")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl SyntheticContext {
    /// The context of a worker runtime.
    pub fn new(runtime: &crate::runtime::Runtime) -> Self {
        Self {
            conn: runtime.broker().connection(),
            prefix: runtime.settings().queue.key_prefix.clone(),
        }
    }

    /// The Redis list synthetic jobs of `queue` log to.
    pub fn log_key(prefix: &str, queue: &str) -> String {
        format!("{prefix}:synthetic:{queue}:log")
    }

    async fn log(
        &self,
        job: &SyntheticJob,
        delivery: &Delivery,
        event: &str,
    ) -> Result<(), JobError> {
        let line = LogLine {
            seq: job.seq,
            job: delivery.job_id.clone(),
            attempt: delivery.attempt,
            event: event.to_owned(),
            at_ms: crate::queue::now_ms(),
            pid: std::process::id(),
        };
        let line = serde_json::to_string(&line).map_err(JobError::permanent)?;
        let mut conn = self.conn.clone();
        redis::cmd("RPUSH")
            .arg(Self::log_key(&self.prefix, &delivery.queue))
            .arg(line)
            .query_async::<()>(&mut conn)
            .await
            .map_err(JobError::retryable)
    }
}

/// Runs one synthetic job.
pub async fn run(
    ctx: SyntheticContext,
    job: SyntheticJob,
    delivery: Delivery,
) -> Result<(), JobError> {
    if job.record {
        ctx.log(&job, &delivery, "start").await?;
    }
    let misbehave = job
        .fail
        .as_ref()
        .filter(|f| f.attempts.is_none_or(|n| delivery.attempt <= n));
    if let Some(Misbehave {
        mode: FailMode::Crash,
        ..
    }) = misbehave
    {
        tracing::error!(job.id = %delivery.job_id, attempt = delivery.attempt, "Synthetic job crashes its worker process as asked");
        std::process::abort();
    }
    if job.work_ms > 0 {
        tokio::time::sleep(Duration::from_millis(job.work_ms)).await;
    }
    match misbehave {
        Some(Misbehave {
            mode: FailMode::Error,
            retry_after_ms: Some(ms),
            ..
        }) => {
            return Err(JobError::retry_after(
                "synthetic failure (retry-after)",
                Duration::from_millis(*ms),
            ));
        }
        Some(Misbehave {
            mode: FailMode::Error,
            ..
        }) => return Err(JobError::retryable("synthetic failure")),
        Some(Misbehave {
            mode: FailMode::Permanent,
            ..
        }) => return Err(JobError::permanent("synthetic permanent failure")),
        Some(Misbehave {
            mode: FailMode::Panic,
            ..
        }) => panic!("synthetic panic in job {}", job.seq),
        Some(Misbehave {
            mode: FailMode::Crash,
            ..
        })
        | None => {}
    }
    if job.record {
        ctx.log(&job, &delivery, "finish").await?;
    }
    Ok(())
}
