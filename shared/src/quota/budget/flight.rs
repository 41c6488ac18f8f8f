//! A reservation's time in flight: from the moment `acquire.lua` made it until its request is answered, it counts
//! in every window of the provider; then what it really cost is logged as answered.

use redis::Script;

use super::{Budget, dimensions};
use crate::quota::{PauseReason, aimd::Slot};

static RESTAMP: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("../restamp.lua")));

/// A reservation: hold it while the call runs, then give it to [`Budget::settle`] or [`Budget::settle_error`].
/// Until then the request counts in every window of the provider (it may arrive there at any moment); dropped
/// unsettled, it is counted as answered then.
#[derive(Debug)]
pub struct Permit {
    pub(super) costs: Vec<(&'static str, f64)>,
    /// The call probes whether a pause for this reason can end.
    pub(super) probe: Option<PauseReason>,
    pub(super) flight: Option<InFlight>,
    pub(super) _slot: Slot,
}

impl Permit {
    /// Gives the reservation back, its request never sent (the job's claim was lost before it): it stops
    /// counting in the provider's windows at once.
    pub async fn release(mut self) {
        self.end_flight(None).await;
    }

    /// Its request leaves the in-flight log (see [`InFlight::end`]); a second call does nothing.
    pub(super) async fn end_flight(&mut self, answered: Option<&[(&'static str, f64)]>) {
        if let Some(flight) = self.flight.take() {
            flight.end(answered).await;
        }
    }
}

/// A reservation in the fleet's in-flight log, from the moment `acquire.lua` made it until the request is
/// answered ([`InFlight::end`]). Dropped before that, it ends in the background: as sent (answered now) once
/// the request may have gone out, else as never sent (an acquire cancelled while it waited for its time).
#[derive(Debug)]
pub(super) struct InFlight {
    pub(super) budget: Budget,
    /// When the request was allowed to go (ms, Redis time).
    pub(super) granted: i64,
    pub(super) costs: Vec<(&'static str, f64)>,
    /// Whether the request may have gone out.
    pub(super) sent: bool,
    pub(super) done: bool,
}

impl InFlight {
    /// It leaves the in-flight log: with `answered`, the request was answered (or failed) and what it cost (by
    /// dimension; the reservation where absent) is logged as answered now; without, it was never sent.
    pub(super) async fn end(mut self, answered: Option<&[(&'static str, f64)]>) {
        if let Some(task) = self.finish(answered.map(<[_]>::to_vec)) {
            // A caller cancelled meanwhile leaves the task to finish: the request leaves the log all the same.
            let _ = task.await;
        }
    }

    /// Takes the request out of the log in a task of its own, once: a settle cancelled while the script is on
    /// its way must not leave the request counting until its request timeout.
    fn finish(
        &mut self,
        answered: Option<Vec<(&'static str, f64)>>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if std::mem::replace(&mut self.done, true) {
            return None;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::debug!(
                "A reservation ended outside a runtime; it counts until its request timeout"
            );
            return None;
        };
        let (budget, granted, costs) = (
            self.budget.clone(),
            self.granted,
            std::mem::take(&mut self.costs),
        );
        Some(runtime.spawn(async move {
            budget
                .end_flight(granted, &costs, answered.as_deref())
                .await
        }))
    }
}

impl Drop for InFlight {
    /// Dropped before [`InFlight::end`]: as sent (answered now) once the request may have gone out, else as never
    /// sent (an acquire cancelled while it waited for its time).
    fn drop(&mut self) {
        let answered = self.sent.then(Vec::new);
        self.finish(answered);
    }
}

impl Budget {
    /// Takes a request of `costs`, allowed to go at `granted` (ms, Redis time), out of the in-flight log; with
    /// `answered` (what it cost, by dimension; the reservation where absent) it was sent and is logged as
    /// answered now: the provider counted it from its arrival, no later than that.
    pub(super) async fn end_flight(
        &self,
        granted: i64,
        costs: &[(&'static str, f64)],
        answered: Option<&[(&'static str, f64)]>,
    ) {
        let b = &*self.inner;
        let dims = dimensions(&b.limits, costs);
        if dims.is_empty() {
            return;
        }
        let mut invocation = RESTAMP.prepare_invoke();
        invocation
            .key(&b.keys.answered)
            .key(&b.keys.flying)
            .arg(granted)
            .arg(dims.len());
        for (limit, cost) in &dims {
            let units = answered.map_or(0.0, |actual| {
                actual
                    .iter()
                    .find(|(n, _)| *n == limit.name)
                    .map_or(*cost, |(_, c)| c.max(0.0))
            });
            invocation
                .arg(limit.name)
                .arg(limit.slot_ms())
                .arg(limit.ring())
                .arg(*cost)
                .arg(units);
        }
        let mut conn = b.conn.clone();
        let r: Result<i64, _> = invocation.invoke_async(&mut conn).await;
        if let Err(e) = r {
            tracing::debug!(provider = b.provider, error = %e, "Could not end a request's time in flight");
        }
    }
}
