//! The reconciler: Postgres is the truth, Redis carries work. Stages left `queued`, `running` or `failed` past
//! `pipeline.reconcile_after` (a lost queue entry, Redis down between commit and push, a Redis restart that took
//! the queues with it) are pushed again. One producer at a time leads, through a lease in Redis.

use std::time::Duration;

use uuid::Uuid;

use crate::{db, jobs::Pipeline, metrics as m, queue::Broker};

const LEASE: &str = "local v = redis.call('GET', KEYS[1]) \
    if v == false or v == ARGV[1] then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end return 0";

/// One pass: pushes every stale stage again and touches it so the next push waits another deadline.
/// Returns how many jobs were pushed.
pub async fn reconcile_once(p: &Pipeline) -> Result<usize, crate::jobs::pipeline::StageError> {
    let before = chrono::Utc::now()
        - chrono::Duration::from_std(p.settings.pipeline.reconcile_after).unwrap_or_default();
    let stale: Vec<(Uuid, Uuid, String, String, i32)> =
        sqlx::query_as("SELECT document_id, user_id, stage, state, attempts FROM upload_pipeline.stale_jobs($1, 500)")
            .bind(before)
            .fetch_all(&p.pool)
            .await?;
    let mut pushed = 0;
    let max = p.settings.queue.max_deliveries as i32;
    for (doc, user, stage, state, attempts) in stale {
        if state == "running" && attempts >= max {
            // Every attempt started and none finished: the job kept crashing (or hanging) its workers, and the
            // queue dead-lettered it without running it again. Pushing it once more would only crash more workers.
            let reason = format!(
                "the {stage} stage stopped its worker {attempts} times without finishing (crash or hang)"
            );
            tracing::warn!(document_id = %doc, stage, attempts, "Failing a document whose stage keeps crashing its workers");
            crate::jobs::pipeline::fail_document(&p.pool, user, doc, &stage, &reason).await?;
            continue;
        }
        let push = match stage.as_str() {
            "parse" => p.push_parse(doc, user).await,
            "chunk" => p.push_chunk(doc, user).await,
            _ => {
                let missing = crate::jobs::chunk::missing_embeddings(p, user, doc).await?;
                p.push_embed(doc, user, &missing).await
            }
        };
        if let Err(e) = push {
            tracing::warn!(document_id = %doc, stage, error = %e, "Could not push a stale stage again; next pass will try");
            continue;
        }
        let mut tx = db::begin_as(&p.pool, user).await?;
        sqlx::query("UPDATE upload_pipeline.upload_jobs SET updated_at = now() WHERE document_id = $1 AND stage = $2")
            .bind(doc)
            .bind(&stage)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(document_id = %doc, stage, state, "Pushed a stale stage again");
        metrics::counter!(m::RECONCILER_REQUEUED, "stage" => stage.clone()).increment(1);
        pushed += 1;
    }
    Ok(pushed)
}

/// Runs passes every `pipeline.reconcile_interval` while this process holds the lease, until `stop` resolves.
pub async fn run(
    p: Pipeline,
    broker: Broker,
    identity: String,
    stop: impl std::future::Future<Output = ()>,
) {
    let interval = p.settings.pipeline.reconcile_interval;
    let key = format!("{}:reconciler:leader", p.settings.queue.key_prefix);
    let lease_ms = (interval * 3).max(Duration::from_secs(1)).as_millis() as u64;
    let script = redis::Script::new(LEASE);
    tokio::pin!(stop);
    loop {
        let leader: redis::RedisResult<i64> = script
            .key(&key)
            .arg(&identity)
            .arg(lease_ms)
            .invoke_async(&mut broker.connection())
            .await;
        match leader {
            Ok(1) => match reconcile_once(&p).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(pushed = n, "Reconciler pass"),
                Err(e) => tracing::warn!(error = %e, "Reconciler pass failed"),
            },
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "Reconciler could not reach Redis"),
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
