//! The latency model: from a variant's profile to what one worker at (cores, batch) carries and
//! how late its requests can be.
//!
//! A worker serves batches one at a time. At (cores c, batch b) the profile gives the batch
//! latency l(b, c) (p50 and p99) and the saturated throughput h(b, c). Planned at utilisation
//! ρ, the worker carries λ = ρ·h requests per second, and a request is served within
//!
//! ```text
//!   q(b) + W99(ρ) + l99(b, c)
//! ```
//!
//! - q(b) = (b − 1)/λ: waiting for its batch to fill at that rate (IPA's queueing term); the
//!   batcher's timeout is set to it, so a batch never waits longer;
//! - W99(ρ) = S·ln(100ρ)/(2(1 − ρ)) with S = l50(b, c): the 99th percentile of the wait for
//!   the batches ahead, from the exponential tail of a single-server queue with Poisson
//!   arrivals and near-constant service (Kingman's approximation); it grows without bound as ρ
//!   approaches 1, which is why a worker is never planned at saturation;
//! - l99(b, c): its own batch.
//!
//! Each point is offered at the highest utilisation, up to the configured one, that meets the
//! latency budget; a slow worker is thus planned at a lower utilisation rather than not at all.
//! Points come from the profile grid, measured or interpolated, never extrapolated.

use serde::{Deserialize, Serialize};

use crate::profile::{Estimate, ProfileGrid};

/// How the planner turns a profile into capacity.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencyModel {
    /// The highest share of the measured saturation throughput a worker is planned to carry.
    pub utilisation: f64,
}

impl Default for LatencyModel {
    fn default() -> Self {
        Self { utilisation: 0.8 }
    }
}

/// One way to run one worker of a variant: cores, batch size, batcher timeout, and what it
/// then carries.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OperatingPoint {
    pub cores: u32,
    pub batch: u32,
    pub max_delay_ms: u32,
    /// Requests per second the planner lets this worker carry.
    pub capacity_rps: f64,
    /// Worst-case (p99) latency the planner expects for a request at that rate, in ms.
    pub latency_bound_ms: f64,
    /// Planned share of the saturation throughput.
    pub utilisation: f64,
    /// Whether the profile was interpolated here rather than measured.
    pub interpolated: bool,
}

/// Steps of the utilisation ladder.
const UTILISATION_STEP: f64 = 0.1;

impl LatencyModel {
    /// The point at (cores, batch) planned at utilisation `rho`; `None` outside the grid.
    pub fn point_at(&self, grid: &ProfileGrid, cores: u32, batch: u32, rho: f64) -> Option<OperatingPoint> {
        Self::at(&grid.estimate(cores, batch)?, cores, batch, rho)
    }

    fn at(e: &Estimate, cores: u32, batch: u32, rho: f64) -> Option<OperatingPoint> {
        let capacity_rps = rho * e.throughput_rps;
        if !(capacity_rps > 0.0 && capacity_rps.is_finite() && rho < 1.0) {
            return None;
        }
        let max_delay_ms = if batch <= 1 { 0 } else { ((batch - 1) as f64 * 1000.0 / capacity_rps).ceil() as u32 };
        let wait_ms = queueing_p99_ms(e.latency_p50_ms, rho);
        Some(OperatingPoint {
            cores,
            batch,
            max_delay_ms,
            capacity_rps,
            latency_bound_ms: max_delay_ms as f64 + wait_ms + e.latency_p99_ms,
            utilisation: rho,
            interpolated: e.interpolated,
        })
    }

    /// The points at (cores, batch) within `budget_ms`, from the highest utilisation down:
    /// all of them on the ladder (for pipelines, where a stage may trade capacity for
    /// latency), or only the first (for a single stage, where more capacity is all that
    /// counts once the budget is met).
    pub fn points(&self, grid: &ProfileGrid, cores: u32, batch: u32, budget_ms: f64, all: bool) -> Vec<OperatingPoint> {
        let mut out = Vec::new();
        let Some(e) = grid.estimate(cores, batch) else { return out };
        let steps = (self.utilisation / UTILISATION_STEP).floor() as u32;
        for k in 0..steps.max(1) {
            let rho = self.utilisation - k as f64 * UTILISATION_STEP;
            if rho <= 1e-9 {
                break;
            }
            match Self::at(&e, cores, batch, rho) {
                Some(op) if op.latency_bound_ms <= budget_ms => {
                    out.push(op);
                    if !all {
                        break;
                    }
                }
                Some(_) => {}
                None => break,
            }
        }
        out
    }
}

