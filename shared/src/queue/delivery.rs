//! What travels with a delivered job besides its payload: the [`Delivery`] a handler reads, the consumer's
//! [`Claim`] on the job, and the markers the backend and its middleware pass along.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use super::now_ms;

/// What a delivered job carries besides its payload; handlers can read it with `Data<Delivery>`.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Name of the queue the job came from.
    pub queue: Arc<str>,
    /// The stream entry id of this delivery (changes when the job is retried).
    pub entry_id: String,
    /// The job id, stable across retries.
    pub job_id: String,
    /// This attempt's number, from 1.
    pub attempt: u32,
    /// When the job was first pushed, in ms since the Unix epoch.
    pub enqueued_at_ms: u64,
    /// When this delivery became runnable (entry id time), in ms since the Unix epoch.
    pub ready_at_ms: u64,
    /// The error of the previous attempt, if there was one.
    pub last_error: Option<String>,
    /// This consumer's claim on the job, watched while the handler runs.
    pub claim: Claim,
}

impl Delivery {
    /// Whether another consumer may have taken this job over: the claim was found lost, or the consumer could not
    /// refresh it for half of `reclaim_after` (after which any replica may reclaim it). A handler checks this
    /// before each paid call and stops (its job is retried) instead of duplicating the other consumer's work.
    pub fn claim_lost(&self) -> bool {
        self.claim.is_lost()
    }
}

/// The raw payload of a delivered job, kept beside it so a retry can re-enqueue it as it was pushed.
#[derive(Debug, Clone)]
pub(crate) struct RawPayload(pub Arc<str>);

/// Marks a suspect: a job that was in flight in [`SUSPECT_DELIVERIES`] - 1 processes that died. It runs alone,
/// so a job that crashes its process takes no innocent job down with it, while innocents that only shared a
/// process with it finish.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Suspect;

/// Deliveries from which a reclaimed job runs alone.
pub(crate) const SUSPECT_DELIVERIES: u64 = 3;

tokio::task_local! {
    /// The claim of the job the current task runs for (set around every handler by the backend).
    static CLAIM: Claim;
}

/// Runs `fut` with `claim` as the current task's claim (see [`current_claim_lost`]).
pub(crate) async fn with_claim<F: std::future::Future>(claim: Claim, fut: F) -> F::Output {
    CLAIM.scope(claim, fut).await
}

/// Whether the job the current task runs for was taken over by another consumer ([`Delivery::claim_lost`]);
/// `false` outside a job. Provider clients check it before each paid request of a call that makes several.
pub fn current_claim_lost() -> bool {
    CLAIM.try_with(Claim::is_lost).unwrap_or(false)
}

/// A consumer's claim on one delivered job, shared between the handler and the consumer's refresher.
#[derive(Clone)]
pub struct Claim(Arc<ClaimState>);

struct ClaimState {
    lost: AtomicBool,
    /// When this consumer took the job (read or reclaimed it), ms since the epoch.
    taken_ms: u64,
    /// When the consumer last refreshed its claims successfully, ms since the epoch (shared by its claims).
    refreshed_ms: Arc<AtomicU64>,
    /// How long without a refresh before another consumer may reclaim the job, in ms.
    lapse_ms: u64,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl Claim {
    pub(crate) fn new(refreshed_ms: Arc<AtomicU64>, lapse: Duration) -> Self {
        Self(Arc::new(ClaimState {
            lost: AtomicBool::new(false),
            taken_ms: now_ms(),
            refreshed_ms,
            lapse_ms: lapse.as_millis() as u64,
        }))
    }

    /// A claim nobody refreshes or takes over (for jobs run outside a consumer, in tests and tools).
    pub fn detached() -> Self {
        Self::new(Arc::new(AtomicU64::new(u64::MAX)), Duration::ZERO)
    }

    /// Marks the claim lost (the refresher found another owner).
    pub(crate) fn lose(&self) {
        self.0.lost.store(true, Ordering::Release);
    }

    /// See [`Delivery::claim_lost`].
    pub fn is_lost(&self) -> bool {
        if self.0.lost.load(Ordering::Acquire) {
            return true;
        }
        let refreshed = self.0.refreshed_ms.load(Ordering::Acquire);
        // Fresh since the later of its taking and the consumer's last complete refresh.
        refreshed != u64::MAX
            && now_ms().saturating_sub(refreshed.max(self.0.taken_ms)) >= self.0.lapse_ms
    }
}
