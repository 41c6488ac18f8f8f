//! The reconciler: Postgres is the truth, Redis carries work. It pushes again only the work that is really lost:
//! stages left `queued`, `running` or `failed` whose jobs are nowhere in Redis (Redis was down between a commit and
//! its push, or restarted without its data). Pushes are deduplicated by job id in Redis
//! ([`Queue::push_with_id`](crate::queue::Queue::push_with_id)), so a job still waiting, in flight or delayed is
//! never pushed twice, however long the backlog; running stages keep their rows fresh (a heartbeat), so a
//! half-hour LlamaParse job is never taken for a lost one.
//!
//! Each pass walks the stages untouched for `pipeline.reconcile_after` in keyset pages, from where the last pass
//! stopped, at most [`PASS_ROWS`] a pass. When Redis may have lost writes (another server answers: a restart or a
//! failover changes its `run_id`; or its epoch key is gone; or this process has not looked before) a sweep walks
//! every stage that was unsettled at that moment, whatever its age, [`SWEEP_ROWS`] a pass, so a job lost in a Redis
//! restart runs again within one `pipeline.reconcile_interval` (for backlogs up to [`SWEEP_ROWS`] stages). One
//! producer at a time leads, through a lease in Redis renewed after every page.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{
    jobs::{
        JobState, Pipeline, Stage,
        pipeline::StageError,
        store::{self, Stale},
    },
    metrics as m,
};

const LEASE: &str = "local v = redis.call('GET', KEYS[1]) \
    if v == false or v == ARGV[1] then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end return 0";

/// Stages read per query.
const PAGE: i32 = 500;
/// Stages looked at per pass at most: a backlog larger than this is walked across passes.
pub const PASS_ROWS: usize = 5_000;
/// Stages looked at per pass at most while sweeping after Redis may have lost writes.
pub const SWEEP_ROWS: usize = 20_000;

/// Where the walk stopped: the last stage seen, in `stale_jobs`' keyset order.
type Cursor = (DateTime<Utc>, Uuid, Stage);

/// The leadership lease the passes renew.
#[derive(Debug)]
struct Lease {
    key: String,
    identity: String,
    ms: u64,
}

/// The reconciler's memory between passes: where the walk stopped, which Redis it last saw, and the sweep in
/// progress.
#[derive(Debug)]
pub struct Reconciler {
    p: Pipeline,
    /// The Redis epoch and `run_id` the last pass saw.
    seen: Option<String>,
    cursor: Option<Cursor>,
    /// A sweep in progress: every stage unsettled before this time is looked at, whatever its age.
    sweep: Option<DateTime<Utc>>,
    lease: Option<Lease>,
}

impl Reconciler {
    /// A reconciler over `p`'s database and queues; its first pass starts a sweep.
    pub fn new(p: Pipeline) -> Self {
        Self {
            p,
            seen: None,
            cursor: None,
            sweep: None,
            lease: None,
        }
    }

