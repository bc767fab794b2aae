//! From the replicated state and a load forecast to the next plan: per task, the InfAdapter
//! problem over the task's profiled variants, then placement of the chosen workers on nodes.
//! Pure: the adaptation loop and tests call it the same way.

use std::collections::{BTreeMap, HashSet};

use tidal_common::latency::LatencyModel;
use tidal_common::plan::place;
use tidal_common::solver::{solve_infadapter, Candidate, Problem, Weights};
use tidal_proto::v1::{Assignment, Plan, TaskSpec};

use crate::state::ClusterState;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PlannerConfig {
    pub model: LatencyModel,
    pub weights: Weights,
    /// Cores per node kept free of workers (for the agent itself and the OS).
    pub reserve_cores: u32,
}

/// The next plan (with `epoch` and `term` filled in), given the forecast peak rate per task.
pub fn next_plan(
    state: &ClusterState,
    forecasts: &BTreeMap<String, f64>,
    cfg: &PlannerConfig,
    epoch: u64,
    term: u64,
) -> Plan {
    let nodes: Vec<(&String, u32)> =
        state.nodes.iter().map(|(name, n)| (name, n.cores.saturating_sub(cfg.reserve_cores))).collect();
    let mut free: Vec<u32> = nodes.iter().map(|(_, c)| *c).collect();
    let mut plan = Plan { epoch, term, tasks: state.tasks.values().cloned().collect(), ..Default::default() };
    if nodes.is_empty() {
        plan.notes.push("no agent has registered: nothing to place".into());
        return plan;
    }
    for task in state.tasks.values() {
        let forecast = forecasts.get(&task.name).copied().unwrap_or(0.0);
        let budget: u32 = free.iter().sum();
        let workers = match choose_workers(state, task, forecast, budget, cfg) {
            Ok((workers, note)) => {
                plan.notes.push(note);
                workers
            }
            Err(reason) => {
                plan.notes.push(format!("{}: {reason}", task.name));
                continue;
            }
        };
        let current = current_nodes(state, task, &workers, &nodes);
        let cores: Vec<u32> = workers.iter().map(|w| w.millicores.div_ceil(1000)).collect();
        match place(&cores, &current, &free) {
            Ok(placed) => {
                for (mut w, node) in workers.into_iter().zip(placed) {
                    free[node] -= w.millicores.div_ceil(1000);
                    w.node = nodes[node].0.clone();
                    plan.assignments.push(w);
                }
            }
            Err(e) => plan.notes.push(format!("{}: {e}", task.name)),
        }
    }
    plan
}

/// The nodes where each worker's variant runs in the current plan, to keep it there.
fn current_nodes(
    state: &ClusterState,
    task: &TaskSpec,
    workers: &[Assignment],
    nodes: &[(&String, u32)],
) -> Vec<Option<usize>> {
    workers
        .iter()
        .map(|w| {
            let variant = w.variant.as_ref().map(|v| v.name.as_str());
            let node = state
                .plan
                .as_ref()?
                .assignments
                .iter()
                .find(|a| a.task == task.name && a.variant.as_ref().map(|v| v.name.as_str()) == variant)?
                .node
                .clone();
            nodes.iter().position(|(n, _)| **n == node)
        })
        .collect()
}

/// The workers (node not yet set) for one task and a note that explains the choice.
fn choose_workers(
    state: &ClusterState,
    task: &TaskSpec,
    forecast: f64,
    budget: u32,
    cfg: &PlannerConfig,
) -> Result<(Vec<Assignment>, String), String> {
    if task.variants.is_empty() {
        return Err("the task has no variants".into());
    }
    let running: HashSet<&str> = state
        .plan
        .iter()
        .flat_map(|p| p.assignments.iter())
        .filter(|a| a.task == task.name)
        .filter_map(|a| a.variant.as_ref().map(|v| v.name.as_str()))
        .collect();
    let candidates: Vec<Candidate> = task
        .variants
        .iter()
        .filter_map(|v| {
            let profile = state.profiles.get(&(task.name.clone(), v.name.clone()))?;
            Some(Candidate {
                name: v.name.clone(),
                accuracy: v.accuracy,
                load_cost: if running.contains(v.name.as_str()) { 0.0 } else { 1.0 },
                points: cfg.model.operating_points(&profile.points, task.slo_ms),
            })
        })
        .collect();
    if candidates.is_empty() {
        return unprofiled_default(task, budget);
    }
    let problem = Problem { candidates, load_rps: forecast, core_budget: budget, weights: cfg.weights };
    let solution = solve_infadapter(&problem).map_err(|e| e.to_string())?;
    let mut workers = Vec::new();
    let mut mix = Vec::new();
    for a in &solution.allocations {
        let cand = &problem.candidates[a.candidate];
        let variant = task.variants.iter().find(|v| v.name == cand.name).cloned();
        workers.push(Assignment {
            task: task.name.clone(),
            variant,
            node: String::new(),
            millicores: a.point.cores * 1000,
            max_batch: a.point.batch,
            max_delay_ms: a.point.max_delay_ms,
            weight: a.share_rps / solution.carried_rps.max(f64::MIN_POSITIVE),
        });
        mix.push(format!("{}×{}c/b{} {:.0} req/s", cand.name, a.point.cores, a.point.batch, a.share_rps));
    }
    let mut note = format!(
        "{}: forecast {:.1} req/s → {} ({} cores, accuracy {:.2} %)",
        task.name,
        forecast,
        mix.join(" + "),
        solution.cores,
        solution.accuracy
    );
    if solution.overloaded {
        note += &format!(
            "; OVERLOADED: the budget of {budget} cores carries {:.1} req/s, the excess is shed by deadline",
            solution.carried_rps
        );
    }
    Ok((workers, note))
}

