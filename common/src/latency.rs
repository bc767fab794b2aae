//! The latency model: from a variant's measured profile to the operating points the planner
//! may choose from.
//!
//! A profile holds, for each measured (cores, batch) pair, the batch latency (p50, p99) and the
//! saturated throughput. A worker running batch `b` on `c` cores with a batcher timeout `d`
//! serves a request within `d + 2·l99(b, c)` in the worst case the planner plans for: it waits
//! at most `d` for its batch to fill, then for the batch already in progress, then for its own.
//! Only measured core counts are offered; the planner never extrapolates to a point nobody
//! measured.

use serde::{Deserialize, Serialize};
use tidal_proto::v1::ProfilePoint;

/// How the planner turns a profile into capacity.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencyModel {
    /// Share of the measured saturation throughput a worker is planned to carry
    /// (InfAdapter uses 0.8): the rest absorbs Poisson bursts.
    pub utilisation: f64,
    /// The batcher waits at most this share of the SLO for a batch to fill.
    pub max_delay_share: f64,
}

impl Default for LatencyModel {
    fn default() -> Self {
        Self { utilisation: 0.8, max_delay_share: 0.1 }
    }
}

/// One way to run a variant: cores, batch size, batcher timeout, and what it then carries.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OperatingPoint {
    pub cores: u32,
    pub batch: u32,
    pub max_delay_ms: u32,
    /// Requests per second the planner lets this point carry.
    pub capacity_rps: f64,
    /// Worst-case latency the planner assumes for a request, in ms.
    pub latency_bound_ms: f64,
}

impl LatencyModel {
    /// The batcher timeout for batch `b` under `slo_ms`: none for batch 1 (nothing to wait for).
    pub fn max_delay_ms(&self, batch: u32, slo_ms: u32) -> u32 {
        if batch <= 1 {
            0
        } else {
            ((slo_ms as f64 * self.max_delay_share).round() as u32).max(1)
        }
    }

    /// Evaluates one measured point under an SLO; `None` when it cannot meet the SLO.
    pub fn evaluate(&self, p: &ProfilePoint, slo_ms: u32) -> Option<OperatingPoint> {
        if p.cores == 0 || p.batch == 0 || p.throughput_rps <= 0.0 || p.latency_p99_ms <= 0.0 {
            return None;
        }
        let max_delay_ms = self.max_delay_ms(p.batch, slo_ms);
        let latency_bound_ms = max_delay_ms as f64 + 2.0 * p.latency_p99_ms;
        (latency_bound_ms <= slo_ms as f64).then_some(OperatingPoint {
            cores: p.cores,
            batch: p.batch,
            max_delay_ms,
            capacity_rps: self.utilisation * p.throughput_rps,
            latency_bound_ms,
        })
    }

    /// For each measured core count, the point with the highest capacity that meets the SLO
    /// (ties go to the smaller batch), sorted by cores.
    pub fn operating_points(&self, profile: &[ProfilePoint], slo_ms: u32) -> Vec<OperatingPoint> {
        let mut best: Vec<OperatingPoint> = Vec::new();
        for op in profile.iter().filter_map(|p| self.evaluate(p, slo_ms)) {
            match best.iter_mut().find(|b| b.cores == op.cores) {
                Some(b) => {
                    let better =
                        op.capacity_rps > b.capacity_rps || (op.capacity_rps == b.capacity_rps && op.batch < b.batch);
                    if better {
                        *b = op;
                    }
                }
                None => best.push(op),
            }
        }
        best.sort_by_key(|op| op.cores);
        // A point that carries no more than a cheaper one is never worth its cores.
        let mut kept: Vec<OperatingPoint> = Vec::with_capacity(best.len());
        for op in best {
            if kept.last().is_none_or(|k| op.capacity_rps > k.capacity_rps) {
                kept.push(op);
            }
        }
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(cores: u32, batch: u32, p99: f64, tput: f64) -> ProfilePoint {
        ProfilePoint { cores, batch, latency_p50_ms: p99 * 0.9, latency_p99_ms: p99, throughput_rps: tput }
    }

    #[test]
    fn a_point_whose_bound_exceeds_the_slo_is_not_offered() {
        let m = LatencyModel::default();
        // batch 4: delay 10 ms + 2 × 50 ms = 110 ms > 100 ms.
        assert!(m.evaluate(&point(1, 4, 50.0, 80.0), 100).is_none());
        let op = m.evaluate(&point(1, 1, 40.0, 25.0), 100).unwrap();
        assert_eq!(op.max_delay_ms, 0);
        assert_eq!(op.latency_bound_ms, 80.0);
        assert!((op.capacity_rps - 20.0).abs() < 1e-9);
    }

    #[test]
    fn per_core_count_the_highest_capacity_batch_within_the_slo_wins() {
        let m = LatencyModel::default();
        let profile = [
            point(1, 1, 20.0, 50.0),
            point(1, 4, 60.0, 70.0),
            point(1, 8, 200.0, 90.0), // too slow for a 300 ms SLO
            point(2, 1, 12.0, 90.0),
            point(2, 4, 30.0, 140.0),
        ];
        let ops = m.operating_points(&profile, 300);
        assert_eq!(ops.len(), 2);
        assert_eq!((ops[0].cores, ops[0].batch), (1, 4));
        assert_eq!((ops[1].cores, ops[1].batch), (2, 4));
    }

    #[test]
    fn more_cores_that_carry_no_more_are_dropped() {
        let m = LatencyModel::default();
        let profile = [point(1, 1, 10.0, 100.0), point(2, 1, 10.0, 100.0)];
        let ops = m.operating_points(&profile, 100);
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].cores, 1);
    }
}
