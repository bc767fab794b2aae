//! One model of the planning problem, solved exactly, for every policy.
//!
//! A task is a pipeline of stages; each stage has variants with measured profiles. A plan
//! chooses, per stage, a set of variants and for each a worker shape — cores and batch per
//! replica, and how many replicas — plus the share of the stage's traffic it carries. It
//! maximises
//!
//! ```text
//!   α·A/100 − β·RC/B − γ·LC − δ·Σb
//! ```
//!
//! where A is the pipeline's accuracy (the mean over stages of each stage's traffic-weighted
//! accuracy, in percent), RC the cores used, B the core budget, LC the mean over stages of the
//! largest load cost (0..1) among the stage's variants that are not running yet, and Σb the sum
//! of the chosen batch sizes. Constraints: every stage carries the load λ (Σ capacity ≥ λ, no
//! variant sent more than it carries), the stages' worst-case latencies add up to at most the
//! SLO (less the largest communication latency when the policy knows per-request deadlines),
//! RC ≤ B.
//!
//! With one stage this is InfAdapter's problem (plus batch and replicas); with one variant per
//! stage it is IPA's; with one variant and one replica it is Sponge's. Every policy — the three
//! systems, Tidal's union, and the baselines — is this problem restricted to a [`SearchSpace`]
//! (see [`policy`]), so all of them are solved by the same exact search:
//!
//! - per stage, a branch and bound over the variants, most accurate first (for a fixed choice
//!   of workers the best split fills the most accurate variant first; any other split moves
//!   load to a less accurate one), over each variant's Pareto-optimal worker shapes;
//! - for a pipeline, each stage's Pareto frontier of (latency, cores, value) is merged stage by
//!   stage, keeping only non-dominated partial plans.
//!
//! When no plan carries λ, the solver finds by bisection the largest rate any plan carries,
//! returns the best plan for that rate and marks it overloaded: the excess is shed by deadline
//! at the agents.

mod brute;
mod capacity;
mod options;
mod pipeline;
pub mod policy;
mod stage;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::latency::{LatencyModel, OperatingPoint};
use crate::profile::ProfileGrid;

pub use brute::brute_force;
pub use options::{Shape, Shapes};
pub use policy::{Limits, PolicyKind, SearchSpace};

/// Weights of the objective. Defaults follow InfAdapter's published setting (accuracy weight
/// 1, α = 0.05 on cores/budget, 0.001 on the load cost) with a small batch term, as IPA has,
/// so that a batch is only as large as it needs to be.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Weights {
    /// Accuracy (per unit of A/100).
    pub alpha: f64,
    /// Cores (per unit of RC/B).
    pub beta: f64,
    /// Load cost of starting variants.
    pub gamma: f64,
    /// Per unit of batch size.
    pub delta: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self { alpha: 1.0, beta: 0.05, gamma: 0.001, delta: 1e-5 }
    }
}

/// A variant the solver may choose.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    pub name: String,
    /// Top-1 accuracy (or the stage's quality metric) in percent.
    pub accuracy: f64,
    /// Cost of starting it: 0 when already running, up to 1 for the slowest load.
    pub load_cost: f64,
    pub grid: ProfileGrid,
    /// Its workers' resident memory by batch (empty: not measured, not planned).
    pub memory: crate::memory::MemoryCurve,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub name: String,
    pub variants: Vec<Variant>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub stages: Vec<Stage>,
    /// Predicted arrival rate, requests per second.
    pub load_rps: f64,
    /// End-to-end latency SLO (p99), ms.
    pub slo_ms: f64,
    /// Largest communication latency among current requests, taken from the SLO by policies
    /// that plan for per-request deadlines.
    pub comm_latency_ms: f64,
    pub core_budget: u32,
    /// The most cores one worker may have (the largest free node, when a plan must fit the
    /// cores that fragmentation leaves); `None`: as many as the profile measured.
    pub max_worker_cores: Option<u32>,
    /// The most memory one worker may take, bytes (the most a node has free, when a plan must
    /// fit the memory left); `None`: any.
    pub max_worker_memory: Option<u64>,
    pub weights: Weights,
    pub model: LatencyModel,
}

/// One chosen worker shape: `replicas` workers of `point`, carrying `share_rps` in all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub stage: usize,
    pub variant: usize,
    pub replicas: u32,
    pub point: OperatingPoint,
    pub share_rps: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    pub choices: Vec<Choice>,
    pub objective: f64,
    /// Pipeline accuracy: mean over stages of the traffic-weighted accuracy, percent.
    pub accuracy: f64,
    pub cores: u32,
    /// Sum over stages of the worst latency bound among the stage's chosen workers, ms.
    pub latency_bound_ms: f64,
    /// Load the plan carries; below the forecast only when `overloaded`.
    pub carried_rps: f64,
    /// True when no plan within the budget and SLO carries the load: this one carries the most.
    pub overloaded: bool,
}

