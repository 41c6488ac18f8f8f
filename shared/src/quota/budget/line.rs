//! The fleet's line for a budget: a call's place in it, kept from one request of the call to the next.

use std::time::{Duration, Instant};

use redis::{Script, ScriptInvocation};

use super::{
    Budget, BudgetInner, DEFERRED, IN_LINE, PROBE, Permit, RESERVED, dimensions, flight::InFlight,
    millis,
};
use crate::{
    providers::ProviderError,
    quota::{LATE_SLOTS, Limit, RESERVE_AHEAD},
};

/// How long a ticket keeps its place in line without its holder asking again: a replica killed while it waits
/// holds the line up for at most this long. A live caller whose lease ran out takes its place back when it asks.
const TICKET_LEASE: Duration = Duration::from_secs(2);
/// A caller in line asks again at least this often, renewing its lease. A grant made for it is picked up (and
/// sent) up to this late; the in-flight log counts the request until its answer, so that costs no 429.
const ASK_EVERY: Duration = Duration::from_millis(500);
/// And at most this often: reservations are made two seconds ahead, so asking a little late loses no budget.
const ASK_AT_MOST: Duration = Duration::from_millis(100);
static ACQUIRE: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("../acquire.lua")));
static LEAVE: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("../leave.lua")));

/// A call's place in the fleet's line for a budget ([`Budget::turn`]), kept from one part of the call to the next:
/// a part that follows one this turn reserved goes first, so a call split in parts is not deferred half-way,
/// after paying for its first parts. Dropping it gives the place up.
#[derive(Debug)]
pub struct Turn {
    budget: Budget,
    /// The ticket, once the line gave one (0: none yet).
    ticket: u64,
    /// Whether the ticket is in line now (and must be given back when the turn ends).
    held: bool,
    /// Whether a request of this turn was reserved already: its later parts wait longer rather than be deferred.
    started: bool,
}

impl Budget {
    /// A place in line for a call of several requests: reserve each with [`Turn::acquire`].
    pub fn turn(&self) -> Turn {
        Turn {
            budget: self.clone(),
            ticket: 0,
            held: false,
            started: false,
        }
    }
}

