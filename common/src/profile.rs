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
/// The largest input size a profile point may name (elements of one sample).
pub const MAX_PROFILE_SIZE: u64 = 1 << 40;
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
        if q.output_tokens > crate::text::MAX_GENERATED {
            return Err(format!(
                "profile point writing {} tokens: at most {}",
                q.output_tokens,
                crate::text::MAX_GENERATED
            ));
        }
        if q.resident_bytes > crate::memory::MAX_NODE_BYTES {
            return Err(format!("profile point with {} bytes resident: more than a node may have", q.resident_bytes));
        }
        if q.size > MAX_PROFILE_SIZE {
            return Err(format!("profile point at input size {}: at most {MAX_PROFILE_SIZE} elements", q.size));
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

    /// The grid as the machine runs now: every latency × `factor`, every throughput ÷ it
    /// (`crate::profile_correction`; 1 leaves it as profiled).
    pub fn corrected(&self, factor: f64) -> Self {
        if factor == 1.0 || !(factor.is_finite() && factor > 0.0) {
            return self.clone();
        }
        let cells = self
            .cells
            .iter()
            .map(|(k, c)| (*k, Cell { p50: c.p50 * factor, p99: c.p99 * factor, tput: c.tput / factor }))
            .collect();
        Self { cells, cores: self.cores.clone(), batches: self.batches.clone() }
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

/// How a stage's requests are spread over input sizes: (size, share) with the shares summing
/// to 1, sizes ascending. A size is the element count of one sample of the stage's first input.
pub type SizeMix = Vec<(u64, f64)>;

/// The fastest growth with the input size assumed beyond the largest size measured: time ∝
/// size³.
const MAX_SIZE_GROWTH: f64 = 3.0;

/// Steps per doubling of the size buckets requests are counted in.
const SIZE_STEPS_PER_DOUBLING: f64 = 8.0;

/// The bucket a request of `size` elements is counted in: `size` rounded up to the next
/// power of 2^(1/8) (at most about 9 % above it), so that a stage's sizes make a short list.
pub fn size_bucket(size: u64) -> u64 {
    if size <= 1 {
        return size;
    }
    // The smallest edge ⌈2^(k/8)⌉ at or above `size`, from just below its step.
    let edge = |k: f64| 2f64.powf(k / SIZE_STEPS_PER_DOUBLING).ceil() as u64;
    let mut k = ((size as f64).log2() * SIZE_STEPS_PER_DOUBLING).floor() - 1.0;
    while edge(k) < size {
        k += 1.0;
    }
    edge(k)
}

/// Counts per size made a mix (sizes ascending, shares of the total); empty without counts.
pub fn size_mix(counts: &BTreeMap<u64, f64>) -> SizeMix {
    let total: f64 = counts.values().filter(|c| c.is_finite() && **c > 0.0).sum();
    if total <= 0.0 {
        return Vec::new();
    }
    counts.iter().filter(|(_, c)| c.is_finite() && **c > 0.0).map(|(&s, &c)| (s, c / total)).collect()
}

/// A profile as the planner uses it for one size mix: one point per (cores, batch).
#[derive(Debug, Clone, PartialEq)]
pub struct AtMix {
    pub points: Vec<ProfilePoint>,
    /// The largest size observed beyond the largest size measured, with that size: its
    /// figures are extrapolated (see [`points_at_mix`]).
    pub beyond: Option<(u64, u64)>,
}

/// A generating stage's profile for requests that write `tokens` each: per (cores, batch,
/// size), its points measured at several output lengths (`output_tokens`) give the time per
/// request and the latencies at `tokens` along the line through the two nearest lengths (the
/// cost per written token, extended beyond the lengths measured). A group measured at one
/// length is taken as it is; points of no output length (other stages) pass through.
pub fn points_at_output(points: &[ProfilePoint], tokens: u32) -> Vec<ProfilePoint> {
    let mut groups: BTreeMap<(u32, u32, u64), Vec<&ProfilePoint>> = BTreeMap::new();
    let mut out = Vec::new();
    for p in points {
        if p.output_tokens == 0 {
            out.push(*p);
        } else {
            groups.entry((p.cores, p.batch, p.size)).or_default().push(p);
        }
    }
    for mut group in groups.into_values() {
        group.sort_by_key(|p| p.output_tokens);
        group.dedup_by_key(|p| p.output_tokens);
        let at = match group.len() {
            1 => *group[0],
            n => {
                // The segment holding `tokens`, or the nearest one at either end.
                let j = group.iter().position(|p| p.output_tokens >= tokens).unwrap_or(n - 1).clamp(1, n - 1);
                let (a, b) = (group[j - 1], group[j]);
                let f = (f64::from(tokens) - f64::from(a.output_tokens))
                    / (f64::from(b.output_tokens) - f64::from(a.output_tokens));
                let line = |x: f64, y: f64| (x + (y - x) * f).max(1e-6);
                let per_request = line(1.0 / a.throughput_rps.max(1e-9), 1.0 / b.throughput_rps.max(1e-9));
                ProfilePoint {
                    latency_p50_ms: line(a.latency_p50_ms, b.latency_p50_ms),
                    latency_p99_ms: line(a.latency_p99_ms, b.latency_p99_ms),
                    throughput_rps: 1.0 / per_request,
                    ..*a
                }
            }
        };
        out.push(ProfilePoint { output_tokens: 0, ..at });
    }
    out
}

/// What a profile measured at several input sizes says for requests of `mix`: per (cores,
/// batch) measured at every size it needs, the throughput of a worker serving the mix (its
/// time per request the mix's mean of the sizes'), the p50 at the mix's median size and the
/// p99 at its 99th-percentile size (so a small share of large inputs sets the tail).
///
/// Between measured sizes the time per request is interpolated linearly in the size; below
/// the smallest measured size, the smallest's figures hold; above the largest, the figures
/// grow with the size at the rate the two largest measured sizes show (at least in
/// proportion, with one size measured), and [`AtMix::beyond`] says so. Points measured at
/// no particular size (0: at the variant's `input_shape`) count as `default_size`. Without a
/// mix, or a profile of one size, the profile holds as it is.
pub fn points_at_mix(points: &[ProfilePoint], default_size: u64, mix: &[(u64, f64)]) -> AtMix {
    if points.is_empty() {
        return AtMix { points: Vec::new(), beyond: None };
    }
    let size_of = |p: &ProfilePoint| if p.size == 0 { default_size } else { p.size };
    let mut sizes: Vec<u64> = points.iter().map(size_of).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mix: Vec<(u64, f64)> = mix.iter().copied().filter(|(s, w)| *s > 0 && *w > 0.0 && w.is_finite()).collect();
    if mix.is_empty() {
        // Without a mix: the profile at the variant's own size, or else at the largest measured.
        let at = if points.iter().any(|p| size_of(p) == default_size) {
            default_size
        } else {
            sizes.last().copied().unwrap_or(default_size)
        };
        let points = points.iter().filter(|p| size_of(p) == at).map(|p| ProfilePoint { size: 0, ..*p }).collect();
        return AtMix { points, beyond: None };
    }
    // Requests are counted in buckets up to 9 % above their size: a bucket that holds a
    // measured size is taken at that size.
    let mix: Vec<(u64, f64)> =
        mix.into_iter().map(|(s, w)| (sizes.iter().copied().find(|&m| size_bucket(m) == s).unwrap_or(s), w)).collect();
    let cells: BTreeMap<(u32, u32, u64), ProfilePoint> =
        points.iter().map(|p| ((p.cores, p.batch, size_of(p)), *p)).collect();
    let largest = *sizes.last().expect("a profile has points");
    let observed_max = mix.iter().map(|(s, _)| *s).max().unwrap_or(0);
    let quantile = |q: f64| -> u64 {
        let mut acc = 0.0;
        for &(s, w) in &mix {
            acc += w;
            if acc >= q - 1e-9 {
                return s;
            }
        }
        mix.last().map_or(0, |(s, _)| *s)
    };
    let (median, tail) = (quantile(0.5), quantile(0.99));
    let total_weight: f64 = mix.iter().map(|(_, w)| w).sum();
    let mut pairs: Vec<(u32, u32)> = points.iter().map(|p| (p.cores, p.batch)).collect();
    pairs.sort_unstable();
    pairs.dedup();
    let mut out = Vec::new();
    for (cores, batch) in pairs {
        // The figures at `size` from the sizes measured at this (cores, batch): time per
        // request (1 / throughput) and latencies, each linear in the size between them.
        let at = |size: u64| -> Option<(f64, f64, f64)> {
            let measured: Vec<(u64, &ProfilePoint)> =
                sizes.iter().filter_map(|&s| cells.get(&(cores, batch, s)).map(|p| (s, p))).collect();
            let figures = |p: &ProfilePoint| (1.0 / p.throughput_rps, p.latency_p50_ms, p.latency_p99_ms);
            let first = measured.first()?;
            if size <= first.0 {
                return Some(figures(first.1));
            }
            if let Some(w) = measured.windows(2).find(|w| w[0].0 <= size && size <= w[1].0) {
                let t = (size - w[0].0) as f64 / (w[1].0 - w[0].0) as f64;
                let (a, b) = (figures(w[0].1), figures(w[1].1));
                let lerp = |x: f64, y: f64| x + (y - x) * t;
                return Some((lerp(a.0, b.0), lerp(a.1, b.1), lerp(a.2, b.2)));
            }
            // Beyond the largest: grow as the two largest grow, at least in proportion.
            let (top_size, top) = *measured.last()?;
            let exponent = match measured.len() {
                n if n >= 2 => {
                    let (below_size, below) = measured[n - 2];
                    let growth =
                        (top.latency_p99_ms / below.latency_p99_ms).ln() / (top_size as f64 / below_size as f64).ln();
                    // At least in proportion, at most cubic: two sizes close together can
                    // show any growth.
                    if growth.is_finite() {
                        growth.clamp(1.0, MAX_SIZE_GROWTH)
                    } else {
                        MAX_SIZE_GROWTH
                    }
                }
                _ => 1.0,
            };
            let scale = (size as f64 / top_size as f64).powf(exponent);
            let f = figures(top);
            Some((f.0 * scale, f.1 * scale, f.2 * scale))
        };
        let mut per_request_s = 0.0;
        let mut complete = true;
        for &(s, w) in &mix {
            match at(s) {
                Some(f) => per_request_s += f.0 * w / total_weight,
                None => complete = false,
            }
        }
        let (Some(mid), Some(high)) = (at(median), at(tail)) else { continue };
        // A p50 of 0 stands for "not measured" (the grid takes the p99 for it).
        let finite =
            [per_request_s, high.2].iter().all(|x| x.is_finite() && *x > 0.0) && mid.1.is_finite() && mid.1 >= 0.0;
        if !complete || !finite {
            continue;
        }
        out.push(ProfilePoint {
            cores,
            batch,
            latency_p50_ms: mid.1,
            latency_p99_ms: high.2,
            throughput_rps: 1.0 / per_request_s,
            size: 0,
            output_tokens: 0,
            resident_bytes: 0,
        });
    }
    AtMix { points: out, beyond: (observed_max > largest).then_some((observed_max, largest)) }
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
                size: 0,
                output_tokens: 0,
                resident_bytes: 0,
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
    /// The memory its replica's container was given ("1.25G").
    #[serde(rename = "MEM", default)]
    mem: Option<String>,
}

/// InfAdapter's published TF-Serving profiles (`infadapter-capacity-tfserving.csv`) as grids,
/// one per architecture (`resnet18`, …), from the runs at `slo_ms`. TF-Serving serves one
/// request at a time per worker at batch 1, so a worker is modelled as a server of rate
/// `saturation_tp`: its service time is 1/`saturation_tp` (the CSV's p99 includes queueing at
/// the tested rate, which the simulator adds itself). A point's resident memory is the memory
/// the replica's container was given (`MEM`, the same for every core count of an
/// architecture): the paper publishes no measured peak.
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
            size: 0,
            output_tokens: 0,
            resident_bytes: row.mem.as_deref().and_then(|m| crate::memory::parse_size(m).ok()).unwrap_or(0),
        });
    }
    if out.is_empty() {
        return Err(ProfileCsvError::Empty { slo_ms });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_generating_stage_costs_what_its_output_length_does() {
        // 20 ms to the first token, 10 ms per further token, batch 1, one core.
        let at = |tokens: u32| ProfilePoint {
            cores: 1,
            batch: 1,
            latency_p50_ms: 10.0 + 10.0 * f64::from(tokens),
            latency_p99_ms: 12.0 + 12.0 * f64::from(tokens),
            throughput_rps: 1000.0 / (10.0 + 10.0 * f64::from(tokens)),
            size: 0,
            output_tokens: tokens,
            resident_bytes: 0,
        };
        let points = [at(1), at(32)];
        for (tokens, p50) in [(1, 20.0), (8, 90.0), (32, 330.0), (64, 650.0)] {
            let p = points_at_output(&points, tokens);
            assert_eq!(p.len(), 1);
            assert!((p[0].latency_p50_ms - p50).abs() < 1e-9, "{tokens} tokens: {:?}", p[0]);
            assert!((p[0].throughput_rps - 1000.0 / p50).abs() < 1e-9, "{tokens} tokens: {:?}", p[0]);
            assert_eq!(p[0].output_tokens, 0);
        }
        // Other stages' points pass through; one length measured is taken as it is.
        let other = ProfilePoint { output_tokens: 0, ..at(1) };
        assert_eq!(points_at_output(&[other], 8), vec![other]);
        assert_eq!(points_at_output(&[at(32)], 8), vec![ProfilePoint { output_tokens: 0, ..at(32) }]);
    }

    use super::*;

    fn point(cores: u32, batch: u32, p99: f64, tput: f64) -> ProfilePoint {
        ProfilePoint {
            cores,
            batch,
            latency_p50_ms: p99,
            latency_p99_ms: p99,
            throughput_rps: tput,
            size: 0,
            output_tokens: 0,
            resident_bytes: 0,
        }
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
    fn a_corrected_grid_is_slower_by_its_factor_everywhere() {
        let slow = grid().corrected(1.2);
        for (cores, batch) in [(1, 1), (4, 4), (2, 2)] {
            let (was, now) = (grid().estimate(cores, batch).unwrap(), slow.estimate(cores, batch).unwrap());
            assert!((now.latency_p99_ms / was.latency_p99_ms - 1.2).abs() < 1e-9, "{cores} {batch}");
            assert!((now.throughput_rps * 1.2 / was.throughput_rps - 1.0).abs() < 1e-9, "{cores} {batch}");
        }
        assert_eq!(grid().corrected(1.0), grid());
        assert_eq!(grid().corrected(f64::NAN), grid(), "nonsense leaves it as profiled");
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
        assert_eq!(r18[1].resident_bytes, 1 << 30, "the memory its replica was given");
        assert!(matches!(load_tfserving_csv(csv.as_bytes(), 123), Err(ProfileCsvError::Empty { .. })));
    }

    fn sized(cores: u32, size: u64, p99: f64, tput: f64) -> ProfilePoint {
        ProfilePoint { size, ..point(cores, 1, p99, tput) }
    }

    #[test]
    fn sizes_are_counted_in_buckets_a_step_of_2_to_the_1_8_apart() {
        for size in [2u64, 3, 9, 100, 150_528, 1 << 20, 999_999_937] {
            let b = size_bucket(size);
            assert!(b >= size && (b as f64) <= size as f64 * 1.0906 + 1.0, "{size} → {b}");
            assert_eq!(size_bucket(b), b, "a bucket is its own bucket");
        }
        assert_eq!((size_bucket(0), size_bucket(1), size_bucket(8)), (0, 1, 8));
        let mix = size_mix(&BTreeMap::from([(100, 3.0), (400, 1.0), (7, 0.0)]));
        assert_eq!(mix, vec![(100, 0.75), (400, 0.25)]);
        assert!(size_mix(&BTreeMap::new()).is_empty());
    }

    #[test]
    fn a_profile_of_several_sizes_answers_for_the_mix_of_sizes_requests_come_in() {
        // 100 elements: 10 ms, 100/s; 400 elements: 40 ms, 25/s (on 1 core); the variant's
        // own size is 100.
        let points = vec![sized(1, 100, 10.0, 100.0), sized(1, 400, 40.0, 25.0)];
        let at = |mix: &[(u64, f64)]| points_at_mix(&points, 100, mix);
        let only =
            |a: AtMix| (a.points[0].latency_p50_ms, a.points[0].latency_p99_ms, a.points[0].throughput_rps, a.beyond);
        assert_eq!(only(at(&[])), (10.0, 10.0, 100.0, None), "no mix: the variant's own size");
        assert_eq!(only(at(&[(100, 1.0)])), (10.0, 10.0, 100.0, None));
        // Counted in its bucket (up to 9 % above), a measured size is still that size.
        assert_eq!(only(at(&[(size_bucket(400), 1.0)])), (40.0, 40.0, 25.0, None));
        assert_eq!(only(at(&[(50, 1.0)])), (10.0, 10.0, 100.0, None), "smaller: no faster than measured");
        let (p50, p99, tput, _) = only(at(&[(250, 1.0)]));
        assert!((p99 - 25.0).abs() < 1e-9 && (tput - 40.0).abs() < 1e-9 && (p50 - 25.0).abs() < 1e-9);
        // Half small, half large: the large set the tail, the mean time per request the rate.
        let (p50, p99, tput, _) = only(at(&[(100, 0.5), (400, 0.5)]));
        assert_eq!((p50, p99), (10.0, 40.0));
        assert!((tput - 40.0).abs() < 1e-9, "{tput}");
        // 2 % large: still the tail.
        assert_eq!(only(at(&[(100, 0.98), (400, 0.02)])).1, 40.0);
        // Beyond the largest measured: grown as the two largest grow (here in proportion), noted.
        let (_, p99, tput, beyond) = only(at(&[(800, 1.0)]));
        assert!((p99 - 80.0).abs() < 1e-9 && (tput - 12.5).abs() < 1e-9);
        assert_eq!(beyond, Some((800, 400)));
        // Grown faster where the profile grows faster (attention: 4× the size, 16× the time).
        let quadratic = vec![sized(1, 100, 10.0, 100.0), sized(1, 400, 160.0, 6.25)];
        assert!((points_at_mix(&quadratic, 100, &[(800, 1.0)]).points[0].latency_p99_ms - 640.0).abs() < 1e-6);
        // A (cores, batch) measured at one size only cannot answer for the other.
        let partial = vec![sized(1, 100, 10.0, 100.0), sized(1, 400, 40.0, 25.0), sized(2, 100, 5.0, 200.0)];
        let mixed = points_at_mix(&partial, 100, &[(100, 0.5), (400, 0.5)]);
        assert_eq!(mixed.points.len(), 2, "2 cores is measured at 100 only: its figure at 400 is the extrapolation");
        assert!(points_at_mix(&[], 100, &[(100, 1.0)]).points.is_empty());
    }
}
