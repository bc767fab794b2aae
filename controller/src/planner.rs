//! From the replicated state and a load forecast to the next plan: per task, the planning
//! problem over the task's profiled variants under the configured policy (Tidal's by
//! default), then placement of the chosen workers on nodes. Pure: the adaptation loop and
//! tests call it the same way.

use std::collections::{BTreeMap, HashSet};

use tidal_common::latency::LatencyModel;
use tidal_common::plan::place;
use tidal_common::profile::ProfileGrid;
use tidal_common::solver::{solve, Limits, PolicyKind, Problem, Solution, Stage, Variant, Weights};
use tidal_proto::v1::{Assignment, Plan, TaskSpec};

use crate::state::ClusterState;

#[derive(Debug, Clone, PartialEq)]
pub struct PlannerConfig {
    pub policy: PolicyKind,
    pub model: LatencyModel,
    pub weights: Weights,
    pub limits: Limits,
    /// Cores per node kept free of workers (for the agent itself and the OS).
    pub reserve_cores: u32,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            policy: PolicyKind::Tidal,
            model: LatencyModel::default(),
            weights: Weights::default(),
            limits: Limits::default(),
            reserve_cores: 0,
        }
    }
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
    let mut plan = Plan {
        epoch,
        term,
        tasks: state.tasks.values().cloned().collect(),
        node_addresses: state.nodes.iter().map(|(name, n)| (name.clone(), n.address.clone())).collect(),
        ..Default::default()
    };
    if nodes.is_empty() {
        plan.notes.push("no agent has registered: nothing to place".into());
        return plan;
    }
    for task in state.tasks.values() {
        let forecast = forecasts.get(&task.name).copied().unwrap_or(0.0);
        let budget: u32 = free.iter().sum();
        let workers = match choose_workers(state, task, forecast, budget, nodes.len(), cfg) {
            Ok((workers, notes)) => {
                plan.notes.extend(notes);
                workers
            }
            Err(reason) => {
                plan.notes.push(format!("{}: {reason}", task.name));
                continue;
            }
        };
        let current = current_nodes(state, task, &workers, &nodes);
        let cores: Vec<u32> = workers.iter().map(|w| w.millicores.div_ceil(1000)).collect();
        let groups: Vec<&str> = workers.iter().map(|w| w.variant.as_ref().map_or("", |v| v.name.as_str())).collect();
        match place(&cores, &groups, &current, &free) {
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
) -> Vec<Vec<usize>> {
    workers
        .iter()
        .map(|w| {
            let variant = w.variant.as_ref().map(|v| v.name.as_str());
            let Some(plan) = state.plan.as_ref() else { return vec![] };
            plan.assignments
                .iter()
                .filter(|a| a.task == task.name && a.variant.as_ref().map(|v| v.name.as_str()) == variant)
                .filter_map(|a| nodes.iter().position(|(n, _)| **n == a.node))
                .collect()
        })
        .collect()
}

/// The workers (node not yet set) for one task and notes that explain the choice.
fn choose_workers(
    state: &ClusterState,
    task: &TaskSpec,
    forecast: f64,
    budget: u32,
    node_count: usize,
    cfg: &PlannerConfig,
) -> Result<(Vec<Assignment>, Vec<String>), String> {
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
    let variants: Vec<Variant> = task
        .variants
        .iter()
        .filter_map(|v| {
            let profile = state.profiles.get(&(task.name.clone(), v.name.clone()))?;
            Some(Variant {
                name: v.name.clone(),
                accuracy: v.accuracy,
                load_cost: if running.contains(v.name.as_str()) { 0.0 } else { 1.0 },
                grid: ProfileGrid::new(&profile.points),
            })
        })
        .collect();
    if variants.is_empty() {
        let (workers, note) = unprofiled_default(task, budget)?;
        return Ok((workers, vec![note]));
    }
    let problem = Problem {
        stages: vec![Stage { name: task.name.clone(), variants }],
        load_rps: forecast,
        slo_ms: task.slo_ms as f64,
        comm_latency_ms: 0.0,
        core_budget: budget,
        weights: cfg.weights,
        model: cfg.model,
    };
    // An agent runs one worker per variant: replicas of a variant go to different nodes.
    let limits = Limits { max_replicas: cfg.limits.max_replicas.min(node_count as u32).max(1), ..cfg.limits };
    let solution = solve(&problem, &cfg.policy.space(&limits)).map_err(|e| e.to_string())?;
    Ok((workers_of(task, &problem, &solution), notes_of(task, &problem, &solution, forecast, budget)))
}

/// One assignment per replica; each carries its replica's share of the traffic.
fn workers_of(task: &TaskSpec, problem: &Problem, solution: &Solution) -> Vec<Assignment> {
    let mut workers = Vec::new();
    for c in &solution.choices {
        let name = &problem.stages[c.stage].variants[c.variant].name;
        let variant = task.variants.iter().find(|v| &v.name == name).cloned();
        for _ in 0..c.replicas {
            workers.push(Assignment {
                task: task.name.clone(),
                variant: variant.clone(),
                node: String::new(),
                millicores: c.point.cores * 1000,
                max_batch: c.point.batch,
                max_delay_ms: c.point.max_delay_ms,
                weight: c.share_rps / c.replicas as f64 / solution.carried_rps.max(f64::MIN_POSITIVE),
            });
        }
    }
    workers
}

fn notes_of(task: &TaskSpec, problem: &Problem, s: &Solution, forecast: f64, budget: u32) -> Vec<String> {
    let mix: Vec<String> = s
        .choices
        .iter()
        .map(|c| {
            let name = &problem.stages[c.stage].variants[c.variant].name;
            format!("{}×{name} {}c/b{} {:.0} req/s", c.replicas, c.point.cores, c.point.batch, c.share_rps)
        })
        .collect();
    let mut notes = vec![format!(
        "{}: forecast {:.1} req/s → {} ({} cores, accuracy {:.2} %, latency bound {:.0} ms)",
        task.name,
        forecast,
        mix.join(" + "),
        s.cores,
        s.accuracy,
        s.latency_bound_ms
    )];
    if s.overloaded {
        notes.push(format!(
            "{}: OVERLOADED: the budget of {budget} cores carries {:.1} req/s within the SLO, the excess is shed by deadline",
            task.name, s.carried_rps
        ));
    }
    for c in s.interpolated() {
        let name = &problem.stages[c.stage].variants[c.variant].name;
        notes.push(format!(
            "{}: {name} at {} cores, batch {} was not profiled; its latency and throughput are interpolated",
            task.name, c.point.cores, c.point.batch
        ));
    }
    notes
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

    #[test]
    fn a_plan_on_an_unprofiled_core_count_says_so() {
        let mut s = state(true);
        s.nodes.insert("n1".into(), NodeInfo { address: "127.0.0.1:1".into(), cores: 4 });
        // "big" measured on 1 and 4 cores only: 30 req/s needs 2 or 3 of them.
        let mut p = profile("t", "big", 20.0);
        p.points[1].cores = 4;
        p.points[1].throughput_rps = 80.0;
        s.profiles.insert(("t".into(), "big".into()), p);
        s.profiles.remove(&("t".to_string(), "small".to_string()));
        let plan = next_plan(&s, &forecast(30.0), &PlannerConfig::default(), 1, 1);
        let cores = plan.assignments[0].millicores / 1000;
        assert!(cores == 2 || cores == 3, "{:?}", plan.assignments);
        assert!(
            plan.notes.iter().any(|n| n.contains("not profiled") && n.contains("interpolated")),
            "{:?}",
            plan.notes
        );
    }

    #[test]
    fn replicas_of_a_variant_land_on_different_nodes() {
        let mut s = state(true);
        s.nodes.insert("n2".into(), NodeInfo { address: "127.0.0.2:1".into(), cores: 2 });
        s.profiles.remove(&("t".to_string(), "small".to_string()));
        // Only "big": 2 cores carry 0.8 × 40 = 32 req/s at most, so 50 req/s needs two workers.
        let plan = next_plan(&s, &forecast(50.0), &PlannerConfig::default(), 1, 1);
        let nodes: Vec<&str> = plan.assignments.iter().map(|a| a.node.as_str()).collect();
        assert_eq!(plan.assignments.len(), 2, "{:?} {:?}", plan.assignments, plan.notes);
        assert_ne!(nodes[0], nodes[1]);
        let weights: f64 = plan.assignments.iter().map(|a| a.weight).sum();
        assert!((weights - 1.0).abs() < 1e-9);
    }
}
