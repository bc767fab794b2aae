//! A worker's request queue, ordered by deadline (earliest first), with a bound.
//!
//! Requests carry their own deadline (Sponge's dynamic SLO: what is left of the budget after
//! the network took its share), so the most urgent request is served first whatever its
//! arrival order. The bound is the worker's back-pressure: a full queue refuses new requests
//! at once (RESOURCE_EXHAUSTED) instead of letting every queued request miss its deadline.
//!
//! Under overload the queue sheds early, so that the worker's cores go to requests that can
//! still make their deadline, by the rule the simulated worker follows too
//! ([`tidal_common::shed`]): a new request that the work queued ahead of it would make late is
//! refused at once (RESOURCE_EXHAUSTED; DEADLINE_EXCEEDED when its own budget is shorter than
//! a batch), and a queued request that could no longer finish is answered DEADLINE_EXCEEDED
//! without running.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use tidal_common::shed::{Admission, Shedder};
use tidal_common::slack::Offer;
use tidal_common::tensor::NamedTensor;

use crate::error::ServeError;

/// What a request gets back from a worker.
#[derive(Debug)]
pub struct Served {
    /// Every output of the model for this request, in the model's order (a batched model's
    /// with a leading dimension of 1).
    pub outputs: Vec<NamedTensor>,
    pub batch_size: u32,
    pub queue_us: u64,
    /// The batch's time inside ONNX Runtime, µs.
    pub run_us: u64,
}

pub type Reply = oneshot::Sender<Result<Served, ServeError>>;

/// A request waiting in a worker's queue.
#[derive(Debug)]
pub struct Pending {
    pub deadline: Instant,
    pub enqueued: Instant,
    /// One sample of each of the model's inputs, in its order.
    pub inputs: Vec<NamedTensor>,
    /// The shapes of its inputs but for padded dimensions: only requests of one key are
    /// batched together.
    pub key: Vec<i64>,
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
    shedder: Shedder,
    seq: u64,
    /// No new requests; those queued are still served.
    sealed: bool,
    /// No new requests, and those queued were answered.
    closed: bool,
}

pub struct DeadlineQueue {
    inner: Mutex<Inner>,
    capacity: usize,
    /// The origin of the shedder's clock.
    epoch: Instant,
    pub notify: Notify,
}

impl DeadlineQueue {
    pub fn new(capacity: usize) -> Self {
        Self { inner: Mutex::new(Inner::default()), capacity, epoch: Instant::now(), notify: Notify::new() }
    }

