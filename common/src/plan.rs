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
    #[error("node {node:?} is asked for {} of memory but declared {}", crate::memory::human(*asked), crate::memory::human(*has))]
    OverCommittedMemory { node: String, asked: u64, has: u64 },
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

/// What a node offers its workers: millicores, and memory (0: not declared, not checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capacity {
    pub millicores: u32,
    pub memory_bytes: u64,
}

impl From<u32> for Capacity {
    /// Millicores only: a node that declared no memory.
    fn from(millicores: u32) -> Self {
        Self { millicores, memory_bytes: 0 }
    }
}

/// Checks the (normalised) tasks of `plan` and its assignments for `node` (which has
/// `capacity`), before an agent acts on any of them: a plan is applied whole or not at all.
/// Each assignment's variant must be one of its stage's; together they fit the node's cores
/// and, when it declared its memory, its memory.
pub fn validate_for_node(plan: &Plan, node: &str, capacity: impl Into<Capacity>) -> Result<(), PlanError> {
    let Capacity { millicores: node_millicores, memory_bytes: node_memory } = capacity.into();
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
    let mut memory = 0u64;
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
        memory = memory.saturating_add(a.memory_bytes);
    }
    if total > node_millicores {
        return Err(PlanError::OverCommitted { node: node.into(), asked: total, has: node_millicores });
    }
    if node_memory > 0 && memory > node_memory {
        return Err(PlanError::OverCommittedMemory { node: node.into(), asked: memory, has: node_memory });
    }
    Ok(())
}

