//! The InfAdapter problem, solved exactly.
//!
//! Choose a subset of a task's variants and an operating point (cores, batch) for each so that
//! together they carry the predicted load λ, maximising
//!
//! ```text
//!   AA/100 − α·RC/B − γ·LC
//! ```
//!
//! where AA is the traffic-weighted accuracy (percent), RC the cores used, B the core budget and
//! LC the largest load cost among chosen variants that are not running yet (0..1). Constraints:
//! Σ capacity ≥ λ, each variant's share ≤ its capacity, each point meets the SLO (the latency
//! model only offers points that do), RC ≤ B.
//!
//! For a fixed choice of points, the best split sends traffic to the most accurate variant
//! first, up to its capacity, then to the next: any other split moves load from a more to a
//! less accurate variant. The search walks variants from the most accurate down, so a branch
//! knows exactly what each variant carries; it never gives a variant more cores than it needs
//! to carry all that remains, and it prunes a branch whose best possible accuracy cannot beat
//! the best plan found. When no choice carries λ within the budget, the solver says so and
//! returns the plan that carries the most (the rest is shed by deadline at the agents).

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::latency::OperatingPoint;

/// Weights of the objective (InfAdapter's published setting: α = 0.05, γ = 0.001).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Weights {
    pub alpha: f64,
    pub gamma: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self { alpha: 0.05, gamma: 0.001 }
    }
}

/// One variant the solver may choose, with the points its profile offers under the SLO.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub name: String,
    /// Top-1 accuracy in percent.
    pub accuracy: f64,
    /// Cost of starting it (0 when already running, up to 1 for the slowest load).
    pub load_cost: f64,
    /// Sorted by cores, capacity strictly increasing (as `LatencyModel::operating_points` gives).
    pub points: Vec<OperatingPoint>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub candidates: Vec<Candidate>,
    /// Predicted arrival rate, requests per second.
    pub load_rps: f64,
    pub core_budget: u32,
    pub weights: Weights,
}

/// A chosen variant: which candidate, at which point, carrying how much traffic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Allocation {
    pub candidate: usize,
    pub point: OperatingPoint,
    pub share_rps: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    pub allocations: Vec<Allocation>,
    pub objective: f64,
    /// Traffic-weighted accuracy in percent.
    pub accuracy: f64,
    pub cores: u32,
    /// Load the plan carries; below `load_rps` only when `overloaded`.
    pub carried_rps: f64,
    /// True when no choice within the budget carries the load: this is the plan that carries
    /// the most.
    pub overloaded: bool,
}

#[derive(Debug, Error, PartialEq)]
pub enum SolveError {
    #[error("the task has no variants to choose from")]
    NoCandidates,
    #[error("no variant has a profiled operating point that meets the SLO; profile the variants or relax the SLO")]
    NoOperatingPoint,
    #[error("the core budget is 0")]
    NoBudget,
    #[error("the predicted load {0} is not a finite, non-negative rate")]
    InvalidLoad(f64),
    #[error("no variant fits in a budget of {budget} cores (the cheapest point needs {cheapest})")]
    BudgetTooSmall { budget: u32, cheapest: u32 },
}

/// The least load the solver plans for, so that an idle task keeps one variant ready.
pub const MIN_PLANNED_RPS: f64 = 1.0;
const EPS: f64 = 1e-9;

/// Solves the InfAdapter problem exactly (see the module docs).
pub fn solve_infadapter(problem: &Problem) -> Result<Solution, SolveError> {
    validate(problem)?;
    let load = problem.load_rps.max(MIN_PLANNED_RPS);
    let mut order: Vec<usize> = (0..problem.candidates.len()).collect();
    order.sort_by(|&a, &b| problem.candidates[b].accuracy.total_cmp(&problem.candidates[a].accuracy));
    let mut search = Search { problem, order: &order, load, best: None, most_carried: None, stack: Vec::new() };
    search.visit(0, load, problem.core_budget, 0.0, 0.0, 0);
    if let Some(best) = search.best {
        return Ok(best);
    }
    let mut fallback = search.most_carried.ok_or(SolveError::NoOperatingPoint)?;
    fallback.overloaded = true;
    Ok(fallback)
}