    /// `at` on the shedder's clock (instants before the queue existed are its origin).
    fn secs(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.epoch).as_secs_f64()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the heap inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enqueues a request, to be batched with requests of the same `key` (see
    /// `StageIo::batch_key`); a full or closed queue gives it back with the reason.
    pub fn push(
        &self,
        deadline: Instant,
        key: Vec<i64>,
        inputs: Vec<NamedTensor>,
        reply: Reply,
    ) -> Result<(), (ServeError, Reply)> {
        let mut inner = self.lock();
        if inner.closed || inner.sealed {
            return Err((ServeError::Unavailable("the worker is stopping".into()), reply));
        }
        if inner.heap.len() >= self.capacity {
            return Err((ServeError::QueueFull(self.capacity), reply));
        }
        let now = Instant::now();
        let ahead = inner.heap.iter().filter(|p| p.deadline <= deadline).count();
        let refused = match inner.shedder.admit(self.secs(now), ahead, self.secs(deadline)) {
            Admission::Admit => None,
            Admission::BudgetTooShort { needs_s, budget_s } => Some(ServeError::BudgetTooShort {
                needs: Duration::from_secs_f64(needs_s),
                budget: Duration::from_secs_f64(budget_s),
            }),
            Admission::WouldMiss { ahead, needs_s, budget_s } => Some(ServeError::WouldMiss {
                ahead,
                needs: Duration::from_secs_f64(needs_s),
                budget: Duration::from_secs_f64(budget_s),
            }),
        };
        if let Some(why) = refused {
            return Err((why, reply));
        }
        inner.seq += 1;
        let seq = inner.seq;
        inner.heap.push(Pending { deadline, enqueued: now, inputs, key, reply, seq });
        drop(inner);
        self.notify.notify_one();
        Ok(())
    }

    /// What this queue would say to a request due at `deadline` from a worker of `accuracy`,
    /// without queueing it: whether `push` would take it now, and when it would be done.
    pub fn offer(&self, deadline: Instant, accuracy: f64) -> Offer {
        let inner = self.lock();
        let now = self.secs(Instant::now());
        let ahead = inner.heap.iter().filter(|p| p.deadline <= deadline).count();
        let open = !inner.closed && !inner.sealed && inner.heap.len() < self.capacity;
        let admits = open && inner.shedder.admit(now, ahead, self.secs(deadline)) == Admission::Admit;
        Offer { accuracy, admits, finish_s: inner.shedder.finish(now, ahead).map(|at| at - now) }
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

    /// A batch of `size` requests took `took`, finishing at `now`.
    pub fn record_batch(&self, size: usize, took: Duration, now: Instant) {
        let now_s = self.secs(now);
        self.lock().shedder.record(size, took.as_secs_f64(), now_s);
    }

    /// Drops the estimate (the worker was resized: its batches take another time now).
    pub fn forget_estimate(&self) {
        self.lock().shedder.forget();
    }

    /// Takes up to `max` requests whose inputs have the shapes of the most urgent one, earliest
    /// deadline first (requests of other shapes stay queued: a batch is one tensor per input).
    /// Requests whose deadline passed, or would pass before a batch could finish (by a fresh
    /// estimate), or whose caller is gone, are answered and skipped, never run.
    pub fn pop_batch(&self, max: usize, now: Instant) -> Vec<Pending> {
        let now_s = self.secs(now);
        let mut inner = self.lock();
        let cutoff = inner.shedder.cutoff(now_s);
        let mut batch: Vec<Pending> = Vec::with_capacity(max);
        let mut other_shapes = Vec::new();
        while batch.len() < max {
            let Some(p) = inner.heap.pop() else { break };
            if p.reply.is_closed() {
                continue;
            }
            if self.secs(p.deadline) <= cutoff {
                let waited = now.saturating_duration_since(p.enqueued);
                let _ =
                    p.reply.send(Err(ServeError::DeadlineExceeded { after: waited, waiting: "in the queue".into() }));
                continue;
            }
            if batch.first().is_some_and(|first| first.key != p.key) {
                other_shapes.push(p);
                continue;
            }
            batch.push(p);
        }
        inner.heap.extend(other_shapes);
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
    use tidal_common::tensor::shape_key;

    fn push(q: &DeadlineQueue, deadline: Instant, tag: f32) -> oneshot::Receiver<Result<Served, ServeError>> {
        push_shaped(q, deadline, tag, 1)
    }

    /// A request whose one input is `len` values, the first `tag`.
    fn push_shaped(
        q: &DeadlineQueue,
        deadline: Instant,
        tag: f32,
        len: usize,
    ) -> oneshot::Receiver<Result<Served, ServeError>> {
        let (tx, rx) = oneshot::channel();
        let mut values = vec![0.0; len];
        values[0] = tag;
        let inputs = vec![NamedTensor::f32("x", vec![len as i64], &values)];
        q.push(deadline, shape_key(&inputs), inputs, tx).map_err(|(e, _)| e).unwrap();
        rx
    }

    fn tags(batch: &[Pending]) -> Vec<f32> {
        batch.iter().map(|p| p.inputs[0].f32_values().unwrap()[0]).collect()
    }

    #[test]
    fn the_earliest_deadline_is_served_first_whatever_the_arrival_order() {
        let q = DeadlineQueue::new(10);
        let now = Instant::now();
        let _a = push(&q, now + Duration::from_secs(3), 3.0);
        let _b = push(&q, now + Duration::from_secs(1), 1.0);
        let _c = push(&q, now + Duration::from_secs(2), 2.0);
        let batch = q.pop_batch(2, now);
        assert_eq!(tags(&batch), vec![1.0, 2.0]);
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
        assert!(matches!(late.try_recv(), Ok(Err(ServeError::DeadlineExceeded { .. }))));
    }

    #[test]
    fn with_a_fresh_estimate_a_request_that_cannot_make_it_is_refused_at_once() {
        let q = DeadlineQueue::new(100);
        let now = Instant::now();
        // Batches of 4 take 45 ms: 11.25 ms a request.
        q.record_batch(4, Duration::from_millis(45), now);
        let deadline = Instant::now() + Duration::from_millis(200);
        // With 13 ahead: 146 ms of queue and 45 ms of its own batch fit in 200 ms.
        let _queued: Vec<_> = (0..14).map(|i| push(&q, deadline, i as f32)).collect();
        // With 14 ahead: 157.5 + 45 ms do not.
        let (tx, _rx) = oneshot::channel();
        match q.push(deadline, Vec::new(), Vec::new(), tx) {
            Err((ServeError::WouldMiss { ahead: 14, .. }, _)) => {}
            other => panic!("expected a refusal, got {:?}", other.map_err(|(e, _)| e)),
        }
        // An urgent request jumps the queue: nothing is ahead of it.
        let (tx, _rx) = oneshot::channel();
        assert!(q.push(Instant::now() + Duration::from_millis(60), Vec::new(), Vec::new(), tx).is_ok());
        // Without a fresh estimate nothing is refused for its deadline.
        q.forget_estimate();
        let (tx, _rx) = oneshot::channel();
        assert!(q.push(Instant::now() + Duration::from_millis(1), Vec::new(), Vec::new(), tx).is_ok());
    }

    #[test]
    fn a_request_that_would_finish_late_is_not_run() {
        let q = DeadlineQueue::new(10);
        let now = Instant::now();
        let mut doomed = push(&q, now + Duration::from_millis(30), 1.0);
        let _ok = push(&q, now + Duration::from_secs(5), 2.0);
        q.record_batch(1, Duration::from_millis(50), now);
        let batch = q.pop_batch(8, now);
        assert_eq!(tags(&batch), vec![2.0]);
        assert!(matches!(doomed.try_recv(), Ok(Err(ServeError::DeadlineExceeded { .. }))));
    }

    #[test]
    fn a_full_queue_refuses_and_a_closed_queue_answers_everyone() {
        let q = DeadlineQueue::new(1);
        let far = Instant::now() + Duration::from_secs(5);
        let mut first = push(&q, far, 1.0);
        let (tx, _rx) = oneshot::channel();
        assert!(matches!(q.push(far, Vec::new(), Vec::new(), tx), Err((ServeError::QueueFull(1), _))));
        q.close("test");
        assert!(matches!(first.try_recv(), Ok(Err(ServeError::Unavailable(_)))));
        let (tx, _rx) = oneshot::channel();
        assert!(q.push(far, Vec::new(), Vec::new(), tx).is_err());
    }

    #[test]
    fn a_batch_holds_one_shape_and_the_others_wait_their_turn() {
        let q = DeadlineQueue::new(10);
        let now = Instant::now();
        let at = |ms| now + Duration::from_millis(ms);
        let _a = push_shaped(&q, at(1000), 1.0, 4);
        let _b = push_shaped(&q, at(2000), 2.0, 8);
        let _c = push_shaped(&q, at(3000), 3.0, 4);
        let _d = push_shaped(&q, at(4000), 4.0, 8);
        let first = q.pop_batch(8, now);
        assert_eq!(tags(&first), vec![1.0, 3.0], "the most urgent request's shape, in deadline order");
        assert_eq!(q.len(), 2, "the others stay queued");
        assert_eq!(tags(&q.pop_batch(8, now)), vec![2.0, 4.0]);
        assert!(q.is_empty());
    }
}