/// Checks a whole plan as the replicated state takes it: every node it names is known (with
/// its capacity from `node_capacity`) and its share of the plan passes [`validate_for_node`].
pub fn validate_plan(plan: &Plan, node_capacity: impl Fn(&str) -> Option<Capacity>) -> Result<(), String> {
    if !plan.for_node.is_empty() || !plan.routes.is_empty() {
        return Err(format!("a plan cut for node {:?} is not a whole plan", plan.for_node));
    }
    let nodes: std::collections::BTreeSet<&str> = plan.assignments.iter().map(|a| a.node.as_str()).collect();
    for node in nodes {
        let capacity = node_capacity(node).ok_or_else(|| format!("the plan names an unknown node {node:?}"))?;
        validate_for_node(plan, node, capacity).map_err(|e| e.to_string())?;
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
    let most = crate::memory::MAX_NODE_BYTES;
    if n.memory_bytes > most || n.memory_total_bytes > most {
        return Err(format!("node {}: memory over {} declared", n.node, crate::memory::human(most)));
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
    if a.memory_bytes > crate::memory::MAX_NODE_BYTES {
        return Err(format!("{} bytes of memory is more than a node may have", a.memory_bytes));
    }
    Ok(())
}

/// What a worker needs, or a node has free: whole cores and memory (a node that declared no
/// memory has `u64::MAX`; a worker whose memory was not measured needs 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Room {
    pub cores: u32,
    pub memory_bytes: u64,
}

impl Room {
    pub fn holds(&self, worker: &Room) -> bool {
        self.cores >= worker.cores && self.memory_bytes >= worker.memory_bytes
    }
}

#[derive(Debug, Error, PartialEq)]
#[error("the plan does not fit the cluster: a worker of {} finds no node with that much free ({})", needs.show(), free.iter().map(Room::show).collect::<Vec<_>>().join(", "))]
pub struct PlacementError {
    /// The index of the worker that found no room.
    pub worker: usize,
    pub needs: Room,
    pub free: Vec<Room>,
}

impl PlacementError {
    /// Whether a node has the worker's cores free, so that memory is what it lacks.
    pub fn short_of_memory(&self) -> bool {
        self.free.iter().any(|f| f.cores >= self.needs.cores)
    }
}

impl Room {
    fn show(&self) -> String {
        match self.memory_bytes {
            0 => format!("{} cores", self.cores),
            u64::MAX => format!("{} cores", self.cores),
            m => format!("{} cores and {}", self.cores, crate::memory::human(m)),
        }
    }
}

/// Places workers (what each needs, in order) onto nodes (what each has free), largest worker
/// first. Replicas of a variant (one group) are spread over nodes where they can be, which
/// survives the loss of a node, but share one when nothing else has room. A worker stays on a
/// node where its group already runs (`current[i]`) if it can — a move costs a model load —
/// and otherwise goes to the node with the most free cores (then memory). Returns a node index
/// per worker.
pub fn place<G: Hash + Eq>(
    workers: &[Room],
    groups: &[G],
    current: &[Vec<usize>],
    free: &[Room],
) -> Result<Vec<usize>, PlacementError> {
    let mut free = free.to_vec();
    let mut order: Vec<usize> = (0..workers.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(workers[i]));
    let mut placed: Vec<Option<usize>> = vec![None; workers.len()];
    // The nodes each group has a worker on already.
    let mut group_nodes: HashMap<&G, HashSet<usize>> = HashMap::new();
    for i in order {
        let needs = workers[i];
        let taken = group_nodes.get(&groups[i]);
        let taken = |n: usize| taken.is_some_and(|t| t.contains(&n));
        let runs_there = |n: usize| current.get(i).is_some_and(|nodes| nodes.contains(&n));
        let node = (0..free.len())
            .filter(|&n| free[n].holds(&needs))
            .max_by_key(|&n| (!taken(n), runs_there(n), free[n], std::cmp::Reverse(n)));
        let Some(node) = node else {
            return Err(PlacementError { worker: i, needs, free });
        };
        free[node].cores -= needs.cores;
        free[node].memory_bytes -= needs.memory_bytes;
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
            model_sha256: String::new(),
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
            memory_bytes: 0,
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
        assert!(validate_plan(&c, |_| Some(2000.into())).is_err(), "the state commits whole plans only");
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

    fn cores(cores: &[u32]) -> Vec<Room> {
        cores.iter().map(|&cores| Room { cores, memory_bytes: 0 }).collect()
    }

    fn place<G: Hash + Eq>(
        workers: &[u32],
        groups: &[G],
        current: &[Vec<usize>],
        free: &[u32],
    ) -> Result<Vec<usize>, PlacementError> {
        let free: Vec<Room> = free.iter().map(|&cores| Room { cores, memory_bytes: u64::MAX }).collect();
        super::place(&cores(workers), groups, current, &free)
    }

    #[test]
    fn memory_binds_placement_and_a_node_over_its_memory_is_refused() {
        const GIB: u64 = 1 << 30;
        let worker = |cores, gib| Room { cores, memory_bytes: gib * GIB };
        // Two 1-core workers of 3 GiB: node 0 has the cores for both but memory for one.
        let free = [worker(8, 4), worker(8, 4)];
        let groups = ["a", "b"];
        assert_eq!(super::place(&[worker(1, 3), worker(1, 3)], &groups, &[vec![0], vec![0]], &free), Ok(vec![0, 1]));
        let e = super::place(
            &[worker(1, 3), worker(1, 3), worker(1, 3)],
            &["a", "b", "c"],
            &[vec![], vec![], vec![]],
            &free,
        )
        .unwrap_err();
        assert!(e.short_of_memory(), "{e}");
        assert!(e.to_string().contains("1 cores and 3.0 GiB"), "{e}");
        // The node's check counts memory when it declared some, and only then.
        let mut a = assignment("a", 1000);
        a.memory_bytes = 3 * GIB;
        let mut b = assignment("b", 1000);
        b.memory_bytes = 3 * GIB;
        let p = plan(vec![a, b]);
        let declared = Capacity { millicores: 4000, memory_bytes: 4 * GIB };
        assert!(matches!(validate_for_node(&p, "n1", declared), Err(PlanError::OverCommittedMemory { .. })));
        assert_eq!(validate_for_node(&p, "n1", Capacity { memory_bytes: 6 * GIB, ..declared }), Ok(()));
        assert_eq!(validate_for_node(&p, "n1", 4000), Ok(()), "no memory declared: cores only");
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
