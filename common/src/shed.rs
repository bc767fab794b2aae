//! Early shedding under overload: the one rule the agent's queue and the simulated worker
//! follow, so that live and simulated runs refuse the same requests.
//!
//! From the batches just run a worker estimates how long a batch takes and what a request
//! costs (an exponentially weighted mean), and
//! - refuses a new request whose deadline falls before the work queued ahead of it (earlier
//!   deadlines) and its own batch can be done ([`Admission::WouldMiss`]), or, when nothing is
//!   queued ahead, whose own budget is too short ([`Admission::BudgetTooShort`], as a
//!   pipeline's later stage finds when the earlier ones took most of it);
//! - sheds a queued request, without running it, once its deadline falls before the batch it
//!   would join could finish ([`Shedder::cutoff`]).
//!
//! The estimate is only trusted while it is fresh (a batch finished within the last second):
//! after an idle spell or a resize only what has expired is shed, until batches run again.
//! Times are seconds on the caller's clock (the agent's from its queue's creation, the
//! simulator's from the replay's start).

/// How long an estimate is trusted without a new batch, seconds.
pub const FRESH_FOR_S: f64 = 1.0;
/// Weight of the newest batch in the estimate.
pub const EWMA_WEIGHT: f64 = 0.3;

/// What the last batches took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServiceEstimate {
    /// When a batch last finished.
    pub at_s: f64,
    /// Time of one batch.
    pub batch_s: f64,
    /// Time per request (a batch's time over its size).
    pub per_request_s: f64,
}

impl ServiceEstimate {
    /// When a request with `ahead` requests before it would be done, starting at `now_s`.
    pub fn finish(&self, now_s: f64, ahead: usize) -> f64 {
        now_s + ahead as f64 * self.per_request_s + self.batch_s
    }
}

/// Whether a new request is queued.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    Admit,
    /// Nothing is queued ahead of it, and its budget is shorter than one batch.
    BudgetTooShort {
        needs_s: f64,
        budget_s: f64,
    },
    /// `ahead` requests with earlier deadlines and its own batch take longer than its budget.
    WouldMiss {
        ahead: usize,
        needs_s: f64,
        budget_s: f64,
    },
}

/// One worker's estimate and the rule that sheds by it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Shedder {
    estimate: Option<ServiceEstimate>,
}

impl Shedder {
    /// The estimate, while it is fresh.
    pub fn fresh(&self, now_s: f64) -> Option<ServiceEstimate> {
        self.estimate.filter(|e| now_s - e.at_s < FRESH_FOR_S)
    }

    /// A batch of `size` requests took `took_s`, finishing at `now_s`.
    pub fn record(&mut self, size: usize, took_s: f64, now_s: f64) {
        let per_request_s = took_s / size.max(1) as f64;
        self.estimate = Some(match self.fresh(now_s) {
            Some(e) => ServiceEstimate {
                at_s: now_s,
                batch_s: e.batch_s + EWMA_WEIGHT * (took_s - e.batch_s),
                per_request_s: e.per_request_s + EWMA_WEIGHT * (per_request_s - e.per_request_s),
            },
            None => ServiceEstimate { at_s: now_s, batch_s: took_s, per_request_s },
        });
    }

    /// Drops the estimate (the worker was resized: its batches take another time now).
    pub fn forget(&mut self) {
        self.estimate = None;
    }

    /// Whether a request due at `deadline_s`, with `ahead` queued requests due no later, is
    /// queued at `now_s`.
    pub fn admit(&self, now_s: f64, ahead: usize, deadline_s: f64) -> Admission {
        let Some(e) = self.fresh(now_s) else { return Admission::Admit };
        let finish = e.finish(now_s, ahead);
        if finish <= deadline_s {
            return Admission::Admit;
        }
        let (needs_s, budget_s) = (finish - now_s, (deadline_s - now_s).max(0.0));
        if ahead == 0 {
            Admission::BudgetTooShort { needs_s, budget_s }
        } else {
            Admission::WouldMiss { ahead, needs_s, budget_s }
        }
    }

    /// When a request with `ahead` requests before it would be done, starting at `now_s`, by
    /// the fresh estimate; `None` without one.
    pub fn finish(&self, now_s: f64, ahead: usize) -> Option<f64> {
        self.fresh(now_s).map(|e| e.finish(now_s, ahead))
    }

    /// Queued requests due at or before this time are shed when a batch is formed at `now_s`:
    /// they could not finish with it.
    pub fn cutoff(&self, now_s: f64) -> f64 {
        self.fresh(now_s).map_or(now_s, |e| e.finish(now_s, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_fresh_estimate_everything_is_admitted_and_only_the_expired_shed() {
        let mut s = Shedder::default();
        assert_eq!(s.admit(0.0, 100, 0.001), Admission::Admit);
        assert_eq!(s.cutoff(5.0), 5.0);
        s.record(1, 0.1, 1.0);
        assert_ne!(s.admit(1.5, 0, 1.55), Admission::Admit);
        assert_eq!(s.admit(2.0, 0, 2.05), Admission::Admit, "a second without a batch: stale");
        s.record(1, 0.1, 3.0);
        s.forget();
        assert_eq!(s.admit(3.1, 0, 3.15), Admission::Admit, "forgotten on a resize");
    }

    #[test]
    fn a_request_is_refused_when_the_work_ahead_and_its_batch_pass_its_deadline() {
        let mut s = Shedder::default();
        s.record(4, 0.2, 10.0); // 0.2 s a batch, 0.05 s a request
        assert_eq!(s.admit(10.0, 0, 10.25), Admission::Admit);
        assert_eq!(s.admit(10.0, 1, 10.25), Admission::Admit);
        match s.admit(10.0, 2, 10.25) {
            Admission::WouldMiss { ahead: 2, needs_s, budget_s } => {
                assert!((needs_s - 0.3).abs() < 1e-9 && (budget_s - 0.25).abs() < 1e-9)
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(s.admit(10.0, 0, 10.1), Admission::BudgetTooShort { .. }));
        assert!((s.cutoff(10.0) - 10.2).abs() < 1e-9);
    }

    #[test]
    fn the_estimate_moves_towards_new_batches_by_its_weight() {
        let mut s = Shedder::default();
        s.record(2, 0.1, 0.0);
        s.record(2, 0.2, 0.5);
        let e = s.fresh(0.5).unwrap();
        assert!((e.batch_s - 0.13).abs() < 1e-9, "{e:?}");
        assert!((e.per_request_s - 0.065).abs() < 1e-9, "{e:?}");
    }
}
