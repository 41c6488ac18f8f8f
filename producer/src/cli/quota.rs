//! `quota`: the fleet's provider budgets as Redis holds them, and the resumption of a provider paused for quota.

use anyhow::Context;
use upload_pipeline::{Settings, quota::Quota};

use super::args::QuotaAction;

/// Resumes a paused provider, or without an action prints the configured limits and every budget in use.
pub async fn run(settings: &Settings, action: Option<QuotaAction>) -> anyhow::Result<()> {
    super::start_logging(settings, super::QUIET)?;
    // Not used, but connecting first gives an unreachable Redis the same error as the queue commands.
    let _broker = super::connect_broker(settings).await?;
    let quota = Quota::connect(settings)
        .await
        .context("Failed to connect to Redis")?;
    match action {
        Some(QuotaAction::Resume { provider }) => {
            if quota.resume(&provider).await? {
                println!("{provider} resumed: its stage calls it again");
            } else {
                println!("{provider} was not paused");
            }
        }
        None => show(settings, &quota).await?,
    }
    Ok(())
}

async fn show(settings: &Settings, quota: &Quota) -> anyhow::Result<()> {
    let q = &settings.quota;
    println!(
        "limits: openai {} requests/min, {} tokens/min, {} tokens/day; llamaparse {} uploads per {:?}, {} pages/day (0: none)",
        q.openai.requests_per_minute,
        q.openai.tokens_per_minute,
        q.openai.daily_tokens,
        q.llamaparse.uploads,
        q.llamaparse.window,
        q.llamaparse.pages_per_day
    );
    let states = quota.report().await?;
    if states.is_empty() {
        println!("no budget in use yet");
    }
    for s in states {
        let ttl = if s.ttl_ms >= 0 {
            format!("  (expires in {:.1} s)", s.ttl_ms as f64 / 1000.0)
        } else {
            String::new()
        };
        println!("{:<60} {}{ttl}", s.key, s.value);
    }
    Ok(())
}
