//! Instances and the MILP reference formulation shared by the solver benchmarks and the MILP
//! cross-check test.

#![allow(dead_code)]

use good_lp::{constraint, microlp, variable, Expression, ProblemVariables, Solution as _, SolverModel, Variable};
use tidal_common::latency::LatencyModel;
use tidal_common::profile::ProfileGrid;
use tidal_common::solver::{objective, worker_shapes, Problem, SearchSpace, Stage, Variant, Weights};
use tidal_proto::v1::ProfilePoint;

/// A variant profiled on `cores` × `batches`: batch-1 throughput `per_core` per core with a
/// falling return per core, and batches up to 2× as efficient per request.
pub fn variant(name: &str, accuracy: f64, per_core: f64, cores: &[u32], batches: &[u32]) -> Variant {
    let mut points = Vec::new();
    for &c in cores {
        for &b in batches {
            let efficiency = 2.0 - 1.0 / (b as f64).sqrt();
            let tput = per_core * (c as f64).powf(0.9) * efficiency;
            let p50 = 1000.0 * b as f64 / tput;
            points.push(ProfilePoint {
                cores: c,
                batch: b,
                latency_p50_ms: p50,
                latency_p99_ms: 1.2 * p50,
                throughput_rps: tput,
                size: 0,
                output_tokens: 0,
                resident_bytes: 0,
            });
        }
    }
    Variant { name: name.into(), accuracy, load_cost: 0.0, grid: ProfileGrid::new(&points), memory: Default::default() }
}

/// A stage of five variants from fast and inaccurate to slow and accurate (ResNet-like).
pub fn stage(name: &str, cores: &[u32], batches: &[u32]) -> Stage {
    let family = [(69.76, 60.0), (73.31, 35.0), (76.13, 28.0), (77.37, 16.0), (78.31, 11.0)];
    Stage {
        name: name.into(),
        variants: family
            .iter()
            .enumerate()
            .map(|(i, &(acc, per_core))| variant(&format!("{name}-v{i}"), acc, per_core, cores, batches))
            .collect(),
    }
}

pub fn problem(stages: Vec<Stage>, load_rps: f64, budget: u32, slo_ms: f64) -> Problem {
    Problem {
        stages,
        load_rps,
        slo_ms,
        comm_latency_ms: 0.0,
        core_budget: budget,
        max_worker_cores: None,
        weights: Weights::default(),
        model: LatencyModel::default(),
        max_worker_memory: None,
    }
}

/// The same problem as a mixed-integer program: a binary per worker shape, a continuous share
/// per variant, a latency per stage and a load cost per stage. Returns the objective of its
/// optimum (the solver's objective function of it), or `None` when infeasible.
pub fn solve_milp(problem: &Problem, space: &SearchSpace) -> Option<f64> {
    let (shapes, slo) = worker_shapes(problem, space).ok()?;
    let load = problem.load_rps.max(tidal_common::solver::MIN_PLANNED_RPS);
    let s_count = problem.stages.len() as f64;
    let w = &problem.weights;
    let mut vars = ProblemVariables::new();
    let mut picks: Vec<Vec<Vec<Variable>>> = Vec::new();
    let mut shares: Vec<Vec<Variable>> = Vec::new();
    let mut latency: Vec<Variable> = Vec::new();
    let mut lc: Vec<Variable> = Vec::new();
    for stage in &shapes {
        picks.push(stage.iter().map(|v| v.iter().map(|_| vars.add(variable().binary())).collect()).collect());
        shares.push(stage.iter().map(|_| vars.add(variable().min(0.0))).collect());
        latency.push(vars.add(variable().min(0.0)));
        lc.push(vars.add(variable().min(0.0)));
    }
    let mut goal = Expression::from(0.0);
    for (s, stage) in shapes.iter().enumerate() {
        for (v, vs) in stage.iter().enumerate() {
            let accuracy = problem.stages[s].variants[v].accuracy;
            goal += w.alpha * accuracy / (100.0 * s_count * load) * shares[s][v];
            for (k, shape) in vs.iter().enumerate() {
                goal -= shape.cost * picks[s][v][k];
            }
        }
        goal -= w.gamma / s_count * lc[s];
    }
    let mut model = vars.maximise(goal.clone()).using(microlp);
    let mut cores = Expression::from(0.0);
    let mut total_latency = Expression::from(0.0);
    for (s, stage) in shapes.iter().enumerate() {
        let mut carried = Expression::from(0.0);
        let mut chosen = Expression::from(0.0);
        for (v, vs) in stage.iter().enumerate() {
            let mut one = Expression::from(0.0);
            let mut capacity = Expression::from(0.0);
            for (k, shape) in vs.iter().enumerate() {
                let x = picks[s][v][k];
                one += x;
                capacity += shape.capacity * x;
                cores += shape.cores as f64 * x;
                model = model.with(constraint!(latency[s] >= shape.point.latency_bound_ms * x));
            }
            let cost = problem.stages[s].variants[v].load_cost;
            model = model.with(constraint!(one.clone() <= 1.0));
            model = model.with(constraint!(shares[s][v] <= capacity));
            model = model.with(constraint!(lc[s] >= cost * one.clone()));
            carried += shares[s][v];
            chosen += one;
        }
        model = model.with(constraint!(carried == load));
        if space.max_variants_per_stage < stage.len() {
            model = model.with(constraint!(chosen <= space.max_variants_per_stage as f64));
        }
        total_latency += latency[s];
    }
    model = model.with(constraint!(cores <= problem.core_budget as f64));
    model = model.with(constraint!(total_latency <= slo));
    let solution = model.solve().ok()?;
    // Re-evaluate the chosen plan with the solver's own objective function.
    let (mut acc_load, mut lc_sum, mut batch, mut used) = (0.0, 0.0, 0u32, 0u32);
    for (s, stage) in shapes.iter().enumerate() {
        let mut stage_lc = 0.0f64;
        for (v, vs) in stage.iter().enumerate() {
            acc_load += solution.value(shares[s][v]) * problem.stages[s].variants[v].accuracy;
            for (k, shape) in vs.iter().enumerate() {
                if solution.value(picks[s][v][k]) > 0.5 {
                    batch += shape.point.batch;
                    used += shape.cores;
                    stage_lc = stage_lc.max(problem.stages[s].variants[v].load_cost);
                }
            }
        }
        lc_sum += stage_lc;
    }
    Some(objective(problem, acc_load, load, used, lc_sum, batch))
}
