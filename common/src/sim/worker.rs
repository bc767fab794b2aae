//! One simulated worker: a deadline-ordered queue that sheds by the agent's rule
//! ([`crate::shed`]), the dynamic batcher of the agent (start a batch when it is full or its
//! oldest request has waited the batcher timeout), and batch latencies drawn from the profile;
//! a worker that writes tokens gives each request of a batch the tokens its time affords, by
//! the agent's rule ([`crate::generation`]).

use std::collections::VecDeque;
use std::time::Duration;

use tidal_proto::v1::ServedBatch;

use crate::generation::TokenCost;
use crate::profile_correction;
use crate::reconcile::WorkerKey;
use crate::shed::{Admission, Shedder};
use crate::slack::Offer;

use super::SimGenerate;

/// A request waiting in or served by a worker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Request {
    /// The task it is of (an index into the simulated tasks).
    pub task: usize,
    /// When it reached the pipeline.
    pub arrival: f64,
    /// When it reached this worker's stage (what the batcher's timeout counts from).
    pub enqueued: f64,
    pub deadline: f64,
    /// The pipeline stage it is at.
    pub stage: usize,
    /// Sum of the accuracies of the variants that served its earlier stages.
    pub accuracy_sum: f64,
    /// Their product, as fractions.
    pub accuracy_product: f64,
    /// The sum of their accuracies normalised within their stages (see `SimReport`).
    pub accuracy_normalised: f64,
}

#[derive(Debug, Clone)]
pub(crate) struct SimWorker {
    /// Its identity in the plan, as on an agent.
    pub key: WorkerKey,
    pub variant: usize,
    pub batch: u32,
    /// Batcher timeout, seconds.
    pub max_delay: f64,
    /// Requests per second the plan sends this worker.
    pub share: f64,
    /// When its model is loaded and it can serve.
    pub ready_at: f64,
    /// The memory the plan gives it, bytes (held from `loads_from` until it has retired and
    /// drained).
    pub memory_bytes: u64,
    /// When its model begins to load: its start, or once the workers it waits for to make
    /// room have stopped.
    pub loads_from: f64,
    /// When it stops taking requests (infinite while it is part of the plan).
    pub retire_at: f64,
    /// The quota, in whole cores (see [`SimWorker::resize`]).
    cores_now: u32,
    queue: VecDeque<Request>,
    pub in_flight: Vec<Request>,
    /// When the batch in flight started.
    started_at: f64,
    shedder: Shedder,
    /// The batcher timeout currently armed, if any.
    pub wake_at: Option<f64>,
    /// An in-place resize down that waits until the workers that take over are ready.
    pub pending: Option<PendingResize>,
    /// Of a variant that writes tokens.
    generation: Option<Generation>,
    /// The batches it served since the planner last took them (the latest
    /// [`profile_correction::WINDOW`]), as an agent reports them.
    served: VecDeque<ServedBatch>,
    /// When its last batch ended; the batch in flight's cores and whether it started from idle.
    last_done: Option<f64>,
    started_cores: u32,
    after_idle: bool,
}

/// A worker that writes tokens: the cost it has learned from its batches, as an agent's
/// worker learns it, and what each request of the batch in flight may write.
#[derive(Debug, Clone)]
struct Generation {
    max_tokens: u32,
    refuse_unfinished: bool,
    cost: TokenCost,
    /// In `in_flight`'s order.
    budgets: Vec<u32>,
}

/// A new quota for a worker, taking effect at `at`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PendingResize {
    pub at: f64,
    pub cores: u32,
}

/// What a worker does next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Next {
    Idle,
    /// A batch of this many requests started; it completes after its service time.
    Started(usize),
    /// Wait for the batch to fill until this time.
    WakeAt(f64),
}

impl SimWorker {
    pub fn new(variant: usize, cores: u32, batch: u32, max_delay: f64, share: f64, ready_at: f64) -> Self {
        Self {
            key: WorkerKey { task: String::new(), stage: String::new(), variant: String::new(), replica: 0 },
            variant,
            cores_now: cores,
            batch: batch.max(1),
            max_delay,
            share,
            ready_at,
            memory_bytes: 0,
            loads_from: f64::NEG_INFINITY,
            retire_at: f64::INFINITY,
            queue: VecDeque::new(),
            in_flight: Vec::new(),
            started_at: 0.0,
            shedder: Shedder::default(),
            wake_at: None,
            pending: None,
            generation: None,
            served: VecDeque::new(),
            last_done: None,
            started_cores: cores,
            after_idle: false,
        }
    }

    /// The batches served since the last call, as an agent's telemetry carries them.
    pub fn take_served(&mut self) -> Vec<ServedBatch> {
        std::mem::take(&mut self.served).into()
    }

