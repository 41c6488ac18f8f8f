//! How a job's end is recorded in Redis: acknowledged (through the acker), scheduled for another attempt in the
//! delayed set, or moved to the dead letters; each counted in the metrics.

use std::time::Duration;

use tokio::sync::oneshot;

use super::{
    Delivery, GROUP, QueueError,
    consumer::Shared,
    envelope::Envelope,
    error::Failure,
    scripts,
    tasks::{AckMsg, Backoff},
};
use crate::metrics as m;

impl Shared {
    /// Acknowledges a finished job; resolves once `XACK` and `XDEL` are written and its id has left the live
    /// set (batched with other acks).
    pub(crate) async fn ack(&self, entry_id: String, job_id: String) {
        let (tx, rx) = oneshot::channel();
        if self
            .life
            .acker
            .send(AckMsg::Ack(entry_id, job_id, tx))
            .is_ok()
        {
            let _ = rx.await;
        }
    }

    /// Resolves once every acknowledgement sent before it is written.
    pub(super) async fn flush_acks(&self) {
        let (tx, rx) = oneshot::channel();
        if self.life.acker.send(AckMsg::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Acknowledges a job that ended (`success`, or `failed` when its handler recorded a permanent failure) and
    /// counts it, with its recovery when an earlier attempt had failed.
    pub(crate) async fn complete(&self, delivery: &Delivery, outcome: &'static str) {
        self.ack(delivery.entry_id.clone(), delivery.job_id.clone())
            .await;
        let stage = self.queue.name().to_owned();
        metrics::counter!(m::QUEUE_JOBS, "stage" => stage.clone(), "outcome" => outcome)
            .increment(1);
        let resolution = match outcome {
            "success" if delivery.attempt > 1 => "recovered",
            "success" => return,
            _ => "failed",
        };
        metrics::counter!(m::RECOVERY_FAILED_JOBS, "stage" => stage, "resolution" => resolution)
            .increment(1);
    }

    pub(super) fn count_dead(&self) {
        let stage = self.queue.name().to_owned();
        metrics::counter!(m::QUEUE_JOBS, "stage" => stage.clone(), "outcome" => "dead")
            .increment(1);
        metrics::counter!(m::RECOVERY_FAILED_JOBS, "stage" => stage, "resolution" => "dead")
            .increment(1);
    }

    /// Handles a failed attempt: schedule a retry, or dead-letter it when permanent or out of attempts.
    pub(crate) async fn fail(&self, delivery: &Delivery, payload: &str, failure: Failure) {
        if let Failure::Settled { .. } = failure {
            return self.complete(delivery, "failed").await;
        }
        let outcome = match self.dead_reason(delivery, &failure) {
            Some(reason) => {
                let env = envelope_of(delivery, payload, delivery.attempt, reason);
                self.dead_letter(&delivery.entry_id, &env)
                    .await
                    .map(|owned| (owned, "dead"))
            }
            None => self.schedule_retry(delivery, payload, &failure).await,
        };
        match outcome {
            Ok((true, "dead")) => self.count_dead(),
            Ok((true, outcome)) => {
                metrics::counter!(m::QUEUE_JOBS, "stage" => self.queue.name().to_owned(), "outcome" => outcome)
                    .increment(1)
            }
            Ok((false, _)) => self.claim_lost(&delivery.entry_id),
            Err(e) => tracing::error!(
                queue = self.queue.name(), job.id = %delivery.job_id, error = %e,
                "Could not record a failed attempt; the job stays claimed and will be delivered again"
            ),
        }
        self.disown(&delivery.entry_id);
    }

    /// Why a failed attempt goes to the dead letters (permanent, or the last attempt), or `None` to retry it.
    fn dead_reason(&self, delivery: &Delivery, failure: &Failure) -> Option<String> {
        let max = self.settings().max_deliveries;
        match failure {
            Failure::Permanent { error } => Some(error.clone()),
            Failure::Retry { error, .. } if delivery.attempt >= max => Some(format!(
                "{error} (gave up after {} attempts)",
                delivery.attempt
            )),
            Failure::Retry { .. } | Failure::Defer { .. } | Failure::Settled { .. } => None,
        }
    }

    /// Puts a failed attempt in the delayed set, due after the delay the handler asked for or the backoff.
    /// Returns whether the entry was still ours, and the outcome to count.
    async fn schedule_retry(
        &self,
        delivery: &Delivery,
        payload: &str,
        failure: &Failure,
    ) -> Result<(bool, &'static str), QueueError> {
        let (after, deferred) = match failure {
            Failure::Retry {
                after: Some(after), ..
            } => (*after, false),
            Failure::Defer { after, .. } => (*after, true),
            _ => (self.settings().backoff(delivery.attempt), false),
        };
        // A deferred job is stored as if this delivery never happened, so its next one has the same number.
        let attempts_used = if deferred {
            delivery.attempt.saturating_sub(1)
        } else {
            delivery.attempt
        };
        let env = envelope_of(
            delivery,
            payload,
            attempts_used,
            failure.message().to_owned(),
        );
        tracing::info!(
            queue = self.queue.name(), job.id = %delivery.job_id, attempt = delivery.attempt,
            retry_in_ms = after.as_millis() as u64, error = failure.message(),
            deferred, "Job attempt failed; it will be retried"
        );
        self.retry(&delivery.entry_id, &env, after)
            .await
            .map(|owned| (owned, if deferred { "deferred" } else { "retried" }))
    }

    pub(super) fn claim_lost(&self, entry_id: &str) {
        tracing::warn!(queue = self.queue.name(), consumer = %self.name, entry_id, "Lost the claim on a job to another consumer");
        metrics::counter!(m::QUEUE_CLAIMS_LOST, &self.labels()).increment(1);
    }

    /// Runs a script that changes the queue, retrying Redis failures a few times. `Ok(false)`: not ours anymore.
    async fn owned_op(
        &self,
        op: &'static str,
        call: impl Fn() -> redis::ScriptInvocation<'static>,
    ) -> Result<bool, QueueError> {
        let mut conn = self.queue.broker().connection();
        let mut backoff = Backoff::new();
        let mut tries = 0;
        loop {
            match call().invoke_async::<i64>(&mut conn).await {
                Ok(n) => return Ok(n == 1),
                Err(e) if tries < 8 => {
                    self.redis_error(op, &e);
                    tries += 1;
                    backoff.wait().await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn retry(
        &self,
        entry_id: &str,
        env: &Envelope,
        after: Duration,
    ) -> Result<bool, QueueError> {
        let member = env.delayed_member().map_err(QueueError::Encode)?;
        let keys = self.queue.keys().clone();
        let (consumer, entry_id) = (self.name.clone(), entry_id.to_owned());
        self.owned_op("retry", move || {
            let mut inv = scripts::RETRY.prepare_invoke();
            inv.key(&keys.stream)
                .key(&keys.delayed)
                .arg(GROUP)
                .arg(&consumer)
                .arg(&entry_id);
            inv.arg(after.as_millis() as u64).arg(&member);
            inv
        })
        .await
    }

    /// Moves an entry this consumer owns to the dead letters; `Ok(false)` when it is no longer ours.
    pub(super) async fn dead_letter(
        &self,
        entry_id: &str,
        env: &Envelope,
    ) -> Result<bool, QueueError> {
        tracing::warn!(
            queue = self.queue.name(), job.id = %env.job_id, attempts = %env.attempts,
            error = env.last_error.as_deref().unwrap_or(""), "Job moved to the dead letters"
        );
        let keys = self.queue.keys().clone();
        let (consumer, entry_id) = (self.name.clone(), entry_id.to_owned());
        let maxlen = self.settings().dead_letter_max;
        let fields = env.fields();
        self.owned_op("dead_letter", move || {
            let mut inv = scripts::DEAD.prepare_invoke();
            inv.key(&keys.stream)
                .key(&keys.dead)
                .key(&keys.live)
                .key(&keys.again)
                .arg(GROUP)
                .arg(&consumer)
                .arg(&entry_id)
                .arg(maxlen);
            for (k, v) in &fields {
                inv.arg(*k).arg(v);
            }
            inv
        })
        .await
    }
}

/// The envelope a failed delivery is stored with: `attempts` used so far and the error that ended this one.
fn envelope_of(delivery: &Delivery, payload: &str, attempts: u32, error: String) -> Envelope {
    Envelope {
        job_id: delivery.job_id.clone(),
        payload: payload.to_owned(),
        attempts,
        enqueued_at_ms: delivery.enqueued_at_ms,
        last_error: Some(error),
    }
}
