//! Plans: validation of what an agent is asked to run, and the placement of a solution's
//! workers onto nodes.

mod cut;
pub mod delta;

pub use cut::cut;

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use thiserror::Error;
use tidal_proto::v1::{Assignment, Plan, RegisterNodeRequest};

/// Largest batch a worker accepts.
pub const MAX_BATCH: u32 = 256;
/// Longest batcher timeout a plan may set.
pub const MAX_DELAY_MS: u32 = 10_000;
/// Most workers a plan may ask one node to run.
pub const MAX_WORKERS_PER_NODE: usize = 256;
/// Smallest quota a worker may get: the kernel's floor of 1 ms per CFS period (the agent's
/// period is 10 ms), so that what a plan says is what the kernel enforces.
pub const MIN_WORKER_MILLICORES: u32 = 100;
/// Most cores a node may declare.
pub const MAX_NODE_CORES: u32 = 1024;

#[derive(Debug, Error, PartialEq)]
pub enum PlanError {
    #[error("assignment {index}: {reason}")]
    BadAssignment { index: usize, reason: String },
    #[error("task {0:?} is assigned workers but is not defined in the plan")]
    UnknownTask(String),
    #[error("task {task:?} in the plan: {reason}")]
    BadTask { task: String, reason: String },
    #[error("assignment {index}: task {task:?} has no variant {variant:?} in a stage {stage:?}")]
    UnknownVariant { index: usize, task: String, stage: String, variant: String },
    #[error("replica {replica} of variant {variant:?} of task {task:?} is assigned twice to node {node:?}")]
    Duplicate { task: String, variant: String, replica: u32, node: String },
    #[error("node {node:?} is asked for {asked} millicores but has {has}")]
    OverCommitted { node: String, asked: u32, has: u32 },
    #[error("node {node:?} is asked to run {workers} workers; at most {MAX_WORKERS_PER_NODE} are allowed")]
    TooManyWorkers { node: String, workers: usize },
    #[error("the plan was cut for node {for_node:?}, not for {node:?}")]
    NotForThisNode { for_node: String, node: String },
    #[error("route {index}: {reason}")]
    BadRoute { index: usize, reason: String },
}

/// A plan as this version reads it: tasks in their pipeline form, and each assignment of a
/// one-stage task written before stages existed given that stage.
pub fn normalise(plan: &mut Plan) {
    for task in &mut plan.tasks {
        *task = crate::task::normalise(std::mem::take(task));
    }
    for a in plan.assignments.iter_mut().filter(|a| a.stage.is_empty()) {
        if let Some(task) = plan.tasks.iter().find(|t| t.name == a.task).filter(|t| t.stages.len() == 1) {
            a.stage = task.stages[0].name.clone();
        }
    }
}

/// Checks the (normalised) tasks of `plan` and its assignments for `node` (which has
/// `node_millicores`), before an agent acts on any of them: a plan is applied whole or not at
/// all. Each assignment's variant must be one of its stage's.
pub fn validate_for_node(plan: &Plan, node: &str, node_millicores: u32) -> Result<(), PlanError> {
    if !plan.for_node.is_empty() && plan.for_node != node {
        return Err(PlanError::NotForThisNode { for_node: plan.for_node.clone(), node: node.into() });
    }
    for t in &plan.tasks {
        crate::task::validate_task(t).map_err(|reason| PlanError::BadTask { task: t.name.clone(), reason })?;
    }
    for (index, r) in plan.routes.iter().enumerate() {
        let bad = |reason: String| PlanError::BadRoute { index, reason };
        let task =
            plan.tasks.iter().find(|t| t.name == r.task).ok_or_else(|| bad(format!("unknown task {:?}", r.task)))?;
        if !task.stages.iter().any(|s| s.name == r.stage) {
            return Err(bad(format!("task {:?} has no stage {:?}", r.task, r.stage)));
        }
        if r.node == node || !crate::task::valid_name(&r.node) {
            return Err(bad(format!("{:?} is not another node", r.node)));
        }
        if !r.weight.is_finite() || r.weight < 0.0 {
            return Err(bad(format!("weight {} is not a finite share", r.weight)));
        }
    }
    let workers = plan.assignments.iter().filter(|a| a.node == node).count();
    if workers > MAX_WORKERS_PER_NODE {
        return Err(PlanError::TooManyWorkers { node: node.into(), workers });
    }
    let mut seen = HashSet::new();
    let mut total = 0u32;
    for (index, a) in plan.assignments.iter().enumerate().filter(|(_, a)| a.node == node) {
        validate_assignment(a).map_err(|reason| PlanError::BadAssignment { index, reason })?;
        let task =
            plan.tasks.iter().find(|t| t.name == a.task).ok_or_else(|| PlanError::UnknownTask(a.task.clone()))?;
        let variant = a.variant.as_ref().map(|v| v.name.clone()).unwrap_or_default();
        let in_stage = task.stages.iter().any(|s| s.name == a.stage && s.variants.iter().any(|v| v.name == variant));
        if !in_stage {
            return Err(PlanError::UnknownVariant { index, task: a.task.clone(), stage: a.stage.clone(), variant });
        }
        if !seen.insert((a.task.clone(), variant.clone(), a.replica)) {
            return Err(PlanError::Duplicate { task: a.task.clone(), variant, replica: a.replica, node: node.into() });
        }
        total = total.saturating_add(a.millicores);
    }
    if total > node_millicores {
        return Err(PlanError::OverCommitted { node: node.into(), asked: total, has: node_millicores });
    }
    Ok(())
}

