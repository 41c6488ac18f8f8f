//! Tests that measure rates or latency (quota utilisation, pickup latency, the scale-out benchmarks) and the load
//! tests that would disturb them (100,000-job bursts), apart from the functional tests so no other test's load
//! shares the process while they measure. Within this binary a test that measures, or loads the machine, runs
//! [`alone`]; the others run [`beside_others`], any number at once but never beside one that runs alone.

mod queue_load;
mod queue_pickup;
mod quota;
mod scale;

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static MACHINE: RwLock<()> = RwLock::const_new(());

/// The machine to this test alone until the guard drops: no other test of this binary runs meanwhile.
async fn alone() -> RwLockWriteGuard<'static, ()> {
    MACHINE.write().await
}

/// A turn shared with the other tests that do not measure.
async fn beside_others() -> RwLockReadGuard<'static, ()> {
    MACHINE.read().await
}
