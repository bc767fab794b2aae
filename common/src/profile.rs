//! A variant's measured profile as a grid over (cores, batch), and estimates between its points.
//!
//! Between measured points the grid interpolates: latency linearly in 1/cores (a batch's work
//! divides over the cores) and linearly in the batch size, throughput linearly in both. Outside
//! the measured range it answers nothing: the planner never extrapolates, and every estimate
//! says whether it was measured or interpolated so that a plan can say when it leans on one.

use std::collections::BTreeMap;

use thiserror::Error;
use tidal_proto::v1::{ProfilePoint, VariantProfile};

/// Most cores a profile point may name (the planner allocates per core up to it).
pub const MAX_PROFILE_CORES: u32 = 1024;
/// Most points one variant's profile may hold.
pub const MAX_PROFILE_POINTS: usize = 4096;

/// The one check of a profile, wherever one arrives (`StoreProfile`, the Raft log, a saved
/// file): 1..=[`MAX_PROFILE_POINTS`] points of cores in 1..=[`MAX_PROFILE_CORES`], batch in
/// 1..=[`crate::plan::MAX_BATCH`], and positive finite latencies and throughput.
pub fn validate_profile(p: &VariantProfile) -> Result<(), String> {
    if p.points.is_empty() || p.points.len() > MAX_PROFILE_POINTS {
        return Err(format!("a profile needs 1–{MAX_PROFILE_POINTS} points, not {}", p.points.len()));
    }
    let positive = |x: f64| x.is_finite() && x > 0.0;
    for q in &p.points {
        if !(1..=MAX_PROFILE_CORES).contains(&q.cores) || !(1..=crate::plan::MAX_BATCH).contains(&q.batch) {
            return Err(format!(
                "profile point at {} cores, batch {}: cores must be 1–{MAX_PROFILE_CORES} and batch 1–{}",
                q.cores,
                q.batch,
                crate::plan::MAX_BATCH
            ));
        }
        let p50_ok = q.latency_p50_ms.is_finite() && q.latency_p50_ms >= 0.0;
        if !(positive(q.throughput_rps) && positive(q.latency_p99_ms) && p50_ok) {
            return Err(format!(
                "profile point at {} cores, batch {}: latencies and throughput must be positive and finite",
                q.cores, q.batch
            ));
        }
    }
    Ok(())
}

/// What the grid says about one (cores, batch) pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub throughput_rps: f64,
    /// False when the pair was measured, true when it lies between measured pairs.
    pub interpolated: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Cell {
    p50: f64,
    p99: f64,
    tput: f64,
}

/// Measured cells keyed by (cores, batch), with the measured core counts and batch sizes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileGrid {
    cells: BTreeMap<(u32, u32), Cell>,
    cores: Vec<u32>,
    batches: Vec<u32>,
}

