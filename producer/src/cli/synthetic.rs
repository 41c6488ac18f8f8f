//! `synthetic`: pushes a batch of simulated jobs and, with `--wait`, follows the queue until the batch has settled.

use std::{
    io::IsTerminal,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use upload_pipeline::{
    Settings,
    jobs::synthetic::{FailMode, Misbehave, SyntheticJob},
    queue::{Queue, QueueStats},
};

use super::{args::SyntheticArgs, output::settling_bar};

/// Pushes the batch, then with `--wait` follows it until every job has succeeded or died, or the timeout.
pub async fn run(settings: &Settings, batch: &SyntheticArgs) -> anyhow::Result<()> {
    super::start_logging(settings, super::QUIET)?;
    let broker = super::connect_broker(settings).await?;
    let percent = 0.0..=100.0;
    if !percent.contains(&batch.fail_percent) || !percent.contains(&batch.dead_percent) {
        bail!("--fail-percent and --dead-percent must be between 0 and 100");
    }
    let queue = broker.queue::<SyntheticJob>(batch.stage.as_str())?;
    let before = queue.stats().await.context("Failed to read the queue")?;
    let jobs = jobs(batch);
    let started = Instant::now();
    queue
        .push_many(&jobs)
        .await
        .context("Failed to push the jobs")?;
    println!(
        "pushed {} synthetic jobs to {} in {:.0} ms",
        batch.jobs,
        batch.stage,
        started.elapsed().as_secs_f64() * 1000.0
    );
    if !batch.wait {
        return Ok(());
    }
    follow(&queue, batch, before, started).await
}

/// The batch's jobs, with the injected failures spread over it deterministically.
fn jobs(batch: &SyntheticArgs) -> Vec<SyntheticJob> {
    let every = |percent: f64| {
        if percent > 0.0 {
            (100.0 / percent).round().max(1.0) as u64
        } else {
            0
        }
    };
    let (fail_every, dead_every) = (every(batch.fail_percent), every(batch.dead_percent));
    (0..batch.jobs)
        .map(|seq| {
            let fail = if dead_every > 0 && seq % dead_every == dead_every - 1 {
                Some(Misbehave {
                    mode: FailMode::Permanent,
                    attempts: None,
                    retry_after_ms: None,
                })
            } else if fail_every > 0 && seq % fail_every == 0 {
                Some(Misbehave {
                    mode: FailMode::Error,
                    attempts: Some(1),
                    retry_after_ms: None,
                })
            } else {
                None
            };
            SyntheticJob {
                seq,
                work_ms: batch.work_ms,
                fail,
                record: false,
            }
        })
        .collect()
}

/// Polls the queue until the backlog is back to what it was `before` the push, showing the progress.
async fn follow(
    queue: &Queue<SyntheticJob>,
    batch: &SyntheticArgs,
    before: QueueStats,
    started: Instant,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(batch.timeout_secs);
    let bar = settling_bar(batch.jobs, "jobs");
    // Without a terminal (CI, logs) the bar is hidden; print a line a second instead.
    let plain = !std::io::stderr().is_terminal();
    let mut last_line = Instant::now();
    let backlog = |s: &QueueStats| s.pending + s.in_flight + s.delayed;
    let start_backlog = backlog(&before);
    loop {
        let now = queue.stats().await.context("Failed to read the queue")?;
        let left = backlog(&now).saturating_sub(start_backlog);
        let dead = now.dead.saturating_sub(before.dead);
        bar.set_position(batch.jobs.saturating_sub(left));
        let rate = (batch.jobs - left) as f64 / started.elapsed().as_secs_f64().max(1e-3);
        let msg = format!(
            "{rate:.0} jobs/s, {} in flight, {} waiting to retry, {dead} dead",
            now.in_flight, now.delayed
        );
        if plain && last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
            println!("  {}/{} jobs settled  {msg}", batch.jobs - left, batch.jobs);
        }
        bar.set_message(msg);
        if left == 0 {
            bar.finish();
            println!(
                "settled {} jobs in {:.2} s ({:.0} jobs/s): {} succeeded, {dead} dead (see `producer dlq list --stage {}`)",
                batch.jobs,
                started.elapsed().as_secs_f64(),
                batch.jobs as f64 / started.elapsed().as_secs_f64(),
                batch.jobs - dead,
                batch.stage
            );
            return Ok(());
        }
        if started.elapsed() > timeout {
            bar.abandon();
            bail!(
                "{left} jobs still unsettled after {} s: are workers running for stage {}?",
                timeout.as_secs(),
                batch.stage
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