    /// Takes or renews the leadership lease; `true` while this process leads (always, without a lease).
    async fn lead(&self) -> bool {
        let Some(lease) = &self.lease else {
            return true;
        };
        let leader: redis::RedisResult<i64> = redis::Script::new(LEASE)
            .key(&lease.key)
            .arg(&lease.identity)
            .arg(lease.ms)
            .invoke_async(&mut self.p.parse.broker().connection())
            .await;
        match leader {
            Ok(1) => true,
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(error = %e, "Reconciler could not reach Redis");
                false
            }
        }
    }

    /// The key whose disappearance tells that Redis lost its data.
    fn epoch_key(&self) -> String {
        format!("{}:epoch", self.p.settings.queue.key_prefix)
    }

    /// Reads (or creates) the Redis epoch and reads the server's `run_id`; `true` when either differs from what
    /// the last pass saw (a restart or failover may have lost the last writes; a missing epoch means all of them).
    async fn redis_changed(&mut self) -> Result<bool, StageError> {
        let mut conn = self.p.parse.broker().connection();
        let fresh = crate::queue::new_job_id();
        let (epoch, info): (String, String) = redis::pipe()
            .cmd("SET")
            .arg(self.epoch_key())
            .arg(&fresh)
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(self.epoch_key())
            .cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .map_err(crate::queue::QueueError::from)?;
        let run_id = info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .unwrap_or("")
            .trim();
        let now = format!("{epoch}/{run_id}");
        let changed = self.seen.as_deref() != Some(now.as_str());
        if changed && self.seen.is_some() {
            tracing::warn!(
                "Redis restarted, failed over or lost its data: every unsettled stage is checked again"
            );
        }
        self.seen = Some(now);
        Ok(changed)
    }

    /// One pass (while this process leads); returns how many stages were pushed again.
    pub async fn pass(&mut self) -> Result<usize, StageError> {
        if !self.lead().await {
            return Ok(0);
        }
        let now = Utc::now();
        if self.redis_changed().await? {
            self.sweep = Some(now);
            self.cursor = None;
        }
        let (before, budget) = match self.sweep {
            Some(at) => (at, SWEEP_ROWS),
            None => {
                let after = chrono::Duration::from_std(self.p.settings.pipeline.reconcile_after)
                    .unwrap_or_default();
                (now - after, PASS_ROWS)
            }
        };
        let sweeping = self.sweep.is_some();
        let mut seen = 0;
        let mut pushed = 0;
        while seen < budget {
            let page = self.page(before).await?;
            let done = page.len() < PAGE as usize;
            self.cursor = page.last().map(|(c, _)| *c);
            seen += page.len();
            pushed += self
                .settle_page(page.into_iter().map(|(_, s)| s).collect(), sweeping)
                .await?;
            if done {
                self.cursor = None;
                self.sweep = None;
                break;
            }
            // A long walk renews the lease as it goes; a process that lost it stops, and the next leader goes on.
            if !self.lead().await {
                break;
            }
        }
        Ok(pushed)
    }

    async fn page(&self, before: DateTime<Utc>) -> Result<Vec<(Cursor, Stale)>, StageError> {
        let rows = store::stale_page(&self.p.pool, before, self.cursor, PAGE).await?;
        Ok(rows
            .into_iter()
            .map(|row| ((row.updated_at, row.doc, row.stage), row))
            .collect())
    }

    /// Pushes the page's stages again (only what is nowhere in Redis is added) and fails those whose job kept
    /// crashing its workers until the queue gave it up. While sweeping after Redis may have lost writes, a stage
    /// on its last attempt is pushed, not failed: its job may have been lost with Redis rather than given up.
    async fn settle_page(&self, rows: Vec<Stale>, sweeping: bool) -> Result<usize, StageError> {
        let p = &self.p;
        let max = p.settings.queue.max_deliveries as i32;
        let mut pushed = 0;
        for row in rows {
            let (doc, user, stage) = (row.doc, row.user, row.stage);
            let embed_missing = if stage == Stage::Embed {
                Some(crate::jobs::chunk::missing_embeddings(p, user, doc).await?)
            } else {
                None
            };
            if !sweeping && row.state == JobState::Running && row.attempts >= max {
                let ids = match &embed_missing {
                    Some(missing) => p
                        .embed_jobs(doc, user, missing)
                        .into_iter()
                        .map(|(id, _)| id)
                        .collect(),
                    None => vec![format!("{doc}:{stage}")],
                };
                let queue = match stage {
                    Stage::Parse => p.parse.live(&ids).await,
                    Stage::Chunk => p.chunk.live(&ids).await,
                    _ => p.embed.live(&ids).await,
                }?;
                if queue.iter().any(|&live| live) {
                    // The queue still holds it: it decides (retry, or dead letter after max_deliveries).
                    continue;
                }
                // Every attempt started and none finished: the job kept crashing (or hanging) its workers, and the
                // queue dead-lettered it without running it again. Pushing it once more would only crash more.
                let reason = format!(
                    "the {stage} stage stopped its worker {} times without finishing (crash or hang)",
                    row.attempts
                );
                tracing::warn!(document_id = %doc, %stage, attempts = row.attempts, "Failing a document whose stage keeps crashing its workers");
                // Only if the row is as read: a worker's heartbeat or a retry since then wins.
                crate::jobs::pipeline::fail_document(
                    &p.pool,
                    user,
                    doc,
                    stage,
                    &reason,
                    Some(row.updated_at),
                )
                .await?;
                continue;
            }
            let push = match (stage, &embed_missing) {
                (Stage::Parse, _) => p.push_parse(doc, user).await.map(usize::from),
                (Stage::Chunk, _) => p.push_chunk(doc, user).await.map(usize::from),
                (_, Some(missing)) => p.push_embed(doc, user, missing).await,
                (_, None) => Ok(0),
            };
            let added = match push {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(document_id = %doc, %stage, error = %e, "Could not push a lost stage again; the next pass will try");
                    continue;
                }
            };
            if added == 0 {
                continue;
            }
            // Touched, so the walk meets it again only after another `reconcile_after`.
            store::touch(&p.pool, user, doc, stage).await?;
            tracing::info!(document_id = %doc, %stage, state = %row.state, jobs = added, "Pushed a lost stage again");
            metrics::counter!(m::RECONCILER_REQUEUED, "stage" => stage.as_str()).increment(1);
            pushed += 1;
        }
        Ok(pushed)
    }
}

/// One walk over every unsettled stage untouched for `pipeline.reconcile_after` (for tools and tests; the running
/// fleet uses [`Reconciler::pass`]). Returns how many stages were pushed again.
pub async fn reconcile_once(p: &Pipeline) -> Result<usize, StageError> {
    let mut r = Reconciler::new(p.clone());
    // This Redis is the one to compare with: walk by age, no sweep.
    r.redis_changed().await?;
    let mut total = 0;
    loop {
        total += r.pass().await?;
        if r.cursor.is_none() {
            return Ok(total);
        }
    }
}

/// Runs passes every `pipeline.reconcile_interval` while this process holds the lease, until `stop` resolves.
pub async fn run(p: Pipeline, identity: String, stop: impl std::future::Future<Output = ()>) {
    let interval = p.settings.pipeline.reconcile_interval;
    let mut reconciler = Reconciler::new(p);
    reconciler.lease = Some(Lease {
        key: format!(
            "{}:reconciler:leader",
            reconciler.p.settings.queue.key_prefix
        ),
        identity,
        ms: (interval * 3).max(Duration::from_secs(1)).as_millis() as u64,
    });
    tokio::pin!(stop);
    loop {
        match reconciler.pass().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pushed = n, "Reconciler pass"),
            Err(e) => tracing::warn!(error = %e, "Reconciler pass failed"),
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
