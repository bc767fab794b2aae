//! Make before break across nodes. An agent holds a worker's shrink or stop until the task's
//! new workers on its own node serve, but it cannot see the other nodes. So when a plan gives
//! a task workers that do not serve yet on some nodes and shrinks or stops the task's workers
//! on others, the round keeps those at their old shape and share; a later round (the
//! controller starts one when a worker comes up) lets them go once the successors serve. On
//! one node, as in the simulator, nothing is held: the agent's own rule applies.

use std::collections::{BTreeMap, BTreeSet};

use tidal_proto::v1::{Assignment, Plan};

use crate::plan::Capacity;

/// Ready workers per (node, task, variant), as the agents report them.
pub type Serving = BTreeMap<(String, String, String), u32>;

fn variant(a: &Assignment) -> &str {
    a.variant.as_ref().map_or("", |v| v.name.as_str())
}

fn serves(serving: &Serving, a: &Assignment) -> bool {
    let key = (a.node.clone(), a.task.clone(), variant(a).to_string());
    serving.get(&key).is_some_and(|&n| n > a.replica)
}

fn same_worker(a: &Assignment, b: &Assignment) -> bool {
    a.node == b.node && a.task == b.task && a.replica == b.replica && variant(a) == variant(b)
}

/// Keeps, in `target`, the workers of `current` that it would shrink or stop on a node while
/// the same task has workers that do not serve yet on other nodes, as long as the node has
/// room for them. Returns a note per task held.
pub fn hold_across_nodes(
    current: &Plan,
    target: &mut Plan,
    serving: &Serving,
    node_capacity: &BTreeMap<String, Capacity>,
) -> Vec<String> {
    let mut notes = Vec::new();
    let tasks: Vec<String> = target.tasks.iter().map(|t| t.name.clone()).collect();
    for task in tasks {
        let waiting: BTreeSet<String> = target
            .assignments
            .iter()
            .filter(|a| a.task == task && !serves(serving, a))
            .map(|a| a.node.clone())
            .collect();
        if waiting.is_empty() {
            continue;
        }
        // Only a worker the task's spec in `target` still has can be kept: one of a variant
        // a new version dropped is not a worker of the plan (and the plan would be refused).
        let spec = target.tasks.iter().find(|t| t.name == task);
        let in_spec = |a: &Assignment| {
            spec.is_some_and(|t| {
                t.stages.iter().any(|s| s.name == a.stage && s.variants.iter().any(|v| v.name == variant(a)))
            })
        };
        let held: Vec<&Assignment> = current
            .assignments
            .iter()
            .filter(|a| a.task == task && !waiting.contains(&a.node) && in_spec(a))
            .filter(|a| {
                let next = target.assignments.iter().find(|t| same_worker(t, a));
                next.is_none_or(|t| t.millicores < a.millicores)
            })
            .collect();
        let mut nodes_held = BTreeSet::new();
        for old in held {
            let others = target.assignments.iter().filter(|t| t.node == old.node && !same_worker(t, old));
            let (cores, memory) = others.fold((old.millicores, old.memory_bytes), |(c, m), t| {
                (c.saturating_add(t.millicores), m.saturating_add(t.memory_bytes))
            });
            let fits = |n: &Capacity| cores <= n.millicores && (n.memory_bytes == 0 || memory <= n.memory_bytes);
            if node_capacity.get(&old.node).is_some_and(fits) {
                target.assignments.retain(|t| !same_worker(t, old));
                target.assignments.push(old.clone());
                nodes_held.insert(old.node.clone());
            }
        }
        if !nodes_held.is_empty() {
            let held: Vec<String> = nodes_held.into_iter().collect();
            let waiting: Vec<String> = waiting.into_iter().collect();
            notes.push(format!(
                "{task}: workers on {} keep their size until the new ones on {} serve",
                held.join(", "),
                waiting.join(", ")
            ));
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidal_proto::v1::{TaskSpec, VariantSpec};

    fn worker(node: &str, variant: &str, millicores: u32, weight: f64) -> Assignment {
        Assignment {
            task: "t".into(),
            stage: "t".into(),
            variant: Some(VariantSpec { name: variant.into(), ..Default::default() }),
            node: node.into(),
            millicores,
            max_batch: 1,
            max_delay_ms: 0,
            weight,
            replica: 0,
            memory_bytes: 0,
        }
    }

    /// Task t of one stage of variants big and small.
    fn spec(name: &str, variants: &[&str]) -> TaskSpec {
        let variants = variants.iter().map(|v| VariantSpec { name: v.to_string(), ..Default::default() }).collect();
        crate::task::single_stage(name, 100, variants)
    }

    fn plan(assignments: Vec<Assignment>) -> Plan {
        Plan { tasks: vec![spec("t", &["big", "small"])], assignments, ..Default::default() }
    }

    fn capacity() -> BTreeMap<String, Capacity> {
        [("a".to_string(), 4000.into()), ("b".to_string(), 4000.into())].into()
    }

    #[test]
    fn a_shrink_on_one_node_waits_for_new_workers_on_another() {
        let current = plan(vec![worker("a", "big", 4000, 1.0)]);
        let target = plan(vec![worker("a", "big", 2000, 0.5), worker("b", "small", 2000, 0.5)]);
        let big_serves: Serving = [(("a".into(), "t".into(), "big".into()), 1)].into();
        let mut held = target.clone();
        let notes = hold_across_nodes(&current, &mut held, &big_serves, &capacity());
        assert!(held.assignments.contains(&worker("a", "big", 4000, 1.0)), "{held:?}");
        assert!(held.assignments.contains(&worker("b", "small", 2000, 0.5)));
        assert_eq!(notes, vec!["t: workers on a keep their size until the new ones on b serve"]);
        // Once b serves, the target goes through.
        let mut serving = big_serves.clone();
        serving.insert(("b".into(), "t".into(), "small".into()), 1);
        let mut next = target.clone();
        assert!(hold_across_nodes(&current, &mut next, &serving, &capacity()).is_empty());
        assert_eq!(next, target);
    }

    #[test]
    fn a_stop_waits_too_but_not_beyond_the_node_s_cores() {
        let current = plan(vec![worker("a", "big", 4000, 1.0)]);
        let target = plan(vec![worker("b", "small", 2000, 1.0)]);
        let mut held = target.clone();
        hold_across_nodes(&current, &mut held, &Serving::new(), &capacity());
        assert_eq!(held.assignments.len(), 2);
        // Node a now gives its cores to another task: no room to hold.
        let mut crowded = target.clone();
        let mut other = worker("a", "x", 3000, 1.0);
        other.task = "u".into();
        crowded.assignments.push(other);
        crowded.tasks.push(spec("u", &["x"]));
        let before = crowded.clone();
        hold_across_nodes(&current, &mut crowded, &Serving::new(), &capacity());
        assert_eq!(crowded, before);
    }

    /// A new version without the variant: its old workers are not held (the plan could not
    /// name them), whatever waits elsewhere.
    #[test]
    fn a_variant_the_new_version_dropped_is_not_held() {
        let current = plan(vec![worker("a", "big", 4000, 1.0)]);
        let mut target = plan(vec![worker("b", "small", 2000, 1.0)]);
        target.tasks = vec![spec("t", &["small"])];
        let mut next = target.clone();
        assert!(hold_across_nodes(&current, &mut next, &Serving::new(), &capacity()).is_empty());
        assert_eq!(next, target);
    }

    #[test]
    fn on_one_node_nothing_is_held() {
        let current = plan(vec![worker("a", "big", 4000, 1.0)]);
        let target = plan(vec![worker("a", "big", 2000, 0.5), worker("a", "small", 2000, 0.5)]);
        let mut next = target.clone();
        assert!(hold_across_nodes(&current, &mut next, &Serving::new(), &capacity()).is_empty());
        assert_eq!(next, target);
    }
}
