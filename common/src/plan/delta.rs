//! Plans written as their change from a base plan: what the Raft log carries each round (the
//! base is the plan in force) and what an agent is sent when it holds the plan cut for it the
//! round before. Either grows with what changed rather than with the cluster.
//!
//! A task is the unit of change: a task whose spec, workers or routes differ comes whole, a
//! task that is gone is named, and the rest is the base's. Notes are written as references to
//! the base's where they repeat; the maps as what was set and what was removed. Every replica
//! (and the agent) rebuilds the same plan from the same base and delta.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tidal_proto::v1::{note_ref, Assignment, NoteRef, Plan, PlanDelta, Route, TaskSpec};

/// A task of a plan: its spec (if the plan has it), assignments and routes, in plan order.
#[derive(PartialEq, Default)]
struct TaskPart<'a> {
    spec: Option<&'a TaskSpec>,
    assignments: Vec<&'a Assignment>,
    routes: Vec<&'a Route>,
}

fn by_task(plan: &Plan) -> BTreeMap<&str, TaskPart<'_>> {
    let mut tasks: BTreeMap<&str, TaskPart<'_>> = BTreeMap::new();
    for t in &plan.tasks {
        tasks.entry(t.name.as_str()).or_default().spec = Some(t);
    }
    for a in &plan.assignments {
        tasks.entry(a.task.as_str()).or_default().assignments.push(a);
    }
    for r in &plan.routes {
        tasks.entry(r.task.as_str()).or_default().routes.push(r);
    }
    tasks
}

/// `plan` in the order [`apply`] rebuilds it: tasks by name, assignments and routes grouped by
/// task in that order (each task's in the order it had).
pub fn canonical(mut plan: Plan) -> Plan {
    plan.tasks.sort_by(|a, b| a.name.cmp(&b.name));
    plan.assignments.sort_by(|a, b| a.task.cmp(&b.task));
    plan.routes.sort_by(|a, b| a.task.cmp(&b.task));
    plan
}

/// What of map `next` differs from `base`: the entries set or changed, and the keys removed.
fn map_delta<V: Clone + PartialEq>(
    base: &HashMap<String, V>,
    next: &HashMap<String, V>,
) -> (HashMap<String, V>, Vec<String>) {
    let set = next.iter().filter(|(k, v)| base.get(*k) != Some(v)).map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut removed: Vec<String> = base.keys().filter(|k| !next.contains_key(*k)).cloned().collect();
    removed.sort();
    (set, removed)
}

fn map_apply<V: Clone>(base: &HashMap<String, V>, set: &HashMap<String, V>, removed: &[String]) -> HashMap<String, V> {
    let mut map = base.clone();
    for k in removed {
        map.remove(k);
    }
    map.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
    map
}

/// `next` as its change from `base` (`None`: from nothing, e.g. before the first plan).
pub fn delta(base: Option<&Plan>, next: &Plan) -> PlanDelta {
    let empty = Plan::default();
    let base = base.unwrap_or(&empty);
    let before = by_task(base);
    let after = by_task(next);
    let base_notes: HashMap<&str, u32> =
        base.notes.iter().enumerate().rev().map(|(i, n)| (n.as_str(), i as u32)).collect();
    let (planned_rps, removed_planned_rps) = map_delta(&base.planned_rps, &next.planned_rps);
    let (node_addresses, removed_node_addresses) = map_delta(&base.node_addresses, &next.node_addresses);
    let mut d = PlanDelta {
        epoch: next.epoch,
        term: next.term,
        notes: next
            .notes
            .iter()
            .map(|n| NoteRef {
                note: Some(match base_notes.get(n.as_str()) {
                    Some(&i) => note_ref::Note::Base(i),
                    None => note_ref::Note::Text(n.clone()),
                }),
            })
            .collect(),
        planned_rps,
        removed_planned_rps,
        node_addresses,
        removed_node_addresses,
        transition: next.transition,
        routing: next.routing,
        for_node: next.for_node.clone(),
        corrections: if base.corrections == next.corrections { Vec::new() } else { next.corrections.clone() },
        corrections_kept: base.corrections == next.corrections,
        ..Default::default()
    };
    for (name, part) in &after {
        if before.get(name) == Some(part) {
            continue;
        }
        d.tasks.extend(part.spec.cloned());
        d.assignments.extend(part.assignments.iter().map(|a| (*a).clone()));
        d.routes.extend(part.routes.iter().map(|r| (*r).clone()));
        if part.spec.is_none() {
            // Workers or routes of a task the plan does not define (refused when validated):
            // named, so that they replace the base's rather than add to them.
            d.removed_tasks.push(name.to_string());
        }
    }
    d.removed_tasks.extend(before.keys().filter(|t| !after.contains_key(*t)).map(|t| t.to_string()));
    d
}