impl ProfileGrid {
    /// Keeps the points that make sense (positive cores, batch, latencies and throughput); a
    /// pair measured twice keeps its last measurement.
    pub fn new(points: &[ProfilePoint]) -> Self {
        let cells = points
            .iter()
            .filter(|p| {
                p.cores > 0
                    && p.batch > 0
                    && p.latency_p99_ms > 0.0
                    && p.throughput_rps > 0.0
                    && p.latency_p99_ms.is_finite()
            })
            .map(|p| {
                let p50 = if p.latency_p50_ms > 0.0 { p.latency_p50_ms } else { p.latency_p99_ms };
                ((p.cores, p.batch), Cell { p50, p99: p.latency_p99_ms, tput: p.throughput_rps })
            })
            .collect::<BTreeMap<_, _>>();
        let mut cores: Vec<u32> = cells.keys().map(|k| k.0).collect();
        cores.dedup();
        let mut batches: Vec<u32> = cells.keys().map(|k| k.1).collect();
        batches.sort_unstable();
        batches.dedup();
        Self { cells, cores, batches }
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Measured core counts, ascending.
    pub fn cores(&self) -> &[u32] {
        &self.cores
    }

    /// Measured batch sizes, ascending.
    pub fn batches(&self) -> &[u32] {
        &self.batches
    }

    /// The estimate at (cores, batch): measured, interpolated from the measured neighbours
    /// around it, or `None` when it lies outside what was measured.
    pub fn estimate(&self, cores: u32, batch: u32) -> Option<Estimate> {
        if let Some(c) = self.cells.get(&(cores, batch)) {
            return Some(Estimate {
                latency_p50_ms: c.p50,
                latency_p99_ms: c.p99,
                throughput_rps: c.tput,
                interpolated: false,
            });
        }
        let (c_lo, c_hi) = bracket(&self.cores, cores)?;
        let (b_lo, b_hi) = bracket(&self.batches, batch)?;
        let at_batch = |c: u32| -> Option<Cell> {
            let lo = self.cells.get(&(c, b_lo))?;
            let hi = self.cells.get(&(c, b_hi))?;
            let t = fraction(b_lo as f64, b_hi as f64, batch as f64);
            Some(lerp_cell(lo, hi, t, t))
        };
        let lo = at_batch(c_lo)?;
        let hi = at_batch(c_hi)?;
        // Latency falls with 1/cores, throughput rises with cores.
        let t_latency = fraction(1.0 / c_lo as f64, 1.0 / c_hi as f64, 1.0 / cores as f64);
        let t_tput = fraction(c_lo as f64, c_hi as f64, cores as f64);
        let cell = lerp_cell(&lo, &hi, t_latency, t_tput);
        Some(Estimate {
            latency_p50_ms: cell.p50,
            latency_p99_ms: cell.p99,
            throughput_rps: cell.tput,
            interpolated: true,
        })
    }
}

/// The measured values either side of `x` (equal when `x` was measured), or `None` outside.
fn bracket(values: &[u32], x: u32) -> Option<(u32, u32)> {
    let hi = *values.iter().find(|&&v| v >= x)?;
    let lo = *values.iter().rev().find(|&&v| v <= x)?;
    Some((lo, hi))
}

fn fraction(lo: f64, hi: f64, x: f64) -> f64 {
    if hi == lo {
        0.0
    } else {
        (x - lo) / (hi - lo)
    }
}

fn lerp_cell(a: &Cell, b: &Cell, t_latency: f64, t_tput: f64) -> Cell {
    let lerp = |x: f64, y: f64, t: f64| x + (y - x) * t;
    Cell { p50: lerp(a.p50, b.p50, t_latency), p99: lerp(a.p99, b.p99, t_latency), tput: lerp(a.tput, b.tput, t_tput) }
}

/// A synthetic profile for tests and examples: on each of `cores`, batch-1 throughput
/// `per_core` per core, a batch `b` (with its efficiency per request relative to batch 1)
/// taking `b / throughput`, and p99 at `tail` × p50.
pub fn synthetic(per_core: f64, cores: &[u32], batches: &[(u32, f64)], tail: f64) -> Vec<ProfilePoint> {
    let mut points = Vec::new();
    for &c in cores {
        for &(b, efficiency) in batches {
            let tput = per_core * c as f64 * efficiency;
            let p50 = 1000.0 * b as f64 / tput;
            points.push(ProfilePoint {
                cores: c,
                batch: b,
                latency_p50_ms: p50,
                latency_p99_ms: p50 * tail,
                throughput_rps: tput,
            });
        }
    }
    points
}

#[derive(Debug, Error)]
pub enum ProfileCsvError {
    #[error("reading the profile CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("the profile CSV has no rows for SLO {slo_ms} ms")]
    Empty { slo_ms: u32 },
}

#[derive(Debug, serde::Deserialize)]
struct TfServingRow {
    #[serde(rename = "ARCH")]
    arch: String,
    #[serde(rename = "CPU")]
    cpu: u32,
    #[serde(rename = "BATCH")]
    batch: u32,
    #[serde(rename = "SLA")]
    sla: u32,
    saturation_tp: Option<f64>,
}

/// InfAdapter's published TF-Serving profiles (`infadapter-capacity-tfserving.csv`) as grids,
/// one per architecture (`resnet18`, …), from the runs at `slo_ms`. TF-Serving serves one
/// request at a time per worker at batch 1, so a worker is modelled as a server of rate
/// `saturation_tp`: its service time is 1/`saturation_tp` (the CSV's p99 includes queueing at
/// the tested rate, which the simulator adds itself).
pub fn load_tfserving_csv(
    reader: impl std::io::Read,
    slo_ms: u32,
) -> Result<BTreeMap<String, Vec<ProfilePoint>>, ProfileCsvError> {
    let mut out: BTreeMap<String, Vec<ProfilePoint>> = BTreeMap::new();
    for row in csv::Reader::from_reader(reader).deserialize::<TfServingRow>() {
        let row = row?;
        let Some(tput) = row.saturation_tp.filter(|t| *t > 0.0) else { continue };
        if row.sla != slo_ms {
            continue;
        }
        let service_ms = 1000.0 / tput;
        out.entry(format!("resnet{}", row.arch)).or_default().push(ProfilePoint {
            cores: row.cpu,
            batch: row.batch,
            latency_p50_ms: service_ms,
            latency_p99_ms: service_ms,
            throughput_rps: tput,
        });
    }
    if out.is_empty() {
        return Err(ProfileCsvError::Empty { slo_ms });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(cores: u32, batch: u32, p99: f64, tput: f64) -> ProfilePoint {
        ProfilePoint { cores, batch, latency_p50_ms: p99, latency_p99_ms: p99, throughput_rps: tput }
    }

    fn grid() -> ProfileGrid {
        ProfileGrid::new(&[
            point(1, 1, 40.0, 25.0),
            point(4, 1, 10.0, 100.0),
            point(1, 4, 120.0, 33.0),
            point(4, 4, 30.0, 133.0),
        ])
    }

    #[test]
    fn measured_points_are_returned_as_measured() {
        let e = grid().estimate(4, 1).unwrap();
        assert!(!e.interpolated);
        assert_eq!(e.latency_p99_ms, 10.0);
    }

    #[test]
    fn between_measured_core_counts_latency_follows_one_over_cores() {
        // 2 cores: 1/2 is a third of the way from 1/1 to 1/4 → 40 − (30)·(2/3) = 20 ms.
        let e = grid().estimate(2, 1).unwrap();
        assert!(e.interpolated);
        assert!((e.latency_p99_ms - 20.0).abs() < 1e-9, "{e:?}");
        assert!((e.throughput_rps - 50.0).abs() < 1e-9, "{e:?}");
    }

    #[test]
    fn between_batches_and_cores_it_interpolates_both() {
        let e = grid().estimate(2, 2).unwrap();
        assert!(e.interpolated);
        assert!(e.latency_p99_ms > 20.0 && e.latency_p99_ms < 60.0, "{e:?}");
    }

    #[test]
    fn it_never_extrapolates() {
        assert!(grid().estimate(5, 1).is_none());
        assert!(grid().estimate(1, 8).is_none());
        assert!(ProfileGrid::new(&[]).estimate(1, 1).is_none());
    }

    #[test]
    fn an_incomplete_grid_does_not_invent_a_corner() {
        let g = ProfileGrid::new(&[point(1, 1, 40.0, 25.0), point(4, 4, 30.0, 133.0)]);
        assert!(g.estimate(2, 2).is_none());
    }

    #[test]
    fn the_published_tfserving_profiles_load() {
        let csv = "REPLICA,HARDWARE,CPU,MEM,ARCH,BATCH,NUM_BATCH_THREADS,MAX_ENQUEUED_BATCHES,INTRA_OP_PARALLELISM,INTER_OP_PARALLELISM,SLA,p99_latency,capacity,saturation_tp,timestamp\n\
            1,cpu,1,1G,18,1,1,1000000,1,1,750,389.09,19,22,x\n\
            1,cpu,2,1G,18,1,1,1000000,1,1,750,695.93,43,49,x\n\
            1,cpu,1,1G,101,1,1,1000000,1,1,750,,5,,x\n\
            1,cpu,1,1G,18,1,1,1000000,1,1,500,361.99,15,22,x\n";
        let profiles = load_tfserving_csv(csv.as_bytes(), 750).unwrap();
        assert_eq!(profiles.len(), 1, "a row without saturation throughput is skipped");
        let r18 = &profiles["resnet18"];
        assert_eq!(r18.len(), 2);
        assert_eq!(r18[1].throughput_rps, 49.0);
        assert!(matches!(load_tfserving_csv(csv.as_bytes(), 123), Err(ProfileCsvError::Empty { .. })));
    }
}