/// The 99th percentile wait behind the batches ahead, for service time `service_ms` at
/// utilisation `rho` (see the module docs).
pub fn queueing_p99_ms(service_ms: f64, rho: f64) -> f64 {
    if rho <= 0.01 {
        return 0.0;
    }
    service_ms * (100.0 * rho).ln() / (2.0 * (1.0 - rho))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidal_proto::v1::ProfilePoint;

    fn grid() -> ProfileGrid {
        let p = |cores, batch, p99, tput| ProfilePoint {
            cores,
            batch,
            latency_p50_ms: p99,
            latency_p99_ms: p99,
            throughput_rps: tput,
            size: 0,
            output_tokens: 0,
            resident_bytes: 0,
        };
        ProfileGrid::new(&[p(1, 1, 40.0, 25.0), p(1, 4, 100.0, 40.0), p(2, 1, 20.0, 50.0), p(2, 4, 50.0, 80.0)])
    }

    #[test]
    fn batch_one_waits_only_behind_the_queue() {
        // S = 40 ms at ρ = 0.8: W99 = 40 · ln 80 / 0.4 ≈ 438 ms, plus 40 ms of its own.
        let op = LatencyModel::default().point_at(&grid(), 1, 1, 0.8).unwrap();
        assert_eq!(op.max_delay_ms, 0);
        assert!((op.latency_bound_ms - (40.0 + 40.0 * 80f64.ln() / 0.4)).abs() < 1e-9, "{op:?}");
        assert!((op.capacity_rps - 20.0).abs() < 1e-9);
        assert!(!op.interpolated);
    }

    #[test]
    fn a_batch_waits_as_long_as_it_takes_to_fill_at_the_planned_rate() {
        // 0.5 × 40 = 20 req/s: 3 more requests take 150 ms.
        let op = LatencyModel::default().point_at(&grid(), 1, 4, 0.5).unwrap();
        assert_eq!(op.max_delay_ms, 150);
        assert!(op.latency_bound_ms > 150.0 + 100.0);
    }

    #[test]
    fn a_tight_budget_plans_a_slow_worker_at_a_lower_utilisation() {
        let m = LatencyModel::default();
        let loose = m.points(&grid(), 1, 1, 10_000.0, false);
        let tight = m.points(&grid(), 1, 1, 150.0, false);
        assert_eq!(loose[0].utilisation, 0.8);
        assert!(tight[0].utilisation < 0.8 && tight[0].latency_bound_ms <= 150.0, "{tight:?}");
        assert!(m.points(&grid(), 1, 1, 30.0, false).is_empty(), "its own batch takes 40 ms");
        let ladder = m.points(&grid(), 1, 1, 10_000.0, true);
        assert_eq!(ladder.len(), 8);
        assert!(ladder.windows(2).all(|w| w[0].capacity_rps > w[1].capacity_rps));
    }

    #[test]
    fn the_queueing_wait_grows_without_bound_towards_saturation() {
        assert_eq!(queueing_p99_ms(10.0, 0.0), 0.0);
        assert!(queueing_p99_ms(10.0, 0.5) < queueing_p99_ms(10.0, 0.8));
        assert!(queueing_p99_ms(10.0, 0.99) > 100.0 * 10.0);
    }

    #[test]
    fn unmeasured_points_are_flagged_and_outside_points_refused() {
        let op = LatencyModel::default().point_at(&grid(), 2, 2, 0.8).unwrap();
        assert!(op.interpolated);
        assert!(LatencyModel::default().point_at(&grid(), 3, 1, 0.8).is_none());
    }
}
