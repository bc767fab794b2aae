//! The latency model: from a variant's profile to what one worker at (cores, batch) carries and
//! how late its requests can be.
//!
//! A worker running batch `b` on `c` cores is planned to carry `u · h(b, c)` requests per
//! second (`u` < 1 leaves room for Poisson bursts; InfAdapter uses 0.8). Its batcher waits at
//! most the time a batch takes to fill at that rate, `q(b) = (b − 1) / (u · h(b, c))` (IPA's
//! queueing term), so a request is served within `q(b) + 2 · l99(b, c)` in the worst case the
//! planner plans for: it waits for its batch to fill, then for the batch in progress, then for
//! its own. Points come from the profile grid, measured or interpolated, never extrapolated.

use serde::{Deserialize, Serialize};

use crate::profile::ProfileGrid;

/// How the planner turns a profile into capacity.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencyModel {
    /// Share of the measured saturation throughput a worker is planned to carry.
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
    /// Worst-case latency the planner assumes for a request, in ms.
    pub latency_bound_ms: f64,
    /// Whether the profile was interpolated here rather than measured.
    pub interpolated: bool,
}

impl LatencyModel {
    /// The point at (cores, batch) if the grid covers it; `None` outside the measured range.
    /// The caller checks the bound against its latency budget.
    pub fn point(&self, grid: &ProfileGrid, cores: u32, batch: u32) -> Option<OperatingPoint> {
        let e = grid.estimate(cores, batch)?;
        let capacity_rps = self.utilisation * e.throughput_rps;
        if capacity_rps <= 0.0 || !capacity_rps.is_finite() {
            return None;
        }
        let max_delay_ms = if batch <= 1 { 0 } else { ((batch - 1) as f64 * 1000.0 / capacity_rps).ceil() as u32 };
        Some(OperatingPoint {
            cores,
            batch,
            max_delay_ms,
            capacity_rps,
            latency_bound_ms: max_delay_ms as f64 + 2.0 * e.latency_p99_ms,
            interpolated: e.interpolated,
        })
    }
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
        };
        ProfileGrid::new(&[p(1, 1, 40.0, 25.0), p(1, 4, 100.0, 40.0), p(2, 1, 20.0, 50.0), p(2, 4, 50.0, 80.0)])
    }

    #[test]
    fn batch_one_waits_for_nothing() {
        let op = LatencyModel::default().point(&grid(), 1, 1).unwrap();
        assert_eq!(op.max_delay_ms, 0);
        assert_eq!(op.latency_bound_ms, 80.0);
        assert!((op.capacity_rps - 20.0).abs() < 1e-9);
        assert!(!op.interpolated);
    }

    #[test]
    fn a_batch_waits_as_long_as_it_takes_to_fill_at_the_planned_rate() {
        // 0.8 × 40 = 32 req/s: 3 more requests take 93.75 ms → 94 ms, then 2 × 100 ms.
        let op = LatencyModel::default().point(&grid(), 1, 4).unwrap();
        assert_eq!(op.max_delay_ms, 94);
        assert_eq!(op.latency_bound_ms, 294.0);
    }

    #[test]
    fn unmeasured_points_are_flagged_and_outside_points_refused() {
        let op = LatencyModel::default().point(&grid(), 2, 2).unwrap();
        assert!(op.interpolated);
        assert!(LatencyModel::default().point(&grid(), 3, 1).is_none());
    }
}