/// Checks a whole plan as the replicated state takes it: every node it names is known (with
/// its cores from `node_millicores`) and its share of the plan passes [`validate_for_node`].
pub fn validate_plan(plan: &Plan, node_millicores: impl Fn(&str) -> Option<u32>) -> Result<(), String> {
    if !plan.for_node.is_empty() || !plan.routes.is_empty() {
        return Err(format!("a plan cut for node {:?} is not a whole plan", plan.for_node));
    }
    let nodes: std::collections::BTreeSet<&str> = plan.assignments.iter().map(|a| a.node.as_str()).collect();
    for node in nodes {
        let millicores = node_millicores(node).ok_or_else(|| format!("the plan names an unknown node {node:?}"))?;
        validate_for_node(plan, node, millicores).map_err(|e| e.to_string())?;
    }
    for t in &plan.tasks {
        crate::task::validate_task(t).map_err(|reason| format!("task {:?} in the plan: {reason}", t.name))?;
    }
    Ok(())
}

/// Checks a node's registration: a valid name, `ip:port` addresses, 1..=[`MAX_NODE_CORES`]
/// cores.
pub fn validate_node(n: &RegisterNodeRequest) -> Result<(), String> {
    if !crate::task::valid_name(&n.node) {
        return Err(format!("node name {:?} must be 1–64 characters of [A-Za-z0-9-_.]", n.node));
    }
    // An empty control address is an older registration's: control and inference shared a port.
    let control = Some(&n.control_address).filter(|a| !a.is_empty());
    for address in std::iter::once(&n.address).chain(control) {
        if address.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!("node {}: {address:?} is not an ip:port address", n.node));
        }
    }
    if !(1..=MAX_NODE_CORES).contains(&n.cores) {
        return Err(format!("node {}: {} cores is outside 1–{MAX_NODE_CORES}", n.node, n.cores));
    }
    Ok(())
}

fn validate_assignment(a: &Assignment) -> Result<(), String> {
    crate::variant::validate_variant(a.variant.as_ref().ok_or("no variant")?)?;
    if a.millicores < MIN_WORKER_MILLICORES {
        return Err(format!("{} millicores is below the smallest quota, {MIN_WORKER_MILLICORES}", a.millicores));
    }
    if a.max_batch == 0 || a.max_batch > MAX_BATCH {
        return Err(format!("max batch {} outside 1..={MAX_BATCH}", a.max_batch));
    }
    if a.max_delay_ms > MAX_DELAY_MS {
        return Err(format!("max delay {} ms over {MAX_DELAY_MS}", a.max_delay_ms));
    }
    if !a.weight.is_finite() || a.weight < 0.0 {
        return Err(format!("weight {} is not a finite share", a.weight));
    }
    Ok(())
}

