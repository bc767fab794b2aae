//! A worker's request queue, ordered by deadline (earliest first), with a bound.
//!
//! Requests carry their own deadline (Sponge's dynamic SLO: what is left of the budget after
//! the network took its share), so the most urgent request is served first whatever its
//! arrival order. The bound is the worker's back-pressure: a full queue refuses new requests
//! at once (RESOURCE_EXHAUSTED) instead of letting every queued request miss its deadline.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::{oneshot, Notify};

use crate::error::ServeError;

/// What a request gets back from a worker.
#[derive(Debug)]
pub struct Served {
    pub output: Vec<f32>,
    pub output_shape: Vec<i64>,
    pub batch_size: u32,
    pub queue_us: u64,
}

pub type Reply = oneshot::Sender<Result<Served, ServeError>>;

/// A request waiting in a worker's queue.
#[derive(Debug)]
pub struct Pending {
    pub deadline: Instant,
    pub enqueued: Instant,
    pub input: Vec<f32>,
    pub reply: Reply,
    seq: u64,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    /// Reversed, so that the max-heap pops the earliest deadline (then the earliest arrival).
    fn cmp(&self, other: &Self) -> Ordering {
        other.deadline.cmp(&self.deadline).then(other.seq.cmp(&self.seq))
    }
}

#[derive(Default)]
struct Inner {
    heap: BinaryHeap<Pending>,
    seq: u64,
    /// No new requests; those queued are still served.
    sealed: bool,
    /// No new requests, and those queued were answered.
    closed: bool,
}

pub struct DeadlineQueue {
    inner: Mutex<Inner>,
    capacity: usize,
    pub notify: Notify,
}

impl DeadlineQueue {
    pub fn new(capacity: usize) -> Self {
        Self { inner: Mutex::new(Inner::default()), capacity, notify: Notify::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the heap inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enqueues a request; a full or closed queue gives it back with the reason.
    pub fn push(&self, deadline: Instant, input: Vec<f32>, reply: Reply) -> Result<(), (ServeError, Reply)> {
        let mut inner = self.lock();
        if inner.closed || inner.sealed {
            return Err((ServeError::Unavailable("the worker is stopping".into()), reply));
        }
        if inner.heap.len() >= self.capacity {
            return Err((ServeError::QueueFull(self.capacity), reply));
        }
        inner.seq += 1;
        let seq = inner.seq;
        inner.heap.push(Pending { deadline, enqueued: Instant::now(), input, reply, seq });
        drop(inner);
        self.notify.notify_one();
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.lock().heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// When the longest-waiting request arrived.
    pub fn oldest_arrival(&self) -> Option<Instant> {
        self.lock().heap.iter().map(|p| p.enqueued).min()
    }

    /// Takes up to `max` requests, earliest deadline first. Requests whose deadline passed
    /// (or whose caller is gone) are answered and skipped, never run.
    pub fn pop_batch(&self, max: usize, now: Instant) -> Vec<Pending> {
        let mut inner = self.lock();
        let mut batch = Vec::with_capacity(max);
        while batch.len() < max {
            let Some(p) = inner.heap.pop() else { break };
            if p.reply.is_closed() {
                continue;
            }
            if p.deadline <= now {
                let waited = now.saturating_duration_since(p.enqueued);
                let _ = p.reply.send(Err(ServeError::DeadlineExceeded(waited)));
                continue;
            }
            batch.push(p);
        }
        batch
    }

    /// Refuses new requests and answers every queued one with `why`.
    pub fn close(&self, why: &str) {
        let mut inner = self.lock();
        inner.closed = true;
        for p in inner.heap.drain() {
            let _ = p.reply.send(Err(ServeError::Unavailable(why.to_string())));
        }
        drop(inner);
        self.notify.notify_waiters();
    }

    /// Refuses new requests but keeps serving the queued ones (draining).
    pub fn seal(&self) {
        self.lock().sealed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn push(q: &DeadlineQueue, deadline: Instant, tag: f32) -> oneshot::Receiver<Result<Served, ServeError>> {
        let (tx, rx) = oneshot::channel();
        q.push(deadline, vec![tag], tx).map_err(|(e, _)| e).unwrap();
        rx
    }

    #[test]
    fn the_earliest_deadline_is_served_first_whatever_the_arrival_order() {
        let q = DeadlineQueue::new(10);
        let now = Instant::now();
        let _a = push(&q, now + Duration::from_secs(3), 3.0);
        let _b = push(&q, now + Duration::from_secs(1), 1.0);
        let _c = push(&q, now + Duration::from_secs(2), 2.0);
        let batch = q.pop_batch(2, now);
        assert_eq!(batch.iter().map(|p| p.input[0]).collect::<Vec<_>>(), vec![1.0, 2.0]);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn an_expired_request_is_answered_deadline_exceeded_not_run() {
        let q = DeadlineQueue::new(10);
        let now = Instant::now();
        let mut late = push(&q, now + Duration::from_millis(1), 1.0);
        let _ok = push(&q, now + Duration::from_secs(5), 2.0);
        let batch = q.pop_batch(8, now + Duration::from_millis(10));
        assert_eq!(batch.len(), 1);
        assert!(matches!(late.try_recv(), Ok(Err(ServeError::DeadlineExceeded(_)))));
    }

    #[test]
    fn a_full_queue_refuses_and_a_closed_queue_answers_everyone() {
        let q = DeadlineQueue::new(1);
        let far = Instant::now() + Duration::from_secs(5);
        let mut first = push(&q, far, 1.0);
        let (tx, _rx) = oneshot::channel();
        assert!(matches!(q.push(far, vec![], tx), Err((ServeError::QueueFull(1), _))));
        q.close("test");
        assert!(matches!(first.try_recv(), Ok(Err(ServeError::Unavailable(_)))));
        let (tx, _rx) = oneshot::channel();
        assert!(q.push(far, vec![], tx).is_err());
    }
}
