//! Profiles that stay true between profilings: the factor by which a variant's served batches
//! run slower (above 1) or faster (below 1) than its profile says at the same cores and batch
//! size, learned from the batches the agents serve (issue 27). The planner multiplies the
//! profile's latencies by it and divides its throughput (`ProfileGrid::corrected`).
//!
//! Robust and bounded: the target is the median ratio of the latest batches (a few stragglers
//! move nothing), nothing is corrected before enough batches, a target within a few percent of
//! the factor leaves it (the machine's own noise is not chased), and one round moves the factor
//! by at most a fixed step, so one odd window cannot swing a plan.

use std::collections::{BTreeMap, HashSet, VecDeque};

use tidal_proto::v1::{PlanCorrection, ProfilePoint, ServedBatch, TaskSpec};

use crate::profile::ProfileGrid;

/// A worker idle this long before a batch runs it "from idle" (`ServedBatch.after_idle`), as
/// the agent and the simulator mark it: longer than the batcher's own waits for a batch to fill
/// (a few to tens of ms in plans) under a steady load, short enough that a worker picking up
/// sporadic requests is one.
pub const IDLE_GAP: std::time::Duration = std::time::Duration::from_millis(50);

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
    /// A correction that starts at `factor` (within the limits), its window empty: one a
    /// plan carried over.
    pub fn starting_at(factor: f64) -> Self {
        let factor = if factor.is_finite() { factor.clamp(LIMITS.0, LIMITS.1) } else { 1.0 };
        Self { factor, ..Self::default() }
    }

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

/// The corrections of every profiled variant, keyed by (task, variant): what the adaptation
/// core keeps between rounds ([`crate::adapt::Adapter`]).
#[derive(Debug, Default)]
pub struct Corrections {
    by_variant: BTreeMap<(String, String), Learned>,
}

#[derive(Debug)]
struct Learned {
    correction: Correction,
    /// The profile it corrects ([`profile_id`]): a new profile starts again from 1.
    profile: u64,
}

/// What tells one stored profile from another: the log index that stored it (a profile stored
/// again is new, even with the same points), else, outside the replicated state, a digest of
/// its points (with the top bit set, apart from any index).
pub fn profile_id(stored_index: u64, points: &[ProfilePoint]) -> u64 {
    if stored_index > 0 {
        stored_index
    } else {
        fingerprint(points) | 1 << 63
    }
}

impl Corrections {
    /// Served batches of `variant` of `task` against its profile `points`. Batches the profile
    /// cannot be compared with are left out: at a fraction of a core, outside the measured
    /// cores, batch sizes and input sizes (estimates there are extrapolated), or of a stage that
    /// writes text (its time follows the tokens written, which the generation budget learns).
    /// `profile` is the profile's [`profile_id`].
    pub fn observe(
        &mut self,
        task: &TaskSpec,
        variant: &str,
        points: &[ProfilePoint],
        profile: u64,
        batches: &[ServedBatch],
    ) {
        let key = (task.name.clone(), variant.to_string());
        let Some((stage, spec)) =
            task.stages.iter().find_map(|s| s.variants.iter().find(|v| v.name == variant).map(|v| (s, v)))
        else {
            self.by_variant.remove(&key);
            return;
        };
        let writes_text = crate::task::as_served(stage, spec).text.as_ref().is_some_and(|t| t.generate.is_some());
        if points.is_empty() || writes_text {
            // Nothing to correct (a factor carried from before would otherwise stay for ever).
            self.by_variant.remove(&key);
            return;
        }
        let learned =
            self.by_variant.entry(key).or_insert_with(|| Learned { correction: Correction::default(), profile });
        if learned.profile != profile {
            *learned = Learned { correction: Correction::default(), profile };
        }
        let own_size = crate::tensor::element_count(&spec.input_shape).unwrap_or(0) as u64;
        // `points_at_mix` holds a size below the smallest profiled at that one's latency: a
        // smaller input, served faster, would read as a faster machine.
        let smallest = points.iter().map(|p| if p.size == 0 { own_size } else { p.size }).min().unwrap_or(own_size);
        // One grid per input size the batches came in.
        let mut grids: BTreeMap<u64, Option<ProfileGrid>> = BTreeMap::new();
        for b in batches {
            // Profiles run batches back to back: a batch from idle runs slower than any of
            // them (its threads woken, its caches cold), and says nothing of the machine.
            if b.after_idle || b.millicores == 0 || b.millicores % 1000 != 0 {
                continue;
            }
            let size = if b.size == 0 { own_size } else { b.size };
            if size < smallest {
                continue;
            }
            let grid = grids.entry(size).or_insert_with(|| {
                let at = crate::profile::points_at_mix(points, own_size, &[(size, 1.0)]);
                at.beyond.is_none().then(|| ProfileGrid::new(&at.points))
            });
            let profiled = grid.as_ref().and_then(|g| g.estimate(b.millicores / 1000, b.batch));
            if let Some(e) = profiled {
                learned.correction.observe(b.run_ms, e.latency_p50_ms);
            }
        }
    }