    /// A worker of a variant that writes tokens as `generate` says.
    pub fn generating(mut self, generate: Option<&SimGenerate>) -> Self {
        self.generation = generate.map(|g| Generation {
            max_tokens: g.max_tokens.max(1),
            refuse_unfinished: g.refuse_unfinished,
            cost: TokenCost::default(),
            budgets: Vec::new(),
        });
        self
    }

    /// The decoder steps of the batch in flight (its longest budget); 0 for a worker that
    /// writes no tokens.
    pub fn steps(&self) -> u32 {
        self.generation.as_ref().and_then(|g| g.budgets.iter().copied().max()).unwrap_or(0)
    }

    pub fn serving(&self, t: f64) -> bool {
        self.ready_at <= t && t < self.retire_at
    }

    /// Retired and nothing left to do: its cores are free.
    pub fn gone(&self, t: f64) -> bool {
        t >= self.retire_at && self.queue.is_empty() && self.in_flight.is_empty()
    }

    /// By when a retired worker has served or shed what it holds: the latest deadline among
    /// its requests, or its retirement.
    pub fn drained_by(&self) -> f64 {
        self.queue.iter().chain(&self.in_flight).map(|r| r.deadline).fold(self.retire_at, f64::max)
    }

    pub fn cores(&self) -> u32 {
        self.cores_now
    }

    /// Resizes in place: batches take another time now, so the estimate is dropped (as the
    /// agent's queue does).
    pub fn resize(&mut self, cores: u32) {
        self.cores_now = cores;
        self.shedder.forget();
    }

    /// Requests queued due no later than `deadline`: those a request due then waits behind.
    fn ahead(&self, deadline: f64) -> usize {
        self.queue.iter().rposition(|q| q.deadline <= deadline).map_or(0, |i| i + 1)
    }

    /// What the worker would say to `r` at `t`, as an agent's queue says it
    /// (`DeadlineQueue::offer`): whether it would queue it, and when it would be done.
    pub fn offer(&self, r: &Request, t: f64, accuracy: f64) -> Offer {
        let ahead = self.ahead(r.deadline);
        let admits = self.shedder.admit(t, ahead, r.deadline) == Admission::Admit;
        Offer { accuracy, admits, finish_s: self.shedder.finish(t, ahead).map(|at| at - t) }
    }

    /// Queues a request in deadline order (arrivals usually come in deadline order: a push at
    /// the back), unless the agent's rule refuses it at `t`: then it is given back.
    pub fn enqueue(&mut self, r: Request, t: f64) -> Result<(), Request> {
        let ahead = self.ahead(r.deadline);
        if self.shedder.admit(t, ahead, r.deadline) != Admission::Admit {
            return Err(r);
        }
        self.queue.insert(ahead, r);
        Ok(())
    }

    /// Sheds the requests that could not finish with a batch started now (returned), then
    /// starts a batch if the worker is free and the batch is full or has waited long enough.
    pub fn try_start(&mut self, t: f64, expired: &mut Vec<Request>) -> Next {
        if !self.in_flight.is_empty() {
            return Next::Idle;
        }
        let cutoff = self.shedder.cutoff(t);
        while let Some(&r) = self.queue.front() {
            if r.deadline <= cutoff {
                expired.push(r);
                self.queue.pop_front();
            } else {
                break;
            }
        }
        let Some(oldest) = self.queue.iter().map(|r| r.enqueued).reduce(f64::min) else { return Next::Idle };
        let due = oldest + self.max_delay;
        if self.queue.len() >= self.batch as usize || t + 1e-12 >= due || self.batch == 1 {
            let k = self.queue.len().min(self.batch as usize);
            self.in_flight.extend(self.queue.drain(..k));
            self.started_at = t;
            self.started_cores = self.cores_now;
            self.after_idle = self.last_done.is_none_or(|d| t - d > profile_correction::IDLE_GAP.as_secs_f64());
            if let Some(g) = &mut self.generation {
                let left = |r: &Request| Duration::from_secs_f64((r.deadline - t).max(0.0));
                g.budgets = self.in_flight.iter().map(|r| g.cost.affordable(left(r), g.max_tokens)).collect();
            }
            self.wake_at = None;
            Next::Started(k)
        } else {
            self.wake_at = Some(due);
            Next::WakeAt(due)
        }
    }

