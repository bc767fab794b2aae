//! Exhaustive enumeration, for tests and as a reference: every combination of shapes (no
//! Pareto filter, no pruning, no frontier), the same objective and the same greedy split.

use super::options::{self, Shape};
use super::{objective, validate, Choice, Problem, SearchSpace, Solution, SolveError, EPS, MIN_PLANNED_RPS};

/// The optimum of `problem` restricted to `space`, found by trying everything. Exponential:
/// only for small instances.
pub fn brute_force(problem: &Problem, space: &SearchSpace) -> Result<Solution, SolveError> {
    let slo = validate(problem, space)?;
    let shapes = options::build(problem, space, slo)?;
    let cheapest = options::cheapest(&shapes);
    let per_stage: Vec<Vec<Vec<Shape>>> =
        shapes.iter().map(|stage| stage_configs(stage, space.max_variants_per_stage)).collect();
    let combos = cartesian(&per_stage);
    let feasible: Vec<&Vec<&Vec<Shape>>> = combos
        .iter()
        .filter(|combo| {
            let cores: u32 = combo.iter().flat_map(|c| c.iter()).map(|s| s.cores).sum();
            let latency: f64 = combo.iter().map(|c| stage_latency(c)).sum();
            cores <= problem.core_budget && latency <= slo + EPS
        })
        .collect();
    let capacity = |combo: &Vec<&Vec<Shape>>| {
        combo.iter().map(|c| c.iter().map(|s| s.capacity).sum::<f64>()).fold(f64::INFINITY, f64::min)
    };
    let max_capacity = feasible.iter().map(|c| capacity(c)).fold(0.0, f64::max);
    if feasible.is_empty() || max_capacity <= 0.0 {
        return Err(SolveError::Infeasible {
            cores: cheapest.0,
            budget: problem.core_budget,
            latency_ms: cheapest.1,
            slo_ms: slo,
        });
    }
    let wanted = problem.load_rps.max(MIN_PLANNED_RPS);
    let load = wanted.min(max_capacity);
    let mut best: Option<Solution> = None;
    for combo in feasible.iter().filter(|c| capacity(c) >= load - EPS) {
        let s = evaluate(problem, combo, load);
        if best.as_ref().is_none_or(|b| s.objective > b.objective + EPS) {
            best = Some(s);
        }
    }
    let mut best = best.expect("the combination of largest capacity carries `load`");
    best.overloaded = wanted > max_capacity + EPS;
    Ok(best)
}

/// Every way to pick at most `max_variants` variants of a stage and one shape for each.
fn stage_configs(per_variant: &[Vec<Shape>], max_variants: usize) -> Vec<Vec<Shape>> {
    let mut configs: Vec<Vec<Shape>> = vec![vec![]];
    for shapes in per_variant {
        let mut next = Vec::new();
        for c in &configs {
            next.push(c.clone());
            if c.len() < max_variants {
                for s in shapes {
                    let mut with = c.clone();
                    with.push(*s);
                    next.push(with);
                }
            }
        }
        configs = next;
    }
    configs.retain(|c| !c.is_empty());
    configs
}

fn cartesian(per_stage: &[Vec<Vec<Shape>>]) -> Vec<Vec<&Vec<Shape>>> {
    let mut out: Vec<Vec<&Vec<Shape>>> = vec![vec![]];
    for configs in per_stage {
        out = out
            .iter()
            .flat_map(|prefix| {
                configs.iter().map(move |c| {
                    let mut p = prefix.clone();
                    p.push(c);
                    p
                })
            })
            .collect();
    }
    out
}

fn stage_latency(config: &[Shape]) -> f64 {
    config.iter().map(|s| s.point.latency_bound_ms).fold(0.0, f64::max)
}

/// The plan of one combination at `load`: per stage, the most accurate variant first.
fn evaluate(problem: &Problem, combo: &[&Vec<Shape>], load: f64) -> Solution {
    let (mut acc_load, mut lc_sum, mut batch, mut cores, mut latency) = (0.0, 0.0, 0u32, 0u32, 0.0);
    let mut choices = Vec::new();
    let mut carried = f64::INFINITY;
    for (i, config) in combo.iter().enumerate() {
        let variants = &problem.stages[i].variants;
        let mut sorted: Vec<Shape> = config.to_vec();
        sorted.sort_by(|a, b| variants[b.variant].accuracy.total_cmp(&variants[a.variant].accuracy));
        let mut remaining = load;
        let mut lc = 0.0f64;
        for s in sorted {
            let share = s.capacity.min(remaining);
            remaining -= share;
            acc_load += share * variants[s.variant].accuracy;
            lc = lc.max(variants[s.variant].load_cost);
            batch += s.point.batch;
            cores += s.cores;
            choices.push(Choice {
                stage: i,
                variant: s.variant,
                replicas: s.replicas,
                point: s.point,
                share_rps: share,
            });
        }
        lc_sum += lc;
        latency += stage_latency(config);
        carried = carried.min(load - remaining);
    }
    Solution {
        choices,
        objective: objective(problem, acc_load, load, cores, lc_sum, batch),
        accuracy: acc_load / (load * problem.stages.len() as f64),
        cores,
        latency_bound_ms: latency,
        carried_rps: carried,
        overloaded: false,
    }
}