    /// A planning round: forgets the tasks no longer registered and moves every factor
    /// ([`Correction::round`]).
    pub fn round(&mut self, tasks: &HashSet<&str>) {
        self.by_variant.retain(|(t, _), _| tasks.contains(t.as_str()));
        for learned in self.by_variant.values_mut() {
            learned.correction.round();
        }
    }

    /// Forgets the variants that have no stored profile any more (a task registered again
    /// without them): what a plan carries is only what the planner uses.
    pub fn retain_profiled(&mut self, profiled: &HashSet<(&str, &str)>) {
        self.by_variant.retain(|(t, v), _| profiled.contains(&(t.as_str(), v.as_str())));
    }

    /// The factor the planner uses for `variant` of `task` (1: as profiled).
    pub fn factor(&self, task: &str, variant: &str) -> f64 {
        self.by_variant.get(&(task.to_string(), variant.to_string())).map_or(1.0, |l| l.correction.factor())
    }

    /// The factors that differ from 1, as a plan carries them (by task, then variant).
    pub fn carried(&self) -> Vec<PlanCorrection> {
        self.by_variant
            .iter()
            .filter(|(_, l)| l.correction.factor() != 1.0)
            .map(|((task, variant), l)| PlanCorrection {
                task: task.clone(),
                variant: variant.clone(),
                factor: l.correction.factor(),
                profile: l.profile,
            })
            .collect()
    }

    /// Starts from the corrections a plan carried (a new leader): each holds while its
    /// profile is the one stored, and moves again as batches are served.
    pub fn resume(carried: &[PlanCorrection]) -> Self {
        let by_variant = carried
            .iter()
            .map(|c| {
                let learned = Learned { correction: Correction::starting_at(c.factor), profile: c.profile };
                ((c.task.clone(), c.variant.clone()), learned)
            })
            .collect();
        Self { by_variant }
    }

    /// Every variant that has served batches since its profile, or is planned off it (a factor
    /// carried over by a new leader): (task, variant), its factor and the batches its window
    /// holds.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, f64, usize)> {
        self.by_variant
            .iter()
            .filter(|(_, l)| l.correction.batches() > 0 || l.correction.factor() != 1.0)
            .map(|((t, v), l)| (t.as_str(), v.as_str(), l.correction.factor(), l.correction.batches()))
    }
}