/// The plan `delta` makes of `base`, in [`canonical`] order. A delta that names a task twice,
/// gives workers or routes of a task it neither defines nor names, or refers to a note the
/// base does not have, is refused.
pub fn apply(base: Option<&Plan>, delta: &PlanDelta) -> Result<Plan, String> {
    let empty = Plan::default();
    let base = base.unwrap_or(&empty);
    type Owned = (Option<TaskSpec>, Vec<Assignment>, Vec<Route>);
    let mut tasks: BTreeMap<String, Owned> = by_task(base)
        .into_iter()
        .map(|(name, p)| {
            let owned = (
                p.spec.cloned(),
                p.assignments.into_iter().cloned().collect(),
                p.routes.into_iter().cloned().collect(),
            );
            (name.to_string(), owned)
        })
        .collect();
    let mut replaced = BTreeSet::new();
    for name in &delta.removed_tasks {
        tasks.remove(name);
        replaced.insert(name.as_str());
    }
    for spec in &delta.tasks {
        if !replaced.insert(spec.name.as_str()) {
            return Err(format!("the plan delta names task {:?} twice", spec.name));
        }
        tasks.insert(spec.name.clone(), (Some(spec.clone()), Vec::new(), Vec::new()));
    }
    let undefined =
        |task: &str| format!("the plan delta gives workers or routes of task {task:?}, which it does not define");
    for a in &delta.assignments {
        if !replaced.contains(a.task.as_str()) {
            return Err(undefined(&a.task));
        }
        tasks.entry(a.task.clone()).or_default().1.push(a.clone());
    }
    for r in &delta.routes {
        if !replaced.contains(r.task.as_str()) {
            return Err(undefined(&r.task));
        }
        tasks.entry(r.task.clone()).or_default().2.push(r.clone());
    }
    let notes =
        delta
            .notes
            .iter()
            .map(|n| match &n.note {
                Some(note_ref::Note::Text(text)) => Ok(text.clone()),
                Some(note_ref::Note::Base(i)) => base.notes.get(*i as usize).cloned().ok_or_else(|| {
                    format!("the plan delta refers to note {i}; the base plan has {}", base.notes.len())
                }),
                None => Err("the plan delta has an empty note".to_string()),
            })
            .collect::<Result<Vec<String>, String>>()?;
    let mut plan = Plan {
        epoch: delta.epoch,
        term: delta.term,
        notes,
        planned_rps: map_apply(&base.planned_rps, &delta.planned_rps, &delta.removed_planned_rps),
        node_addresses: map_apply(&base.node_addresses, &delta.node_addresses, &delta.removed_node_addresses),
        transition: delta.transition,
        routing: delta.routing,
        for_node: delta.for_node.clone(),
        corrections: if delta.corrections_kept { base.corrections.clone() } else { delta.corrections.clone() },
        ..Default::default()
    };
    for (_, (spec, assignments, routes)) in tasks {
        plan.tasks.extend(spec);
        plan.assignments.extend(assignments);
        plan.routes.extend(routes);
    }
    Ok(plan)
}

/// Every node's cut of `next` as its change from its cut of `base` (both plans canonical, as
/// committed): the same as [`delta`] of the two cuts, made from the tasks that changed between
/// the whole plans, so that a push to a thousand nodes does not cut every task twice for each.
pub struct CutDeltas<'a> {
    base: BTreeMap<&'a str, TaskPart<'a>>,
    next: BTreeMap<&'a str, TaskPart<'a>>,
    /// Tasks whose whole part differs: only their cut parts can.
    changed: Vec<&'a str>,
    /// How the addresses of the nodes that serve something changed.
    addresses: (HashMap<String, String>, Vec<String>),
    epoch: u64,
    term: u64,
    transition: i32,
    routing: i32,
}

/// One node's view of a task: its spec, the node's workers and the routes to the others'.
#[derive(PartialEq)]
struct CutPart<'a> {
    spec: Option<&'a TaskSpec>,
    assignments: Vec<&'a Assignment>,
    routes: Vec<Route>,
}

