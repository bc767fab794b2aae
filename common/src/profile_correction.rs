//! Profiles that stay true between profilings: the factor by which a variant's served batches
//! run slower (above 1) or faster (below 1) than its profile says at the same cores and batch
//! size, learned from the batches the agents serve (issue 27). The planner multiplies the
//! profile's latencies by it and divides its throughput (`ProfileGrid::corrected`).
//!
//! Robust and bounded: the target is the median ratio of the latest batches (a few stragglers
//! move nothing), nothing is corrected before enough batches, a target within a few percent of
//! the factor leaves it (the machine's own noise is not chased), and one round moves the factor
//! by at most a fixed step, so one odd window cannot swing a plan.

use std::collections::VecDeque;

/// Batch ratios kept per variant: enough for a median that a burst of stragglers cannot move,
/// few enough that a slow-down takes the majority within seconds of serving.
pub const WINDOW: usize = 64;
/// Batches seen before a first correction.
pub const MIN_BATCHES: usize = 8;
/// Most the factor moves in one round, up or down (×/÷).
pub const MAX_STEP: f64 = 1.25;
/// A target within this share of the factor leaves it as it is.
pub const DEADBAND: f64 = 0.05;
/// The factor stays within these: beyond, the profile is wrong, not drifted (profile again).
pub const LIMITS: (f64, f64) = (0.25, 4.0);

/// One variant's correction.
#[derive(Debug, Clone, PartialEq)]
pub struct Correction {
    ratios: VecDeque<f64>,
    factor: f64,
}

impl Default for Correction {
    fn default() -> Self {
        Self { ratios: VecDeque::with_capacity(WINDOW), factor: 1.0 }
    }
}

impl Correction {
    /// One served batch: it took `measured_ms` where the profile says `profiled_ms` (p50 at
    /// its cores and batch size). Nonsense (non-finite or non-positive) is ignored.
    pub fn observe(&mut self, measured_ms: f64, profiled_ms: f64) {
        let ratio = measured_ms / profiled_ms;
        if !(measured_ms > 0.0 && profiled_ms > 0.0 && ratio.is_finite()) {
            return;
        }
        if self.ratios.len() == WINDOW {
            self.ratios.pop_front();
        }
        self.ratios.push_back(ratio);
    }

    /// A planning round: moves the factor toward the latest batches' median ratio, within the
    /// step and the limits, and returns it.
    pub fn round(&mut self) -> f64 {
        if self.ratios.len() < MIN_BATCHES {
            return self.factor;
        }
        let mut sorted: Vec<f64> = self.ratios.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let target = sorted[sorted.len() / 2];
        if (target / self.factor - 1.0).abs() > DEADBAND {
            let step = (target / self.factor).clamp(1.0 / MAX_STEP, MAX_STEP);
            self.factor = (self.factor * step).clamp(LIMITS.0, LIMITS.1);
        }
        self.factor
    }

    /// The factor the planner uses now (1: as profiled).
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// Batches the current window holds.
    pub fn batches(&self) -> usize {
        self.ratios.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(c: &mut Correction, n: usize, ratio: f64) {
        for _ in 0..n {
            c.observe(100.0 * ratio, 100.0);
        }
    }

    #[test]
    fn a_machine_slowed_by_a_fifth_is_planned_for_in_one_round_once_its_batches_say_so() {
        let mut c = Correction::default();
        served(&mut c, WINDOW, 1.0);
        assert_eq!(c.round(), 1.0);
        // Fewer than half the window slow: the median holds.
        served(&mut c, WINDOW / 2 - 1, 1.2);
        assert_eq!(c.round(), 1.0);
        served(&mut c, 2, 1.2);
        assert!((c.round() - 1.2).abs() < 1e-9, "{}", c.factor());
        served(&mut c, WINDOW, 1.0);
        assert!((c.round() - 1.0).abs() < 1e-9, "and back when it recovers: {}", c.factor());
    }

    #[test]
    fn stragglers_noise_and_too_few_batches_move_nothing() {
        let mut c = Correction::default();
        served(&mut c, MIN_BATCHES - 1, 2.0);
        assert_eq!(c.round(), 1.0, "too few batches");
        let mut c = Correction::default();
        served(&mut c, 50, 1.03);
        served(&mut c, 14, 10.0);
        assert_eq!(c.round(), 1.0, "a 3 % drift is noise; 14 stragglers in 64 are stragglers");
        c.observe(f64::NAN, 100.0);
        c.observe(10.0, 0.0);
        c.observe(-1.0, 100.0);
        assert_eq!(c.batches(), WINDOW, "nonsense is not a batch");
    }

    #[test]
    fn a_large_change_is_followed_in_bounded_steps_within_limits() {
        let mut c = Correction::default();
        served(&mut c, WINDOW, 2.0);
        let steps: Vec<f64> = (0..4).map(|_| c.round()).collect();
        assert!((steps[0] - MAX_STEP).abs() < 1e-9, "{steps:?}");
        assert!((steps[1] - MAX_STEP * MAX_STEP).abs() < 1e-9, "{steps:?}");
        assert!((steps[2] / 2.0 - 1.0).abs() <= DEADBAND, "within the dead band in three rounds: {steps:?}");
        assert_eq!(steps[3], steps[2], "and left there: {steps:?}");
        served(&mut c, WINDOW, 100.0);
        for _ in 0..40 {
            c.round();
        }
        assert_eq!(c.factor(), LIMITS.1);
    }
}