fn validate(problem: &Problem) -> Result<(), SolveError> {
    if !problem.load_rps.is_finite() || problem.load_rps < 0.0 {
        return Err(SolveError::InvalidLoad(problem.load_rps));
    }
    if problem.candidates.is_empty() {
        return Err(SolveError::NoCandidates);
    }
    if problem.core_budget == 0 {
        return Err(SolveError::NoBudget);
    }
    let cheapest = problem
        .candidates
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.cores))
        .min()
        .ok_or(SolveError::NoOperatingPoint)?;
    if cheapest > problem.core_budget {
        return Err(SolveError::BudgetTooSmall { budget: problem.core_budget, cheapest });
    }
    Ok(())
}

/// Objective of a complete choice, from its parts.
pub fn objective(weights: &Weights, budget: u32, acc_load: f64, load: f64, cores: u32, lc: f64) -> f64 {
    acc_load / load / 100.0 - weights.alpha * cores as f64 / budget as f64 - weights.gamma * lc
}

struct Search<'a> {
    problem: &'a Problem,
    order: &'a [usize],
    load: f64,
    best: Option<Solution>,
    most_carried: Option<Solution>,
    stack: Vec<Allocation>,
}

impl Search<'_> {
    /// `acc_load` = Σ share·accuracy so far; `lc` = largest load cost so far.
    fn visit(&mut self, depth: usize, remaining: f64, cores_left: u32, acc_load: f64, lc: f64, cores: u32) {
        if remaining <= EPS || depth == self.order.len() {
            self.record(remaining, acc_load, lc, cores);
            return;
        }
        let idx = self.order[depth];
        let cand = &self.problem.candidates[idx];
        if self.cannot_beat_best(remaining, cand.accuracy, acc_load, cores) {
            return;
        }
        for point in &cand.points {
            if point.cores > cores_left {
                break;
            }
            let share = point.capacity_rps.min(remaining);
            self.stack.push(Allocation { candidate: idx, point: *point, share_rps: share });
            self.visit(
                depth + 1,
                remaining - share,
                cores_left - point.cores,
                acc_load + share * cand.accuracy,
                lc.max(cand.load_cost),
                cores + point.cores,
            );
            self.stack.pop();
            if point.capacity_rps >= remaining {
                break; // more cores would carry nothing more
            }
        }
        self.visit(depth + 1, remaining, cores_left, acc_load, lc, cores);
    }

    /// Even if everything left went to this (the most accurate remaining) variant at no extra
    /// cost or load cost, the branch could not beat the best plan found.
    fn cannot_beat_best(&self, remaining: f64, accuracy: f64, acc_load: f64, cores: u32) -> bool {
        let Some(best) = &self.best else { return false };
        let w = &self.problem.weights;
        let bound = objective(w, self.problem.core_budget, acc_load + remaining * accuracy, self.load, cores, 0.0);
        bound < best.objective - EPS
    }

    fn record(&mut self, remaining: f64, acc_load: f64, lc: f64, cores: u32) {
        if self.stack.is_empty() {
            return;
        }
        let carried = self.load - remaining.max(0.0);
        let solution = Solution {
            allocations: self.stack.clone(),
            objective: objective(&self.problem.weights, self.problem.core_budget, acc_load, self.load, cores, lc),
            accuracy: acc_load / carried.max(EPS),
            cores,
            carried_rps: carried,
            overloaded: false,
        };
        if remaining <= EPS {
            if self.best.as_ref().is_none_or(|b| solution.objective > b.objective + EPS) {
                self.best = Some(solution);
            }
        } else if self.best.is_none() {
            let better = self.most_carried.as_ref().is_none_or(|m| {
                carried > m.carried_rps + EPS
                    || (carried > m.carried_rps - EPS && solution.objective > m.objective + EPS)
            });
            if better {
                self.most_carried = Some(solution);
            }
        }
    }
}