impl Turn {
    /// Reserves the `costs` of this call's next request (see [`Budget::acquire`]). With `more`, another request
    /// of the call follows and keeps the place first in line; the last request of a call passes `false`.
    pub async fn acquire(
        &mut self,
        costs: &[(&'static str, f64)],
        more: bool,
    ) -> Result<Permit, ProviderError> {
        let budget = self.budget.clone();
        let b = &*budget.inner;
        let started = Instant::now();
        let patience = self.patience();
        let slot = b.aimd.acquire().await;
        budget.check_daily_budget().await?;
        let dims = dimensions(&b.limits, costs);
        let (status, wait_ms, reason, granted) = self.ask(b, &dims, more, patience, started).await;
        if matches!(status, RESERVED | PROBE) {
            for (limit, cost) in &dims {
                metrics::counter!(crate::metrics::QUOTA_RESERVED, "provider" => b.provider, "resource" => limit.name)
                    .increment(cost.ceil() as u64);
            }
        }
        // From here the reservation is in flight: cancelled while it waits for its time, it goes back.
        let mut flight = (status == RESERVED && granted > 0).then(|| InFlight {
            budget: budget.clone(),
            granted,
            costs: costs.to_vec(),
            sent: false,
            done: false,
        });
        let probe = budget.answer(status, wait_ms, &reason, started).await?;
        if let Some(f) = flight.as_mut() {
            f.sent = true;
        }
        Ok(Permit {
            costs: costs.to_vec(),
            probe,
            flight,
            _slot: slot,
        })
    }

    /// How long this request may wait for its reservation before it is deferred.
    fn patience(&self) -> Duration {
        let b = &*self.budget.inner;
        // A later part of a started call waits up to a whole window of the provider rather than be deferred, which
        // would pay for its earlier parts again: first in line, it is never further away than that.
        if self.started {
            b.limits
                .iter()
                .map(|l| l.window)
                .fold(b.max_wait, Duration::max)
        } else {
            b.max_wait
        }
    }

    /// Asks `acquire.lua` until it answers something other than "in line": `(status, wait_ms, pause reason, when
    /// the request may go)`.
    /// Keeps the ticket the line gave, and whether it is held, up to date after every answer.
    async fn ask(
        &mut self,
        b: &BudgetInner,
        dims: &[(&Limit, f64)],
        more: bool,
        patience: Duration,
        started: Instant,
    ) -> (i64, i64, String, i64) {
        let conn = b.conn.clone();
        // Reserve at most RESERVE_AHEAD before the call can go: a replica killed while it waits then takes at most
        // that much of the fleet's budget with it. Further out, wait in line and ask again.
        loop {
            let left = patience.saturating_sub(started.elapsed());
            let invocation = acquire_invocation(b, self.ticket, more, left, dims);
            // The script runs in a task of its own: a caller cancelled while its ask is on the wire (a search's
            // reranker gives up after its `max_wait`) would not hear of a reservation made for it, which would
            // then count in every window until it expired. Whoever learns that the caller is gone, the task (its
            // answer refused) or the caller's dropped receiver (an answer sent but never read), gives such a
            // reservation back.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let mut pending = Pending {
                rx,
                budget: self.budget.clone(),
                costs: dims.iter().map(|(l, c)| (l.name, *c)).collect(),
                more,
            };
            let (mut task_conn, budget, costs) =
                (conn.clone(), self.budget.clone(), pending.costs.clone());
            tokio::spawn(async move {
                let answer: Result<Answer, redis::RedisError> =
                    invocation.invoke_async(&mut task_conn).await;
                if let Err(Ok(answer)) = tx.send(answer) {
                    give_back(&budget, &costs, more, answer).await;
                }
            });
            let answer = match (&mut pending.rx).await {
                Ok(answer) => answer,
                Err(_) => Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "the quota script's task ended without an answer",
                ))),
            };
            drop(pending);
            match answer {
                Ok((IN_LINE, wait_ms, ticket, _, _)) => {
                    self.ticket = ticket.max(0) as u64;
                    self.held = true;
                    if left.is_zero() {
                        // Its patience is spent and its turn not come (those ahead wait for room in the window,
                        // which the script cannot put a time on): deferred, its place given up now (a grant made
                        // for it meanwhile with it), so that the turn, if asked again, starts afresh.
                        self.leave();
                        return (
                            DEFERRED,
                            wait_ms.max(ASK_EVERY.as_millis() as i64),
                            String::new(),
                            0,
                        );
                    }
                    let turn_in = Duration::from_millis(wait_ms.max(0) as u64);
                    tokio::time::sleep(
                        turn_in
                            .saturating_sub(RESERVE_AHEAD)
                            .clamp(ASK_AT_MOST, ASK_EVERY),
                    )
                    .await;
                }
                Ok((status, wait_ms, ticket, reason, granted)) => {
                    if ticket > 0 {
                        self.ticket = ticket as u64;
                    }
                    self.held = status == RESERVED && more;
                    self.started |= status == RESERVED;
                    return (status, wait_ms, reason, granted);
                }
                Err(e) => {
                    tracing::warn!(provider = b.provider, error = %e, "The fleet's quota state is unreachable; calling without it");
                    return (RESERVED, 0, String::new(), 0);
                }
            }
        }
    }
}

