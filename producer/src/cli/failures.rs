//! The operators' commands on failed documents of every user, straight from Postgres: `failures` lists them and
//! `retry` queues them again.

use std::sync::Arc;

use anyhow::{Context, bail};
use upload_pipeline::{
    Settings,
    retry::{self, FailedDocument, FailureCount, FailureFilter, RetryReport},
};

use super::output::{one_line, plural};

/// Prints the failures matching `filter`: counts by stage and reason, then the newest `limit` documents.
pub async fn list(
    settings: &Settings,
    filter: &FailureFilter,
    limit: u32,
    json: bool,
) -> anyhow::Result<()> {
    super::start_logging(settings, super::QUIET)?;
    let pool = upload_pipeline::db::connect(settings, 2)
        .await
        .context("Failed to connect to Postgres")?;
    let counts = retry::failure_counts(&pool, filter)
        .await
        .context("Failed to count the failures (has `producer migrate` run since the upgrade?)")?;
    let documents = retry::failures(&pool, filter, limit)
        .await
        .context("Failed to list the failures")?;
    pool.close().await;
    if json {
        println!(
            "{}",
            serde_json::json!({ "counts": counts, "documents": documents })
        );
    } else {
        print_tables(&counts, &documents);
    }
    Ok(())
}

fn print_tables(counts: &[FailureCount], documents: &[FailedDocument]) {
    if counts.is_empty() {
        println!("no failed document matches");
        return;
    }
    let total: i64 = counts.iter().map(|c| c.documents).sum();
    println!("{total} failed documents by stage and reason:");
    println!("{:<6} {:>9}  reason", "stage", "documents");
    for c in counts {
        println!(
            "{:<6} {:>9}  {}",
            c.stage,
            c.documents,
            one_line(c.reason.as_deref().unwrap_or("-"), 200)
        );
    }
    println!("\nthe newest {} of them:", documents.len());
    for d in documents {
        println!(
            "{}  {}  user {}  {:<5}  {}",
            d.failed_at.format("%Y-%m-%dT%H:%M:%SZ"),
            d.document_id,
            d.user_id,
            d.stage,
            one_line(d.error.as_deref().unwrap_or("-"), 160)
        );
    }
}

/// Queues the documents in `status` matching `filter` again from the stage that gave up, and prints the tally.
pub async fn retry(settings: Settings, status: &str, filter: &FailureFilter) -> anyhow::Result<()> {
    super::start_logging(&settings, super::QUIET)?;
    let broker = super::connect_broker(&settings).await?;
    let pool = upload_pipeline::db::connect(&settings, 4)
        .await
        .context("Failed to connect to Postgres")?;
    let pipeline = retry::operator_pipeline(pool, &broker, Arc::new(settings))
        .context("Failed to open the stage queues")?;
    let report = retry::retry_failed(&pipeline, filter)
        .await
        .context("Failed to list the failures (has `producer migrate` run since the upgrade?)")?;
    pipeline.pool.close().await;
    print_report(&report, status);
    if !report.errors.is_empty() {
        bail!(
            "{} matching documents could not be retried",
            report.errors.len()
        );
    }
    Ok(())
}

fn print_report(report: &RetryReport, status: &str) {
    println!(
        "re-queued {} {status} document{}",
        report.total(),
        plural(report.total())
    );
    for (stage, n) in &report.requeued {
        println!("  {:<6} {n}", stage.as_str());
    }
    if report.skipped > 0 {
        println!(
            "skipped {} that were no longer {status} (retried or deleted meanwhile)",
            report.skipped
        );
    }
    for (id, e) in &report.errors {
        eprintln!("could not retry {id}: {e}");
    }
}