/// Exhaustive enumeration of every point vector within the budget, for tests and as a
/// reference: the same objective, greedy split by accuracy, no pruning.
pub fn brute_force_infadapter(problem: &Problem) -> Result<Solution, SolveError> {
    validate(problem)?;
    let load = problem.load_rps.max(MIN_PLANNED_RPS);
    let n = problem.candidates.len();
    let mut choice = vec![0usize; n]; // 0 = not chosen, k = points[k-1]
    let mut best: Option<Solution> = None;
    let mut most: Option<Solution> = None;
    loop {
        if let Some(s) = evaluate_choice(problem, load, &choice) {
            let target = if s.carried_rps >= load - EPS { &mut best } else { &mut most };
            let better = target.as_ref().is_none_or(|b| {
                if s.overloaded {
                    s.carried_rps > b.carried_rps + EPS
                        || (s.carried_rps > b.carried_rps - EPS && s.objective > b.objective + EPS)
                } else {
                    s.objective > b.objective + EPS
                }
            });
            if better {
                *target = Some(s);
            }
        }
        // Next vector in mixed radix.
        let mut i = 0;
        loop {
            if i == n {
                return match best {
                    Some(b) => Ok(b),
                    None => most.ok_or(SolveError::NoOperatingPoint),
                };
            }
            choice[i] += 1;
            if choice[i] <= problem.candidates[i].points.len() {
                break;
            }
            choice[i] = 0;
            i += 1;
        }
    }
}