/// One ask of `acquire.lua` (its keys and arguments are documented there): reserve within `left`, at most
/// RESERVE_AHEAD early, for `ticket` (0: none yet).
fn acquire_invocation(
    b: &BudgetInner,
    ticket: u64,
    more: bool,
    left: Duration,
    dims: &[(&Limit, f64)],
) -> ScriptInvocation<'static> {
    let mut invocation = ACQUIRE.prepare_invoke();
    invocation
        .key(&b.keys.bucket)
        .key(&b.keys.cooldown)
        .key(&b.keys.pause)
        .key(&b.keys.probe)
        .key(&b.keys.line)
        .key(&b.keys.asks)
        .key(&b.keys.answered)
        .key(&b.keys.flying)
        .arg(millis(left.min(RESERVE_AHEAD)))
        .arg(millis(left))
        .arg(millis(b.probe_every).max(1))
        .arg(millis(TICKET_LEASE))
        .arg(ticket)
        .arg(u32::from(more))
        .arg(millis(RESERVE_AHEAD))
        .arg(dims.len());
    for (limit, cost) in dims {
        invocation
            .arg(limit.name)
            .arg(limit.capacity())
            .arg(limit.rate_per_ms())
            .arg(*cost)
            .arg(limit.limit)
            .arg(millis(limit.window).max(1))
            .arg(limit.slot_ms())
            .arg(limit.ring())
            .arg(LATE_SLOTS)
            .arg(millis(b.request_timeout));
    }
    invocation
}

impl Turn {
    /// Gives the place in line back, in the background, and forgets it.
    fn leave(&mut self) {
        let (ticket, held) = (
            std::mem::take(&mut self.ticket),
            std::mem::take(&mut self.held),
        );
        if !held || ticket == 0 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let b = self.budget.inner.clone();
        runtime.spawn(async move { leave_line(&b, ticket).await });
    }
}

impl Drop for Turn {
    /// Gives the place in line back at once, rather than holding the line up until its lease lapses, and with it
    /// a grant made for it that it never picked up.
    fn drop(&mut self) {
        self.leave();
    }
}

/// An answer of `acquire.lua`: (status, wait ms, ticket, pause reason, when the request may go).
type Answer = (i64, i64, i64, String, i64);

/// An ask on its way: dropped before its answer was read (the caller cancelled after the task sent it), it gives
/// back what the answer made, as the task does for an answer it could not send.
struct Pending {
    rx: tokio::sync::oneshot::Receiver<Result<Answer, redis::RedisError>>,
    budget: Budget,
    costs: Vec<(&'static str, f64)>,
    more: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.rx.close();
        if let Ok(Ok(answer)) = self.rx.try_recv()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (budget, costs, more) = (
                self.budget.clone(),
                std::mem::take(&mut self.costs),
                self.more,
            );
            runtime.spawn(async move { give_back(&budget, &costs, more, answer).await });
        }
    }
}

/// Gives back what an answer its caller never heard of made: a reservation leaves the in-flight log (never
/// sent), and a place it left in line (waiting, or kept for the call's next part) leaves the line rather than
/// hold it up until its lease lapses.
async fn give_back(budget: &Budget, costs: &[(&'static str, f64)], more: bool, answer: Answer) {
    let (status, _, ticket, _, granted) = answer;
    if status == RESERVED && granted > 0 {
        budget.end_flight(granted, costs, None).await;
    }
    if ticket > 0 && (status == IN_LINE || (status == RESERVED && more)) {
        leave_line(&budget.inner, ticket as u64).await;
    }
}

/// `ticket` leaves the line (`leave.lua`), and a grant made for it that it never picked up leaves the in-flight
/// log.
async fn leave_line(b: &BudgetInner, ticket: u64) {
    let mut conn = b.conn.clone();
    let mut invocation = LEAVE.prepare_invoke();
    invocation
        .key(&b.keys.line)
        .key(&b.keys.asks)
        .key(&b.keys.flying)
        .arg(ticket)
        .arg(b.limits.len());
    for limit in &b.limits {
        invocation.arg(limit.name).arg(limit.slot_ms());
    }
    let r: Result<i64, _> = invocation.invoke_async(&mut conn).await;
    if let Err(e) = r {
        tracing::debug!(provider = b.provider, error = %e, "Could not leave the budget's line; the ticket lapses");
    }
}