#[derive(Debug, Error, PartialEq)]
#[error(
    "the plan does not fit the cluster: a worker of {cores} cores finds no node with that many free (at most {} free on a node, {} in all)",
    free.iter().max().unwrap_or(&0), free.iter().map(|&f| f as u64).sum::<u64>()
)]
pub struct PlacementError {
    /// The index of the worker that found no room.
    pub worker: usize,
    pub cores: u32,
    pub free: Vec<u32>,
}

/// Places workers (their core counts, in order) onto nodes (their free cores), largest worker
/// first. Replicas of a variant (one group) are spread over nodes where they can be, which
/// survives the loss of a node, but share one when nothing else has room. A worker stays on a
/// node where its group already runs (`current[i]`) if it can — a move costs a model load —
/// and otherwise goes to the node with the most free cores. Returns a node index per worker.
pub fn place<G: Hash + Eq>(
    workers: &[u32],
    groups: &[G],
    current: &[Vec<usize>],
    free: &[u32],
) -> Result<Vec<usize>, PlacementError> {
    let mut free = free.to_vec();
    let mut order: Vec<usize> = (0..workers.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(workers[i]));
    let mut placed: Vec<Option<usize>> = vec![None; workers.len()];
    // The nodes each group has a worker on already.
    let mut group_nodes: HashMap<&G, HashSet<usize>> = HashMap::new();
    for i in order {
        let cores = workers[i];
        let taken = group_nodes.get(&groups[i]);
        let taken = |n: usize| taken.is_some_and(|t| t.contains(&n));
        let runs_there = |n: usize| current.get(i).is_some_and(|nodes| nodes.contains(&n));
        let node = (0..free.len())
            .filter(|&n| free[n] >= cores)
            .max_by_key(|&n| (!taken(n), runs_there(n), free[n], std::cmp::Reverse(n)));
        let Some(node) = node else {
            return Err(PlacementError { worker: i, cores, free });
        };
        free[node] -= cores;
        placed[i] = Some(node);
        group_nodes.entry(&groups[i]).or_default().insert(node);
    }
    Ok(placed.into_iter().map(|n| n.unwrap_or_default()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidal_proto::v1::{TaskSpec, VariantSpec};

    fn variant(name: &str) -> VariantSpec {
        VariantSpec {
            name: name.into(),
            model_file: format!("{name}.onnx"),
            accuracy: 70.0,
            input_shape: vec![3, 32, 32],
            tensor_names: Default::default(),
            tokenizer_file: String::new(),
            io: None,
        }
    }

    fn assignment(name: &str, millicores: u32) -> Assignment {
        Assignment {
            task: "t".into(),
            stage: "t".into(),
            variant: Some(variant(name)),
            node: "n1".into(),
            millicores,
            max_batch: 4,
            max_delay_ms: 5,
            weight: 0.5,
            replica: 0,
        }
    }

    fn plan(assignments: Vec<Assignment>) -> Plan {
        Plan {
            epoch: 1,
            term: 1,
            tasks: vec![crate::task::single_stage("t", 100, vec![variant("a"), variant("b")])],
            assignments,
            ..Default::default()
        }
    }

    #[test]
    fn a_well_formed_plan_passes() {
        let p = plan(vec![assignment("a", 1000), assignment("b", 1000)]);
        assert_eq!(validate_for_node(&p, "n1", 2000), Ok(()));
    }

    #[test]
    fn malformed_plans_are_refused_with_the_reason() {
        let mut bad = assignment("a", 1000);
        bad.variant.as_mut().unwrap().model_file = "../../etc/passwd".into();
        assert!(matches!(validate_for_node(&plan(vec![bad]), "n1", 2000), Err(PlanError::BadAssignment { .. })));
        let mut bad = assignment("a", 1000);
        bad.max_batch = 0;
        assert!(matches!(validate_for_node(&plan(vec![bad]), "n1", 2000), Err(PlanError::BadAssignment { .. })));
        let p = plan(vec![assignment("a", 1000), assignment("a", 500)]);
        assert!(matches!(validate_for_node(&p, "n1", 2000), Err(PlanError::Duplicate { .. })));
        let mut second = assignment("a", 500);
        second.replica = 1;
        assert_eq!(validate_for_node(&plan(vec![assignment("a", 1000), second]), "n1", 2000), Ok(()));
        let p = plan(vec![assignment("a", 1500), assignment("b", 1000)]);
        assert!(matches!(validate_for_node(&p, "n1", 2000), Err(PlanError::OverCommitted { .. })));
        let mut p = plan(vec![assignment("a", 1000)]);
        p.tasks.clear();
        assert_eq!(validate_for_node(&p, "n1", 2000), Err(PlanError::UnknownTask("t".into())));
        let mut elsewhere = assignment("a", 1000);
        elsewhere.stage = "other".into();
        assert!(matches!(validate_for_node(&plan(vec![elsewhere]), "n1", 2000), Err(PlanError::UnknownVariant { .. })));
        let mut p = plan(vec![assignment("a", 1000)]);
        p.tasks[0].slo_ms = 0;
        assert!(matches!(validate_for_node(&p, "n1", 2000), Err(PlanError::BadTask { .. })));
    }

    #[test]
    fn a_cut_plan_is_taken_only_by_its_node_and_its_routes_are_checked() {
        let mut whole = plan(vec![assignment("a", 1000)]);
        whole.assignments.push(Assignment { node: "n2".into(), ..assignment("b", 1000) });
        let c = cut(&whole, "n1");
        assert_eq!(validate_for_node(&c, "n1", 2000), Ok(()));
        assert!(matches!(validate_for_node(&c, "n2", 2000), Err(PlanError::NotForThisNode { .. })));
        assert!(validate_plan(&c, |_| Some(2000)).is_err(), "the state commits whole plans only");
        for bad in [
            |r: &mut tidal_proto::v1::Route| r.task = "unknown".into(),
            |r: &mut tidal_proto::v1::Route| r.stage = "unknown".into(),
            |r: &mut tidal_proto::v1::Route| r.node = "n1".into(),
            |r: &mut tidal_proto::v1::Route| r.node = "../x".into(),
            |r: &mut tidal_proto::v1::Route| r.weight = f64::INFINITY,
        ] {
            let mut c = c.clone();
            bad(&mut c.routes[0]);
            assert!(matches!(validate_for_node(&c, "n1", 2000), Err(PlanError::BadRoute { index: 0, .. })));
        }
    }

    #[test]
    fn a_plan_from_before_stages_is_read_as_one_stage() {
        let mut old = plan(vec![assignment("a", 1000)]);
        old.tasks[0] = TaskSpec { name: "t".into(), slo_ms: 100, variants: vec![variant("a")], ..Default::default() };
        old.assignments[0].stage.clear();
        normalise(&mut old);
        assert_eq!(old.tasks[0].stages[0].name, "t");
        assert_eq!(old.assignments[0].stage, "t");
        assert_eq!(validate_for_node(&old, "n1", 2000), Ok(()));
    }

    #[test]
    fn placement_keeps_workers_where_they_run_and_reports_what_does_not_fit() {
        assert_eq!(place(&[2, 1], &["a", "b"], &[vec![], vec![1]], &[2, 2]), Ok(vec![0, 1]));
        assert_eq!(place(&[1, 1], &["a", "b"], &[vec![], vec![]], &[2, 1]), Ok(vec![0, 0]));
        assert!(place(&[3], &["a"], &[vec![]], &[2, 2]).is_err());
    }

    #[test]
    fn replicas_of_one_variant_are_spread_over_nodes() {
        // Node 0 has room for both, but the second replica of "a" goes to node 1.
        assert_eq!(place(&[1, 1], &["a", "a"], &[vec![], vec![]], &[4, 2]), Ok(vec![0, 1]));
        // Both replicas stay where they run.
        assert_eq!(place(&[1, 1], &["a", "a"], &[vec![1, 2], vec![1, 2]], &[4, 2, 2]), Ok(vec![1, 2]));
        // Two replicas, one node: they share it.
        assert_eq!(place(&[1, 1], &["a", "a"], &[vec![], vec![]], &[4]), Ok(vec![0, 0]));
        assert!(place(&[3, 2], &["a", "a"], &[vec![], vec![]], &[4]).is_err());
    }
}