/// What tells one profile from another (a variant profiled again).
fn fingerprint(points: &[ProfilePoint]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in points {
        (p.cores, p.batch, p.size, p.output_tokens, p.latency_p50_ms.to_bits(), p.throughput_rps.to_bits())
            .hash(&mut h);
    }
    h.finish()
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

    fn task() -> TaskSpec {
        let mut v = tidal_proto::v1::VariantSpec { name: "small".into(), accuracy: 70.0, ..Default::default() };
        v.input_shape = vec![1, 3, 8, 8];
        crate::task::single_stage("t", 500, vec![v])
    }

    fn batch(millicores: u32, batch: u32, run_ms: f64) -> ServedBatch {
        ServedBatch { batch, millicores, run_ms, size: 0, after_idle: false }
    }

    #[test]
    fn served_batches_are_compared_with_the_profile_at_their_cores_and_batch_size() {
        // 100 ms per sample per core, batches of 1 and 4, on 1 and 2 cores.
        let points = crate::profile::synthetic(10.0, &[1, 2], &[(1, 1.0), (4, 1.0)], 1.2);
        let grid = ProfileGrid::new(&points);
        let at = |cores, b| grid.estimate(cores, b).unwrap().latency_p50_ms;
        let mut c = Corrections::default();
        let slow: Vec<ServedBatch> = [(1000, 1), (2000, 4), (1000, 4), (2000, 1)]
            .iter()
            .cycle()
            .take(16)
            .map(|&(m, b)| batch(m, b, at(m / 1000, b) * 1.2))
            .collect();
        // Batches the profile says nothing of: a fraction of a core, 3 cores, batch 16, inputs
        // smaller than the profiled 3×8×8 (held at its latency, they would read as fast), and
        // one run from idle.
        let small = ServedBatch { size: 48, ..batch(1000, 1, 1e-3) };
        let from_idle = ServedBatch { after_idle: true, ..batch(1000, 1, 1e6) };
        let unknown = [batch(1500, 1, 1e6), batch(3000, 1, 1e6), batch(1000, 16, 1e6), small, from_idle];
        let id = profile_id(0, &points);
        c.observe(&task(), "small", &points, id, &unknown);
        c.observe(&task(), "small", &points, id, &slow);
        c.observe(&task(), "other", &points, id, &slow);
        c.round(&HashSet::from(["t"]));
        assert!((c.factor("t", "small") - 1.2).abs() < 1e-6, "{:?}", c.iter().collect::<Vec<_>>());
        assert_eq!(c.iter().map(|(_, _, _, n)| n).collect::<Vec<_>>(), vec![16], "only comparable batches");
        // Profiled again: the correction starts over.
        let again = crate::profile::synthetic(8.0, &[1, 2], &[(1, 1.0), (4, 1.0)], 1.2);
        c.observe(&task(), "small", &again, profile_id(0, &again), &[]);
        assert_eq!(c.factor("t", "small"), 1.0);
        c.round(&HashSet::new());
        assert_eq!(c.iter().count(), 0, "a task unregistered is forgotten");
    }

    /// Within the replicated state a profile is known by the log index that stored it: the
    /// same points stored again start over. A plan carries the factors, and a new leader that
    /// resumes from them keeps each while its profile is the one stored.
    #[test]
    fn a_profile_stored_again_starts_over_and_a_carried_correction_holds_for_its_own_profile() {
        let points = crate::profile::synthetic(10.0, &[1], &[(1, 1.0)], 1.2);
        let at = ProfileGrid::new(&points).estimate(1, 1).unwrap().latency_p50_ms;
        let slow: Vec<ServedBatch> = (0..WINDOW).map(|_| batch(1000, 1, at * 1.2)).collect();
        let tasks = HashSet::from(["t"]);
        let mut c = Corrections::default();
        c.observe(&task(), "small", &points, 7, &slow);
        c.round(&tasks);
        assert!((c.factor("t", "small") - 1.2).abs() < 1e-6);
        assert_ne!(profile_id(7, &points), profile_id(0, &points), "an index is not a digest");
        let carried = c.carried();
        assert_eq!(carried.len(), 1);
        assert_eq!((carried[0].task.as_str(), carried[0].variant.as_str(), carried[0].profile), ("t", "small", 7));

        // A new leader: the factor holds without a batch while profile 7 is the one stored.
        let mut resumed = Corrections::resume(&carried);
        resumed.observe(&task(), "small", &points, 7, &[]);
        resumed.round(&tasks);
        assert!((resumed.factor("t", "small") - 1.2).abs() < 1e-6);
        // The same points stored again (index 9): a new profile, from 1.
        resumed.observe(&task(), "small", &points, 9, &[]);
        assert_eq!(resumed.factor("t", "small"), 1.0);
        assert!(resumed.carried().is_empty(), "nothing to carry at 1");
        assert_eq!(resumed.iter().count(), 0, "nothing served since, nothing shown");
        // Shown while planned on, before any batch: what a new leader carried over.
        let shown = Corrections::resume(&carried);
        assert_eq!(shown.iter().map(|(_, v, f, n)| (v, f, n)).collect::<Vec<_>>(), [("small", carried[0].factor, 0)]);
        // A variant without a stored profile any more is forgotten.
        let mut gone = Corrections::resume(&carried);
        gone.retain_profiled(&HashSet::from([("t", "other")]));
        assert!(gone.carried().is_empty());
        // Nonsense in a plan is bounded.
        let wild = [PlanCorrection { factor: f64::INFINITY, ..carried[0].clone() }];
        assert_eq!(Corrections::resume(&wild).factor("t", "small"), 1.0);
        let huge = [PlanCorrection { factor: 1e9, ..carried[0].clone() }];
        assert_eq!(Corrections::resume(&huge).factor("t", "small"), LIMITS.1);
    }
}