impl Solution {
    /// Choices whose profile point was interpolated rather than measured.
    pub fn interpolated(&self) -> impl Iterator<Item = &Choice> {
        self.choices.iter().filter(|c| c.point.interpolated)
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum SolveError {
    #[error("the task has no stages")]
    NoStages,
    #[error("stage {0:?} has no variants to choose from")]
    NoCandidates(String),
    #[error("the policy names variant {0:?}, which the task does not have")]
    UnknownVariant(String),
    #[error("stage {0:?}: no variant has a profiled operating point within the SLO and budget under this policy; profile the variants, relax the SLO or widen the budget")]
    NoOperatingPoint(String),
    #[error("the core budget is 0")]
    NoBudget,
    #[error("the predicted load {0} is not a finite, non-negative rate")]
    InvalidLoad(f64),
    #[error("the SLO of {slo_ms} ms leaves no time once {comm_ms} ms of communication is taken")]
    InvalidSlo { slo_ms: f64, comm_ms: f64 },
    #[error("no plan fits: the stages' cheapest workers need {cores} cores (budget {budget}) or {latency_ms:.1} ms end to end (SLO {slo_ms} ms)")]
    Infeasible { cores: u32, budget: u32, latency_ms: f64, slo_ms: f64 },
}

/// The least load the solver plans for, so that an idle task keeps one worker ready.
pub const MIN_PLANNED_RPS: f64 = 1.0;
pub(crate) const EPS: f64 = 1e-9;

/// Solves `problem` restricted to `space`, exactly.
pub fn solve(problem: &Problem, space: &SearchSpace) -> Result<Solution, SolveError> {
    let slo = validate(problem, space)?;
    let filtered = options::build_pareto(problem, space, slo)?;
    let cheapest = options::cheapest(&filtered);
    let load = problem.load_rps.max(MIN_PLANNED_RPS);
    let max_variants = space.max_variants_per_stage;
    let solve_at = |l: f64| pipeline::solve_at(problem, &filtered, max_variants, slo, l);
    let infeasible = || SolveError::Infeasible {
        cores: cheapest.0,
        budget: problem.core_budget,
        latency_ms: cheapest.1,
        slo_ms: slo,
    };
    // When a search cannot carry the load, the most any plan carries is found once; for one
    // stage a quick bound spares the search that is sure to fail.
    let one_stage = filtered.len() == 1;
    let surely_too_much =
        one_stage && load > capacity::loose_stage_bound(&filtered[0], problem.core_budget, max_variants);
    if !surely_too_much {
        if let Some(s) = solve_at(load) {
            return Ok(s);
        }
    }
    let most = if one_stage {
        capacity::stage_capacity(&filtered[0], problem.core_budget, slo, max_variants)
    } else {
        capacity::pipeline_capacity(&filtered, problem.core_budget, slo, max_variants)
    };
    let bound = most.min(load);
    let mut s = most_carried(solve_at, bound, one_stage).ok_or_else(infeasible)?;
    s.overloaded = true;
    Ok(s)
}

/// The best plan for the most load any plan carries, at most `bound`: for one stage the bound is
/// that load exactly; for a pipeline it is searched for by bisection below the bound (to a
/// ten-millionth of it).
fn most_carried(solve_at: impl Fn(f64) -> Option<Solution>, bound: f64, exact: bool) -> Option<Solution> {
    const TINY: f64 = 1e-6;
    if bound < TINY {
        return None;
    }
    // The bound less a rounding margin, so that the plan that reaches it is found.
    let just_below = bound * (1.0 - 1e-12);
    if exact {
        if let Some(s) = solve_at(just_below) {
            return Some(s);
        }
    }
    let mut best = solve_at(TINY)?;
    let (mut lo, mut hi) = (TINY, bound);
    while hi - lo > 1e-7 * hi {
        let mid = 0.5 * (lo + hi);
        match solve_at(mid) {
            Some(s) => {
                best = s;
                lo = mid;
            }
            None => hi = mid,
        }
    }
    Some(best)
}

/// Every worker shape `space` allows, per stage and variant, with the latency budget they
/// meet: the decision space, for reference formulations (the MILP cross-check).
pub fn worker_shapes(problem: &Problem, space: &SearchSpace) -> Result<(Shapes, f64), SolveError> {
    let slo = validate(problem, space)?;
    Ok((options::build(problem, space, slo)?, slo))
}

/// Checks the inputs; returns the latency budget the plan must meet.
fn validate(problem: &Problem, space: &SearchSpace) -> Result<f64, SolveError> {
    if !problem.load_rps.is_finite() || problem.load_rps < 0.0 {
        return Err(SolveError::InvalidLoad(problem.load_rps));
    }
    if problem.stages.is_empty() {
        return Err(SolveError::NoStages);
    }
    if let Some(s) = problem.stages.iter().find(|s| s.variants.is_empty()) {
        return Err(SolveError::NoCandidates(s.name.clone()));
    }
    if problem.core_budget == 0 {
        return Err(SolveError::NoBudget);
    }
    let comm = if space.deadline_aware { problem.comm_latency_ms.max(0.0) } else { 0.0 };
    let slo = problem.slo_ms - comm;
    if !slo.is_finite() || slo <= 0.0 {
        return Err(SolveError::InvalidSlo { slo_ms: problem.slo_ms, comm_ms: comm });
    }
    Ok(slo)
}

/// The objective of a plan from its parts (see the module docs); `acc_load` is Σ share·accuracy
/// summed over stages, `lc_sum` the sum over stages of each stage's largest load cost.
pub fn objective(problem: &Problem, acc_load: f64, load: f64, cores: u32, lc_sum: f64, batch_sum: u32) -> f64 {
    let w = &problem.weights;
    let s = problem.stages.len() as f64;
    w.alpha * acc_load / (load * s * 100.0)
        - w.beta * cores as f64 / problem.core_budget as f64
        - w.gamma * lc_sum / s
        - w.delta * batch_sum as f64
}

#[cfg(test)]
mod tests;
