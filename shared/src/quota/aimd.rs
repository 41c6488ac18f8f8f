//! Additive-increase, multiplicative-decrease concurrency for one process.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// A process's concurrency for one budget: halved on a 429, grown by one per `limit` successes, between 1 and the
/// ceiling.
#[derive(Debug)]
pub(super) struct Aimd {
    state: Mutex<AimdState>,
    freed: Notify,
    ceiling: f64,
}

#[derive(Debug)]
struct AimdState {
    limit: f64,
    in_flight: usize,
}

/// A slot of the process's concurrency, given back on drop.
#[derive(Debug)]
pub(super) struct Slot(Arc<Aimd>);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        s.in_flight = s.in_flight.saturating_sub(1);
        drop(s);
        self.0.freed.notify_one();
    }
}

impl Aimd {
    pub(super) fn new(ceiling: usize) -> Arc<Self> {
        let ceiling = ceiling.max(1) as f64;
        Arc::new(Self {
            state: Mutex::new(AimdState {
                limit: ceiling,
                in_flight: 0,
            }),
            freed: Notify::new(),
            ceiling,
        })
    }

    pub(super) fn limit(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).limit as usize
    }

    pub(super) async fn acquire(self: &Arc<Self>) -> Slot {
        loop {
            let notified = self.freed.notified();
            {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if (s.in_flight as f64) < s.limit.floor().max(1.0) {
                    s.in_flight += 1;
                    return Slot(self.clone());
                }
            }
            notified.await;
        }
    }

    pub(super) fn success(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.limit = (s.limit + 1.0 / s.limit.max(1.0)).min(self.ceiling);
        drop(s);
        self.freed.notify_one();
    }

    pub(super) fn back_off(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.limit = (s.limit / 2.0).max(1.0);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn aimd_halves_on_429_and_grows_back_one_per_window() {
        let a = Aimd::new(16);
        assert_eq!(a.limit(), 16);
        a.back_off();
        a.back_off();
        assert_eq!(a.limit(), 4);
        // One per window of successes: from 4, five successes reach 5.
        for _ in 0..5 {
            a.success();
        }
        assert_eq!(a.limit(), 5);
        for _ in 0..10 {
            a.back_off();
        }
        assert_eq!(a.limit(), 1, "never below one");
        // Slots: the second waits until the first is dropped.
        let first = a.acquire().await;
        let waiting = {
            let a = a.clone();
            tokio::spawn(async move { a.acquire().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(first);
        let _second = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("freed")
            .unwrap();
    }
}