    /// The batch in flight finished at `t`: its requests answered, and the estimate updated.
    /// A request whose text was cut short is moved to `refused` when its task refuses
    /// unfinished texts (the model's own end token is not simulated: a text runs to its
    /// budget).
    pub fn finish(&mut self, t: f64, refused: &mut Vec<Request>) -> Vec<Request> {
        let mut batch = std::mem::take(&mut self.in_flight);
        let size = batch.len();
        let mut took = Duration::from_secs_f64((t - self.started_at).max(0.0));
        if let Some(g) = &mut self.generation {
            let steps = g.budgets.iter().copied().max().unwrap_or(0);
            g.cost.observe(steps as usize, took);
            took = g.cost.shedding_time(took, g.refuse_unfinished);
            if g.refuse_unfinished {
                let budgets = std::mem::take(&mut g.budgets);
                let (kept, cut): (Vec<_>, Vec<_>) =
                    batch.into_iter().zip(budgets).partition(|(_, b)| *b >= g.max_tokens);
                refused.extend(cut.into_iter().map(|(r, _)| r));
                batch = kept.into_iter().map(|(r, _)| r).collect();
            }
            g.budgets.clear();
        }
        if self.served.len() == profile_correction::WINDOW {
            self.served.pop_front();
        }
        // Its own time, not the shedder's (which counts a text cut short as the whole).
        let ran = (t - self.started_at).max(0.0);
        self.served.push_back(ServedBatch {
            batch: size as u32,
            millicores: self.started_cores.saturating_mul(1000),
            run_ms: ran * 1e3,
            size: 0,
            after_idle: self.after_idle,
        });
        self.last_done = Some(t);
        self.shedder.record(size, took.as_secs_f64(), t);
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(arrival: f64, deadline: f64) -> Request {
        Request {
            task: 0,
            arrival,
            enqueued: arrival,
            deadline,
            stage: 0,
            accuracy_sum: 0.0,
            accuracy_product: 1.0,
            accuracy_normalised: 0.0,
        }
    }

    #[test]
    fn a_batch_starts_when_full_or_when_the_oldest_has_waited_long_enough() {
        let mut w = SimWorker::new(0, 1, 3, 0.05, 1.0, 0.0);
        let mut expired = Vec::new();
        w.enqueue(req(0.0, 1.0), 0.0).unwrap();
        assert_eq!(w.try_start(0.0, &mut expired), Next::WakeAt(0.05));
        w.enqueue(req(0.01, 1.0), 0.01).unwrap();
        w.enqueue(req(0.02, 1.0), 0.02).unwrap();
        assert_eq!(w.try_start(0.02, &mut expired), Next::Started(3));
        w.finish(0.03, &mut expired);
        w.enqueue(req(0.1, 1.0), 0.1).unwrap();
        assert_eq!(w.try_start(0.15, &mut expired), Next::Started(1), "timeout: a partial batch goes");
    }

    #[test]
    fn expired_requests_are_dropped_and_the_most_urgent_goes_first() {
        let mut w = SimWorker::new(0, 1, 1, 0.0, 1.0, 0.0);
        let mut expired = Vec::new();
        w.enqueue(req(0.0, 0.1), 0.0).unwrap();
        w.enqueue(req(0.0, 0.5), 0.0).unwrap();
        w.enqueue(req(0.0, 0.3), 0.0).unwrap();
        assert_eq!(w.try_start(0.2, &mut expired), Next::Started(1));
        assert_eq!(expired, vec![req(0.0, 0.1)]);
        assert_eq!(w.in_flight, vec![req(0.0, 0.3)]);
    }

    #[test]
    fn after_a_batch_it_refuses_and_sheds_by_the_agents_rule() {
        let mut w = SimWorker::new(0, 1, 1, 0.0, 1.0, 0.0);
        let mut expired = Vec::new();
        w.enqueue(req(0.0, 10.0), 0.0).unwrap();
        assert_eq!(w.try_start(0.0, &mut expired), Next::Started(1));
        assert_eq!(w.finish(0.2, &mut expired).len(), 1, "a batch takes 0.2 s");
        assert_eq!(w.enqueue(req(0.2, 0.3), 0.2), Err(req(0.2, 0.3)), "its budget is shorter than a batch");
        w.enqueue(req(0.2, 0.52), 0.2).unwrap();
        assert!(w.enqueue(req(0.2, 0.55), 0.2).is_err(), "one ahead: 0.4 s of work in 0.35 s");
        w.enqueue(req(0.2, 0.45), 0.2).unwrap();
        // At 0.3 the one due at 0.45 could not finish (0.5) and is shed; the one due at 0.52 runs.
        assert_eq!(w.try_start(0.3, &mut expired), Next::Started(1));
        assert_eq!(expired, vec![req(0.2, 0.45)]);
        w.resize(2);
        assert!(w.enqueue(req(0.3, 0.31), 0.3).is_ok(), "resized: the estimate is forgotten");
    }
}
