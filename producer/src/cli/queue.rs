//! The operators' view of the stage queues: `queues` shows their state and `dlq` handles their dead letters.

use anyhow::{Context, bail};
use upload_pipeline::{
    Settings,
    jobs::Stage,
    queue::{Broker, QueueStats},
};

use super::args::DlqAction;

/// Prints every stage queue's state, as a table or as one JSON object keyed by stage.
pub async fn show(settings: &Settings, json: bool) -> anyhow::Result<()> {
    super::start_logging(settings, super::QUIET)?;
    let broker = super::connect_broker(settings).await?;
    let mut rows = Vec::new();
    for stage in Stage::ALL {
        let stats = broker
            .handle(stage.as_str())?
            .stats()
            .await
            .with_context(|| format!("Failed to read queue {stage}"))?;
        rows.push((stage, stats));
    }
    if json {
        print_json(&rows);
    } else {
        print_table(&rows);
    }
    Ok(())
}

fn print_json(rows: &[(Stage, QueueStats)]) {
    let map: serde_json::Map<String, serde_json::Value> = rows
        .iter()
        .map(|(s, st)| {
            (
                s.to_string(),
                serde_json::to_value(st).expect("stats serialise"),
            )
        })
        .collect();
    println!("{}", serde_json::Value::Object(map));
}

fn print_table(rows: &[(Stage, QueueStats)]) {
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10}",
        "queue", "pending", "in_flight", "delayed", "dead", "oldest_age", "consumers"
    );
    for (stage, s) in rows {
        let age = s
            .oldest_pending_age_ms
            .map_or("-".to_owned(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
        println!(
            "{stage:<8} {:>10} {:>10} {:>10} {:>10} {age:>12} {:>10}",
            s.pending, s.in_flight, s.delayed, s.dead, s.consumers
        );
    }
}

/// Lists, replays or purges a stage's dead letters.
pub async fn dlq(settings: &Settings, action: DlqAction) -> anyhow::Result<()> {
    super::start_logging(settings, super::QUIET)?;
    let broker = super::connect_broker(settings).await?;
    match action {
        DlqAction::List { stage, limit } => list_dead(&broker, stage, limit).await,
        DlqAction::Replay { stage, ids } => replay_dead(&broker, stage, &ids).await,
        DlqAction::Purge { stage, ids } => {
            let n = broker
                .handle(stage.as_str())?
                .purge_dead(&ids)
                .await
                .context("Failed to purge dead letters")?;
            println!("purged {n} dead letters of {stage}");
            Ok(())
        }
    }
}

async fn list_dead(broker: &Broker, stage: Stage, limit: usize) -> anyhow::Result<()> {
    let letters = broker
        .handle(stage.as_str())?
        .dead_letters(limit)
        .await
        .context("Failed to list dead letters")?;
    if letters.is_empty() {
        println!("no dead letters in {stage}");
    }
    for d in letters {
        println!(
            "{}  job {}  attempts {}  {}\n    payload {}",
            d.entry_id, d.job_id, d.attempts, d.error, d.payload
        );
    }
    Ok(())
}

/// Replays the dead letters `ids` (all when empty), and fails when some of them were not dead letters.
async fn replay_dead(broker: &Broker, stage: Stage, ids: &[String]) -> anyhow::Result<()> {
    let n = broker
        .handle(stage.as_str())?
        .replay_dead(ids)
        .await
        .context("Failed to replay dead letters")?;
    println!("replayed {n} dead letters of {stage}");
    if !ids.is_empty() && n < ids.len() as u64 {
        bail!(
            "{} of the given ids were not dead letters of {stage}",
            ids.len() as u64 - n
        );
    }
    Ok(())
}