/// Before any profile exists: the least accurate (cheapest) variant on one core, batch 1, so
/// the task is served while it is profiled.
fn unprofiled_default(task: &TaskSpec, budget: u32) -> Result<(Vec<Assignment>, String), String> {
    if budget == 0 {
        return Err("no free cores".into());
    }
    let cheapest =
        task.variants.iter().min_by(|a, b| a.accuracy.total_cmp(&b.accuracy)).cloned().ok_or("no variants")?;
    let note =
        format!("{}: no profiles yet, serving {} on 1 core until `tidalctl profile` runs", task.name, cheapest.name);
    let worker = Assignment {
        task: task.name.clone(),
        variant: Some(cheapest),
        node: String::new(),
        millicores: 1000,
        max_batch: 1,
        max_delay_ms: 0,
        weight: 1.0,
    };
    Ok((vec![worker], note))
}

/// Whether two plans ask for the same workers (epochs and notes aside).
pub fn same_assignments(a: &Plan, b: &Plan) -> bool {
    a.assignments == b.assignments && a.tasks == b.tasks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::NodeInfo;
    use tidal_proto::v1::{ProfilePoint, VariantProfile, VariantSpec};

    fn variant(name: &str, accuracy: f64) -> VariantSpec {
        VariantSpec { name: name.into(), model_file: format!("{name}.onnx"), accuracy, input_shape: vec![3, 8, 8] }
    }

    fn profile(task: &str, variant: &str, rps_per_core: f64) -> VariantProfile {
        let points = (1..=2)
            .map(|c| ProfilePoint {
                cores: c,
                batch: 1,
                latency_p50_ms: 1000.0 / (rps_per_core * c as f64),
                latency_p99_ms: 1000.0 / (rps_per_core * c as f64),
                throughput_rps: rps_per_core * c as f64,
            })
            .collect();
        VariantProfile { task: task.into(), variant: variant.into(), node: "n1".into(), points }
    }

    fn state(profiled: bool) -> ClusterState {
        let mut s = ClusterState::default();
        s.nodes.insert("n1".into(), NodeInfo { address: "127.0.0.1:1".into(), cores: 2 });
        s.tasks.insert(
            "t".into(),
            TaskSpec { name: "t".into(), slo_ms: 500, variants: vec![variant("small", 70.0), variant("big", 78.0)] },
        );
        if profiled {
            s.profiles.insert(("t".into(), "small".into()), profile("t", "small", 100.0));
            s.profiles.insert(("t".into(), "big".into()), profile("t", "big", 20.0));
        }
        s
    }

    fn forecast(rps: f64) -> BTreeMap<String, f64> {
        [("t".to_string(), rps)].into()
    }

    #[test]
    fn without_profiles_the_cheapest_variant_serves_on_one_core() {
        let plan = next_plan(&state(false), &forecast(10.0), &PlannerConfig::default(), 1, 1);
        assert_eq!(plan.assignments.len(), 1);
        assert_eq!(plan.assignments[0].variant.as_ref().unwrap().name, "small");
        assert_eq!(plan.assignments[0].node, "n1");
    }

    #[test]
    fn a_load_step_moves_the_plan_to_more_capacity() {
        let cfg = PlannerConfig::default();
        let low = next_plan(&state(true), &forecast(5.0), &cfg, 1, 1);
        let high = next_plan(&state(true), &forecast(120.0), &cfg, 2, 1);
        let capacity = |p: &Plan| -> f64 {
            p.assignments.iter().map(|a| if a.variant.as_ref().unwrap().name == "small" { 80.0 } else { 16.0 } * a.millicores as f64 / 1000.0).sum()
        };
        assert_eq!(low.assignments[0].variant.as_ref().unwrap().name, "big", "{:?}", low.notes);
        assert!(capacity(&high) >= 120.0, "{:?}", high.notes);
        let weights: f64 = high.assignments.iter().map(|a| a.weight).sum();
        assert!((weights - 1.0).abs() < 1e-9);
        assert!(high.assignments.iter().map(|a| a.millicores).sum::<u32>() <= 2000);
    }

    #[test]
    fn overload_is_said_in_the_notes() {
        let plan = next_plan(&state(true), &forecast(10_000.0), &PlannerConfig::default(), 1, 1);
        assert!(plan.notes.iter().any(|n| n.contains("OVERLOADED")), "{:?}", plan.notes);
        assert!(!plan.assignments.is_empty());
    }
}