fn evaluate_choice(problem: &Problem, load: f64, choice: &[usize]) -> Option<Solution> {
    let mut chosen: Vec<(usize, OperatingPoint)> = choice
        .iter()
        .enumerate()
        .filter(|(_, &k)| k > 0)
        .map(|(i, &k)| (i, problem.candidates[i].points[k - 1]))
        .collect();
    let cores: u32 = chosen.iter().map(|(_, p)| p.cores).sum();
    if chosen.is_empty() || cores > problem.core_budget {
        return None;
    }
    chosen.sort_by(|a, b| problem.candidates[b.0].accuracy.total_cmp(&problem.candidates[a.0].accuracy));
    let mut remaining = load;
    let (mut acc_load, mut lc) = (0.0, 0.0f64);
    let mut allocations = Vec::new();
    for (i, p) in chosen {
        let share = p.capacity_rps.min(remaining);
        remaining -= share;
        acc_load += share * problem.candidates[i].accuracy;
        lc = lc.max(problem.candidates[i].load_cost);
        allocations.push(Allocation { candidate: i, point: p, share_rps: share });
    }
    let carried = load - remaining;
    Some(Solution {
        allocations,
        objective: objective(&problem.weights, problem.core_budget, acc_load, load, cores, lc),
        accuracy: acc_load / carried.max(EPS),
        cores,
        carried_rps: carried,
        overloaded: remaining > EPS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op(cores: u32, capacity: f64) -> OperatingPoint {
        OperatingPoint { cores, batch: 1, max_delay_ms: 0, capacity_rps: capacity, latency_bound_ms: 10.0 }
    }

    fn cand(name: &str, accuracy: f64, caps: &[(u32, f64)]) -> Candidate {
        Candidate {
            name: name.into(),
            accuracy,
            load_cost: 0.0,
            points: caps.iter().map(|&(c, cap)| op(c, cap)).collect(),
        }
    }

    fn problem(load: f64, budget: u32) -> Problem {
        Problem {
            candidates: vec![
                cand("r18", 69.76, &[(1, 40.0), (2, 75.0), (3, 105.0), (4, 130.0)]),
                cand("r50", 76.13, &[(1, 15.0), (2, 28.0), (3, 40.0), (4, 50.0)]),
                cand("r152", 78.31, &[(2, 8.0), (4, 15.0)]),
            ],
            load_rps: load,
            core_budget: budget,
            weights: Weights::default(),
        }
    }

    #[test]
    fn low_load_gets_the_most_accurate_variant_that_fits() {
        let s = solve_infadapter(&problem(5.0, 8)).unwrap();
        assert!(!s.overloaded);
        assert_eq!(s.allocations.len(), 1);
        assert_eq!(s.allocations[0].candidate, 2);
    }

    #[test]
    fn high_load_mixes_variants_and_carries_it_all() {
        let s = solve_infadapter(&problem(120.0, 8)).unwrap();
        assert!(!s.overloaded);
        assert!((s.carried_rps - 120.0).abs() < 1e-6);
        assert!(s.cores <= 8);
        assert!(s.allocations.len() >= 2, "{s:?}");
    }

    #[test]
    fn overload_returns_the_plan_that_carries_the_most_and_says_so() {
        let s = solve_infadapter(&problem(1000.0, 4)).unwrap();
        assert!(s.overloaded);
        assert!((s.carried_rps - 130.0).abs() < 1e-6, "{s:?}");
    }

    #[test]
    fn infeasible_inputs_are_errors_not_plans() {
        let mut p = problem(10.0, 0);
        assert_eq!(solve_infadapter(&p), Err(SolveError::NoBudget));
        p.core_budget = 4;
        p.load_rps = f64::NAN;
        assert!(matches!(solve_infadapter(&p), Err(SolveError::InvalidLoad(_))));
        p.load_rps = 10.0;
        p.candidates.clear();
        assert_eq!(solve_infadapter(&p), Err(SolveError::NoCandidates));
        let mut p = problem(10.0, 1);
        p.candidates.retain(|c| c.name == "r152");
        assert_eq!(solve_infadapter(&p), Err(SolveError::BudgetTooSmall { budget: 1, cheapest: 2 }));
        p.candidates[0].points.clear();
        assert_eq!(solve_infadapter(&p), Err(SolveError::NoOperatingPoint));
    }

    #[test]
    fn starting_a_variant_costs_its_load_cost() {
        let mut p = problem(5.0, 8);
        p.weights.gamma = 1.0;
        p.candidates[2].load_cost = 1.0; // r152 not running: too dear to start
        let s = solve_infadapter(&p).unwrap();
        assert_eq!(s.allocations[0].candidate, 1);
    }

    fn arb_problem() -> impl Strategy<Value = Problem> {
        let point_caps = prop::collection::vec((1u32..4, 1.0f64..60.0), 0..4);
        let candidate = (60.0f64..80.0, 0.0f64..1.0, point_caps).prop_map(|(acc, lc, raw)| {
            let mut points: Vec<OperatingPoint> = Vec::new();
            let mut cores = 0;
            let mut cap = 0.0;
            for (dc, dcap) in raw {
                cores += dc;
                cap += dcap;
                points.push(op(cores, cap));
            }
            Candidate { name: "v".into(), accuracy: acc, load_cost: lc, points }
        });
        (prop::collection::vec(candidate, 1..5), 0.0f64..200.0, 1u32..12, 0.0f64..0.5, 0.0f64..0.2).prop_map(
            |(candidates, load_rps, core_budget, alpha, gamma)| Problem {
                candidates,
                load_rps,
                core_budget,
                weights: Weights { alpha, gamma },
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        #[test]
        fn the_search_finds_the_brute_force_optimum(p in arb_problem()) {
            let fast = solve_infadapter(&p);
            let slow = brute_force_infadapter(&p);
            match (&fast, &slow) {
                (Ok(f), Ok(s)) => {
                    prop_assert_eq!(f.overloaded, s.overloaded);
                    prop_assert!((f.carried_rps - s.carried_rps).abs() < 1e-6);
                    if !f.overloaded {
                        prop_assert!((f.objective - s.objective).abs() < 1e-9, "{:?} vs {:?}", f, s);
                    }
                    // Every plan satisfies the constraints.
                    prop_assert!(f.cores <= p.core_budget);
                    prop_assert_eq!(f.cores, f.allocations.iter().map(|a| a.point.cores).sum::<u32>());
                    for a in &f.allocations {
                        prop_assert!(a.share_rps <= a.point.capacity_rps + 1e-9);
                    }
                    let total: f64 = f.allocations.iter().map(|a| a.share_rps).sum();
                    prop_assert!((total - f.carried_rps).abs() < 1e-6);
                }
                (Err(a), Err(b)) => prop_assert_eq!(a, b),
                _ => prop_assert!(false, "solver {:?} vs brute force {:?}", fast, slow),
            }
        }
    }
}
