//! Backpressure for runs: a fixed number run at once, a bounded queue waits
//! behind them, and anything beyond is turned away with 503.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `Retry-After` value, in seconds, sent when the queue is full.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// Run slots and the queue in front of them.
pub struct RunSlots {
    running: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
}

/// A run's place: a slot, or a place in the queue for one.
pub struct Ticket {
    running: Arc<Semaphore>,
    slot: Option<OwnedSemaphorePermit>,
    queued: Option<QueuePlace>,
}

/// A place in the queue, given back when dropped.
struct QueuePlace(Arc<AtomicUsize>);

impl Drop for QueuePlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RunSlots {
    /// Creates `slots` run slots with room for `max_waiting` queued runs.
    pub fn new(slots: usize, max_waiting: usize) -> RunSlots {
        RunSlots {
            running: Arc::new(Semaphore::new(slots)),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_waiting,
        }
    }

    /// Takes a free slot or a place in the queue, without waiting. Returns
    /// `None` when the queue is full too.
    pub fn enter(&self) -> Option<Ticket> {
        if let Ok(slot) = self.running.clone().try_acquire_owned() {
            return Some(Ticket {
                running: self.running.clone(),
                slot: Some(slot),
                queued: None,
            });
        }
        let reserved = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |waiting| {
                (waiting < self.max_waiting).then_some(waiting + 1)
            });
        reserved.ok()?;
        Some(Ticket {
            running: self.running.clone(),
            slot: None,
            queued: Some(QueuePlace(self.waiting.clone())),
        })
    }
}

impl Ticket {
    /// Returns whether the ticket already has a slot, so the run starts at once.
    pub fn has_slot(&self) -> bool {
        self.slot.is_some()
    }

    /// Waits for a slot; the queue place is given back once it is taken.
    pub async fn slot(mut self) -> OwnedSemaphorePermit {
        if let Some(slot) = self.slot.take() {
            return slot;
        }
        let slot = self
            .running
            .clone()
            .acquire_owned()
            .await
            .expect("the run semaphore is never closed");
        drop(self.queued.take());
        slot
    }
}
