//! Backpressure for runs: a fixed number run at once, a bounded queue waits
//! behind them, and anything beyond is turned away with 503.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Semaphore, SemaphorePermit};

/// Seconds a client is told to wait when the queue is full.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// Run slots and the queue in front of them.
pub struct RunSlots {
    running: Semaphore,
    waiting: AtomicUsize,
    max_waiting: usize,
}

impl RunSlots {
    /// Creates `slots` run slots with room for `max_waiting` queued runs.
    pub fn new(slots: usize, max_waiting: usize) -> RunSlots {
        RunSlots {
            running: Semaphore::new(slots),
            waiting: AtomicUsize::new(0),
            max_waiting,
        }
    }

    /// Takes a slot, waiting in the queue if all are busy. Returns `None`
    /// at once when the queue is full too.
    pub async fn acquire(&self) -> Option<SemaphorePermit<'_>> {
        if let Ok(permit) = self.running.try_acquire() {
            return Some(permit);
        }

        // Reserve a place in the queue, or give up when it is full.
        let reserved = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |waiting| {
                (waiting < self.max_waiting).then_some(waiting + 1)
            });
        if reserved.is_err() {
            return None;
        }
        let permit = self.running.acquire().await.ok();
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        permit
    }
}