impl<'a> CutDeltas<'a> {
    pub fn new(base: &'a Plan, next: &'a Plan) -> Self {
        let (before, after) = (by_task(base), by_task(next));
        let changed = before
            .keys()
            .chain(after.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|t| before.get(*t) != after.get(*t))
            .copied()
            .collect();
        let serving = |plan: &Plan| -> HashMap<String, String> {
            let nodes: BTreeSet<&str> = plan.assignments.iter().map(|a| a.node.as_str()).collect();
            plan.node_addresses
                .iter()
                .filter(|(n, _)| nodes.contains(n.as_str()))
                .map(|(n, a)| (n.clone(), a.clone()))
                .collect()
        };
        Self {
            addresses: map_delta(&serving(base), &serving(next)),
            base: before,
            next: after,
            changed,
            epoch: next.epoch,
            term: next.term,
            transition: next.transition,
            routing: next.routing,
        }
    }

    fn part(tasks: &BTreeMap<&'a str, TaskPart<'a>>, task: &str, node: &str) -> Option<CutPart<'a>> {
        let whole = tasks.get(task)?;
        let mut routes: BTreeMap<(&str, &str), f64> = BTreeMap::new();
        for a in whole.assignments.iter().filter(|a| a.node != node) {
            *routes.entry((a.stage.as_str(), a.node.as_str())).or_default() += a.weight;
        }
        let part = CutPart {
            spec: whole.spec,
            assignments: whole.assignments.iter().copied().filter(|a| a.node == node).collect(),
            routes: routes
                .into_iter()
                .map(|((stage, n), weight)| Route { task: task.into(), stage: stage.into(), node: n.into(), weight })
                .collect(),
        };
        // A cut has a task if it has its spec, a worker or a route.
        (part.spec.is_some() || !part.assignments.is_empty() || !part.routes.is_empty()).then_some(part)
    }

    pub fn for_node(&self, node: &str) -> PlanDelta {
        // A cut holds the addresses of the serving nodes but its own.
        let (set, removed) = &self.addresses;
        let mut d = PlanDelta {
            epoch: self.epoch,
            term: self.term,
            node_addresses: set.iter().filter(|(n, _)| *n != node).map(|(n, a)| (n.clone(), a.clone())).collect(),
            removed_node_addresses: removed.iter().filter(|n| *n != node).cloned().collect(),
            transition: self.transition,
            routing: self.routing,
            for_node: node.to_string(),
            ..Default::default()
        };
        let mut removed = Vec::new();
        for task in &self.changed {
            let (before, after) = (Self::part(&self.base, task, node), Self::part(&self.next, task, node));
            match after {
                None if before.is_some() => removed.push(task.to_string()),
                Some(part) if before.as_ref() != Some(&part) => {
                    d.tasks.extend(part.spec.cloned());
                    d.assignments.extend(part.assignments.iter().map(|a| (*a).clone()));
                    d.routes.extend(part.routes);
                    if part.spec.is_none() {
                        d.removed_tasks.push(task.to_string());
                    }
                }
                _ => {}
            }
        }
        d.removed_tasks.extend(removed);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;
    use tidal_proto::v1::VariantSpec;

    fn worker(task: usize, node: usize, millicores: u32) -> Assignment {
        Assignment {
            task: format!("t{task}"),
            stage: format!("t{task}"),
            variant: Some(VariantSpec {
                name: "v".into(),
                model_file: "v.onnx".into(),
                accuracy: 70.0,
                input_shape: vec![3],
                tensor_names: Default::default(),
                tokenizer_file: String::new(),
                io: None,
                model_sha256: String::new(),
            }),
            node: format!("n{node}"),
            millicores,
            max_batch: 4,
            max_delay_ms: 5,
            weight: 1.0,
            replica: node as u32,
            memory_bytes: 0,
        }
    }

    /// A plan of some of 6 tasks, each with workers on some of 4 nodes, some notes (repeated
    /// ones too), planned rates, profile corrections and addresses.
    fn plans() -> impl Strategy<Value = Plan> {
        let tasks = proptest::collection::btree_map(
            0..6usize,
            (proptest::collection::btree_map(0..4usize, 1..4u32, 0..4), 50..60u32, 0..3u32),
            0..6,
        );
        (tasks, proptest::collection::vec(0..4u32, 0..6), 0..4usize).prop_map(|(tasks, notes, nodes)| {
            let mut plan = Plan { epoch: 1, term: 1, ..Default::default() };
            // Tasks in reverse order: the rebuilt plan is in canonical order whatever order it
            // was made in.
            for (t, (workers, slo, rate)) in tasks.into_iter().rev() {
                plan.tasks.push(crate::task::single_stage(&format!("t{t}"), slo, vec![]));
                plan.assignments.extend(workers.into_iter().map(|(n, c)| worker(t, n, c * 1000)));
                plan.planned_rps.insert(format!("t{t}"), rate as f64);
                if rate > 0 {
                    plan.corrections.push(tidal_proto::v1::PlanCorrection {
                        task: format!("t{t}"),
                        variant: "v".into(),
                        factor: 1.0 + rate as f64 / 10.0,
                        profile: rate as u64,
                    });
                }
            }
            plan.notes = notes.into_iter().map(|n| format!("note {n}")).collect();
            plan.node_addresses = (0..nodes).map(|n| (format!("n{n}"), format!("10.0.0.{n}:7000"))).collect();
            plan
        })
    }

    proptest! {
        #[test]
        fn a_delta_applied_to_its_base_is_the_next_plan(base in plans(), next in plans(), node in 0..4usize) {
            let base = canonical(base);
            // Nothing changed: nothing written, the base's corrections kept.
            let same = delta(Some(&base), &base);
            prop_assert!(same.corrections_kept && same.corrections.is_empty());
            prop_assert_eq!(apply(Some(&base), &same).unwrap(), base.clone());
            let d = delta(Some(&base), &next);
            prop_assert_eq!(apply(Some(&base), &d).unwrap(), canonical(next.clone()));
            prop_assert_eq!(apply(None, &delta(None, &next)).unwrap(), canonical(next.clone()));
            // The same for the plans cut for one node, as an agent rebuilds them.
            let (base_cut, next_cut) = (canonical(crate::plan::cut(&base, &format!("n{node}"))), crate::plan::cut(&next, &format!("n{node}")));
            prop_assert_eq!(apply(Some(&base_cut), &delta(Some(&base_cut), &next_cut)).unwrap(), canonical(next_cut.clone()));
            // Made from the whole plans' change, it rebuilds the same cut.
            let next = canonical(next);
            let from_whole = CutDeltas::new(&base, &next).for_node(&format!("n{node}"));
            prop_assert_eq!(apply(Some(&base_cut), &from_whole).unwrap(), canonical(next_cut));
        }
    }

    #[test]
    fn an_unchanged_task_is_not_written_and_a_change_carries_only_its_task() {
        let mut base = canonical(Plan {
            tasks: (0..3).map(|t| crate::task::single_stage(&format!("t{t}"), 100, vec![])).collect(),
            assignments: vec![worker(0, 0, 1000), worker(1, 0, 1000), worker(1, 1, 2000), worker(2, 1, 1000)],
            notes: vec!["t0: why".into(), "t1: why".into(), "t2: why".into()],
            ..Default::default()
        });
        base.planned_rps = [("t0".to_string(), 10.0), ("t1".to_string(), 20.0)].into_iter().collect();
        let mut next = base.clone();
        next.epoch = 2;
        next.assignments[1].millicores = 1500;
        next.notes[1] = "t1: another reason".into();
        next.planned_rps.insert("t1".into(), 25.0);
        let d = delta(Some(&base), &next);
        assert_eq!(d.tasks.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), vec!["t1"]);
        assert_eq!(d.assignments.len(), 2, "all of t1's workers, none of the others'");
        assert!(d.removed_tasks.is_empty());
        let texts: Vec<_> = d.notes.iter().filter(|n| matches!(n.note, Some(note_ref::Note::Text(_)))).collect();
        assert_eq!(texts.len(), 1, "the unchanged notes are references");
        assert_eq!(d.planned_rps.keys().collect::<Vec<_>>(), vec!["t1"]);
        let unchanged = delta(Some(&base), &base);
        assert!(unchanged.tasks.is_empty() && unchanged.assignments.is_empty() && unchanged.planned_rps.is_empty());
        assert!(unchanged.encoded_len() * 2 < base.encoded_len());
        next.tasks.retain(|t| t.name != "t2");
        next.assignments.retain(|a| a.task != "t2");
        next.planned_rps.remove("t0");
        let d = delta(Some(&base), &next);
        assert_eq!(d.removed_tasks, vec!["t2".to_string()]);
        assert_eq!(d.removed_planned_rps, vec!["t0".to_string()]);
    }

    #[test]
    fn a_malformed_delta_is_refused() {
        let twice = PlanDelta {
            tasks: vec![crate::task::single_stage("t", 100, vec![]), crate::task::single_stage("t", 200, vec![])],
            ..Default::default()
        };
        assert!(apply(None, &twice).unwrap_err().contains("twice"));
        let stray = PlanDelta { assignments: vec![worker(0, 0, 1000)], ..Default::default() };
        assert!(apply(None, &stray).unwrap_err().contains("does not define"));
        let note = PlanDelta { notes: vec![NoteRef { note: Some(note_ref::Note::Base(3)) }], ..Default::default() };
        assert!(apply(None, &note).unwrap_err().contains("note 3"));
    }
}
