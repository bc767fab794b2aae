//! From stage plans to a pipeline plan at one load.
//!
//! One stage: the stage search's best plan. Several: every stage's frontier of plans (latency,
//! cores, value), merged stage by stage; a partial plan that another beats on all three is
//! dropped, as is one that cannot fit the SLO or budget even with the cheapest rest. The
//! objective is a sum over stages, latency and cores add up, so nothing optimal is lost.

use super::options::{Shape, Shapes};
use super::stage::{Entry, Mode, StageInput, StageSearch};
use super::{objective, Choice, Problem, Solution, EPS};

/// Per stage, per variant: Pareto-optimal shapes (see `options::pareto`).
pub(crate) type Filtered = Shapes;

pub(crate) fn filter(shapes: Shapes, stages: usize) -> Filtered {
    shapes.into_iter().map(|stage| stage.into_iter().map(|v| super::options::pareto(v, stages > 1)).collect()).collect()
}

/// The best plan carrying `load`, or `None` when none does.
pub(crate) fn solve_at(
    problem: &Problem,
    shapes: &Filtered,
    max_variants: usize,
    slo: f64,
    load: f64,
) -> Option<Solution> {
    let s = problem.stages.len();
    let inputs: Vec<StageInput> = (0..s)
        .map(|i| StageInput {
            shapes: &shapes[i],
            accuracy: problem.stages[i].variants.iter().map(|v| v.accuracy).collect(),
            load_cost: problem.stages[i].variants.iter().map(|v| v.load_cost).collect(),
            load,
            acc_scale: problem.weights.alpha / (100.0 * s as f64 * load),
            lc_scale: problem.weights.gamma / s as f64,
            budget: problem.core_budget,
            latency_limit: slo,
            max_variants,
        })
        .collect();
    let stage_plans: Vec<Entry> = if s == 1 {
        StageSearch::run(&inputs[0], Mode::Best)
    } else {
        let fronts: Vec<Vec<Entry>> = inputs.iter().map(|i| StageSearch::run(i, Mode::Frontier)).collect();
        merge(&fronts, slo, problem.core_budget)?
    };
    if stage_plans.len() != s {
        return None;
    }
    Some(solution(problem, &stage_plans, load))
}

struct Partial {
    latency: f64,
    cores: u32,
    value: f64,
    picks: Vec<u32>,
}

/// The best combination of one entry per stage within the SLO and budget.
fn merge(fronts: &[Vec<Entry>], slo: f64, budget: u32) -> Option<Vec<Entry>> {
    // The least latency and cores the stages after each one still need.
    let n = fronts.len();
    let mut rest_latency = vec![0.0; n + 1];
    let mut rest_cores = vec![0u32; n + 1];
    for i in (0..n).rev() {
        rest_latency[i] = rest_latency[i + 1] + fronts[i].iter().map(|e| e.latency).fold(f64::INFINITY, f64::min);
        rest_cores[i] = rest_cores[i + 1] + fronts[i].iter().map(|e| e.cores).min()?;
    }
    let mut partials = vec![Partial { latency: 0.0, cores: 0, value: 0.0, picks: Vec::new() }];
    for (i, front) in fronts.iter().enumerate() {
        let mut next = Vec::with_capacity(partials.len() * front.len());
        for p in &partials {
            for (k, e) in front.iter().enumerate() {
                let latency = p.latency + e.latency;
                let cores = p.cores + e.cores;
                if latency + rest_latency[i + 1] > slo + EPS || cores + rest_cores[i + 1] > budget {
                    continue;
                }
                let mut picks = p.picks.clone();
                picks.push(k as u32);
                next.push(Partial { latency, cores, value: p.value + e.value, picks });
            }
        }
        partials = non_dominated(next);
        if partials.is_empty() {
            return None;
        }
    }
    let best = partials.into_iter().max_by(|a, b| a.value.total_cmp(&b.value))?;
    Some(best.picks.iter().enumerate().map(|(i, &k)| fronts[i][k as usize].clone()).collect())
}

/// Drops every partial plan another one beats on latency, cores and value together.
fn non_dominated(mut all: Vec<Partial>) -> Vec<Partial> {
    all.sort_by(|a, b| a.latency.total_cmp(&b.latency).then(a.cores.cmp(&b.cores)).then(b.value.total_cmp(&a.value)));
    let mut kept: Vec<Partial> = Vec::new();
    for p in all {
        if !kept.iter().any(|k| k.cores <= p.cores && k.value >= p.value - EPS) {
            kept.push(p);
        }
    }
    kept
}

fn solution(problem: &Problem, stage_plans: &[Entry], load: f64) -> Solution {
    let mut choices = Vec::new();
    for (stage, e) in stage_plans.iter().enumerate() {
        for &(shape, share) in &e.picks {
            choices.push(choice(stage, &shape, share));
        }
    }
    let acc_load: f64 = stage_plans.iter().map(|e| e.acc_load).sum();
    let lc_sum: f64 = stage_plans.iter().map(|e| e.lc).sum();
    let batch: u32 = stage_plans.iter().map(|e| e.batch).sum();
    let cores: u32 = stage_plans.iter().map(|e| e.cores).sum();
    let carried = stage_plans.iter().map(|e| e.picks.iter().map(|p| p.1).sum::<f64>()).fold(f64::INFINITY, f64::min);
    Solution {
        choices,
        objective: objective(problem, acc_load, load, cores, lc_sum, batch),
        accuracy: acc_load / (load * problem.stages.len() as f64),
        cores,
        latency_bound_ms: stage_plans.iter().map(|e| e.latency).sum(),
        carried_rps: carried,
        overloaded: false,
    }
}

fn choice(stage: usize, shape: &Shape, share: f64) -> Choice {
    Choice { stage, variant: shape.variant, replicas: shape.replicas, point: shape.point, share_rps: share }
}
