//! A plan cut for one agent: what that node acts on, and nothing of the other nodes' workers
//! but where to send their share of each stage.
//!
//! Every agent is a front door for every task (a client may send any request to any agent),
//! so a cut plan keeps every task's spec and a route to each node that serves a stage; it
//! drops the other nodes' assignments (with their variants), the notes, the planned rates and
//! the addresses of nodes it never sends to. Its size grows with the tasks and the nodes that
//! serve each, not with every worker of the cluster.

use std::collections::{BTreeMap, BTreeSet};

use tidal_proto::v1::{Plan, Route};

/// `plan` as `node` receives it. A plan cut already is returned as it is.
pub fn cut(plan: &Plan, node: &str) -> Plan {
    if !plan.for_node.is_empty() {
        return plan.clone();
    }
    let mut routes: BTreeMap<(&str, &str, &str), f64> = BTreeMap::new();
    for a in plan.assignments.iter().filter(|a| a.node != node) {
        *routes.entry((a.task.as_str(), a.stage.as_str(), a.node.as_str())).or_default() += a.weight;
    }
    let routed: BTreeSet<&str> = routes.keys().map(|&(_, _, n)| n).collect();
    Plan {
        epoch: plan.epoch,
        term: plan.term,
        tasks: plan.tasks.clone(),
        assignments: plan.assignments.iter().filter(|a| a.node == node).cloned().collect(),
        notes: Vec::new(),
        planned_rps: Default::default(),
        node_addresses: plan
            .node_addresses
            .iter()
            .filter(|(n, _)| routed.contains(n.as_str()))
            .map(|(n, a)| (n.clone(), a.clone()))
            .collect(),
        transition: plan.transition,
        routing: plan.routing,
        // The planner's, not the agent's.
        corrections: Vec::new(),
        for_node: node.to_string(),
        routes: routes
            .into_iter()
            .map(|((task, stage, node), weight)| Route {
                task: task.into(),
                stage: stage.into(),
                node: node.into(),
                weight,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use tidal_proto::v1::{Assignment, VariantSpec};

    fn worker(task: &str, node: &str, variant: &str, weight: f64) -> Assignment {
        Assignment {
            task: task.into(),
            stage: task.into(),
            variant: Some(VariantSpec {
                name: variant.into(),
                model_file: format!("{variant}.onnx"),
                accuracy: 70.0,
                input_shape: vec![3, 224, 224],
                tensor_names: Default::default(),
                tokenizer_file: String::new(),
                io: None,
                model_sha256: String::new(),
            }),
            node: node.into(),
            millicores: 1000,
            max_batch: 4,
            max_delay_ms: 5,
            weight,
            replica: 0,
            memory_bytes: 0,
        }
    }

    fn whole() -> Plan {
        Plan {
            epoch: 7,
            term: 2,
            tasks: ["a", "b"].iter().map(|t| crate::task::single_stage(t, 100, vec![])).collect(),
            assignments: vec![
                worker("a", "n1", "small", 0.25),
                worker("a", "n2", "small", 0.25),
                worker("a", "n2", "large", 0.5),
                worker("b", "n3", "small", 1.0),
            ],
            notes: vec!["a: forecast 100 req/s".into()],
            planned_rps: [("a".to_string(), 100.0)].into_iter().collect(),
            node_addresses: ["n1", "n2", "n3", "n4"].iter().map(|n| (n.to_string(), format!("{n}:7000"))).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_node_gets_its_own_workers_and_one_route_per_other_node_and_stage() {
        let c = cut(&whole(), "n1");
        assert_eq!(c.for_node, "n1");
        assert_eq!((c.epoch, c.term), (7, 2));
        assert_eq!(c.tasks.len(), 2, "every task: the agent is a front door for each");
        assert_eq!(c.assignments, vec![worker("a", "n1", "small", 0.25)]);
        let routes: Vec<(&str, &str, f64)> =
            c.routes.iter().map(|r| (r.task.as_str(), r.node.as_str(), r.weight)).collect();
        assert_eq!(routes, vec![("a", "n2", 0.75), ("b", "n3", 1.0)], "n2's two workers are one route");
        let mut addressed: Vec<&String> = c.node_addresses.keys().collect();
        addressed.sort();
        assert_eq!(addressed, vec!["n2", "n3"], "n4 serves nothing");
        assert!(c.notes.is_empty() && c.planned_rps.is_empty());
        assert_eq!(cut(&c, "n2"), c, "a cut plan is not cut again");
    }

    #[test]
    fn a_node_with_nothing_to_run_still_routes_every_task() {
        let c = cut(&whole(), "n4");
        assert!(c.assignments.is_empty());
        let total: f64 = c.routes.iter().map(|r| r.weight).sum();
        assert!((total - 2.0).abs() < 1e-9, "each task's whole weight is routed: {total}");
        assert!(c.encoded_len() < whole().encoded_len());
    }
}
