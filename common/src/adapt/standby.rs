//! Standbys: the insurance a plan that routes by slack keeps for a burst's onset. On each node,
//! a stage whose workers there do not include its cheapest variant gets, on a whole core the
//! plan leaves free on that node, a worker of that variant which the plan's weights send
//! nothing (weight 0). Warm and idle, it takes the requests the stage's workers there would
//! refuse as too late ([`crate::slack`]) until the next plan sizes the stage for the burst and
//! takes the core back.
//!
//! Its price, said in the plan's notes: the core it holds is one no task was planned on (no
//! task is planned smaller for it) and is counted in the plan's cores; and the requests it
//! serves are answered by a less accurate variant instead of refused.

use std::collections::BTreeMap;

use tidal_proto::v1::{Assignment, Plan, ProfilePoint, StageSpec, VariantSpec};

use super::RoundInput;

/// A standby's quota: the planner's unit.
const STANDBY_MILLICORES: u32 = 1000;

/// Adds the standbys that fit on the cores `plan` leaves free (after `reserve_cores` a node).
pub(super) fn keep(plan: &mut Plan, input: &RoundInput, reserve_cores: u32) {
    // Free millicores and memory per node.
    let mut free: BTreeMap<&str, (u32, u64)> = input
        .nodes
        .iter()
        .map(|n| (n.name, (n.cores.saturating_sub(reserve_cores).saturating_mul(1000), n.memory_free())))
        .collect();
    for a in &plan.assignments {
        if let Some((cores, memory)) = free.get_mut(a.node.as_str()) {
            *cores = cores.saturating_sub(a.millicores);
            *memory = memory.saturating_sub(a.memory_bytes);
        }
    }
    let mut standbys = Vec::new();
    for task in &input.tasks {
        // A task's cap on its cores holds for its standbys too.
        let cap = task.spec.share.as_ref().map_or(0, |s| s.max_cores).saturating_mul(1000);
        let mut used: u32 = plan.assignments.iter().filter(|a| a.task == task.spec.name).map(|a| a.millicores).sum();
        for stage in &task.spec.stages {
            let Some((cheapest, point)) = cheapest_variant(stage, &task.profiles, task.spec.slo_ms as f64) else {
                continue;
            };
            let of_stage = |a: &&Assignment| a.task == task.spec.name && a.stage == stage.name;
            let mut nodes: Vec<&str> = plan.assignments.iter().filter(of_stage).map(|a| a.node.as_str()).collect();
            nodes.sort_unstable();
            nodes.dedup();
            for node in nodes {
                let here = |a: &&Assignment| of_stage(a) && a.node == node;
                if plan.assignments.iter().filter(here).any(|a| variant(a) == cheapest.name) {
                    continue;
                }
                if cap > 0 && used + STANDBY_MILLICORES > cap {
                    continue;
                }
                let points = task.profiles.get(cheapest.name.as_str()).copied().unwrap_or_default();
                let memory_bytes = crate::memory::MemoryCurve::new(points).worker_bytes(point.batch);
                let room = |f: &&mut (u32, u64)| f.0 >= STANDBY_MILLICORES && f.1 >= memory_bytes;
                let Some(f) = free.get_mut(node).filter(room) else { continue };
                f.0 -= STANDBY_MILLICORES;
                f.1 -= memory_bytes;
                used += STANDBY_MILLICORES;
                standbys.push(Assignment {
                    task: task.spec.name.clone(),
                    stage: stage.name.clone(),
                    variant: Some(cheapest.clone()),
                    node: node.to_string(),
                    millicores: STANDBY_MILLICORES,
                    max_batch: point.batch,
                    // It serves an overflow: a batch of whatever waits when it is free.
                    max_delay_ms: 0,
                    weight: 0.0,
                    replica: 0,
                    memory_bytes,
                });
                plan.notes.push(format!(
                    "{}: standby {} on {node} (1 core, batch {}, no share of the traffic): takes what the \
                     stage's workers there would refuse as too late, until the next plan",
                    task.spec.name, cheapest.name, point.batch
                ));
            }
        }
    }
    plan.assignments.extend(standbys);
}

/// Whether `plan` gives `task`'s workers of `variant` on `node` (any node: `None`) no share of
/// the traffic: standbys only. What they serve is not a measure of the variant's speed: they
/// take the requests others refuse, at the moments the node is busiest, after idling (seen
/// live: a standby's batches ran 2.2× the profile, and the planner, corrected by them, called
/// the cheapest variant too slow to carry the burst). The profile correction leaves them out.
pub fn serves_only_as_standby(plan: &Plan, task: &str, node: Option<&str>, variant: &str) -> bool {
    let mut of = plan
        .assignments
        .iter()
        .filter(|a| a.task == task && node.is_none_or(|n| a.node == n) && self::variant(a) == variant)
        .peekable();
    of.peek().is_some() && of.all(|a| a.weight <= 0.0)
}

fn variant(a: &Assignment) -> &str {
    a.variant.as_ref().map_or("", |v| v.name.as_str())
}

/// A stage's cheapest variant, the one that serves the most requests a second on one core at
/// a batch whose p99 takes at most a quarter of the SLO, with that batch; `None` for a stage of
/// one variant, or when no variant was profiled so.
fn cheapest_variant<'a>(
    stage: &'a StageSpec,
    profiles: &BTreeMap<&str, &[ProfilePoint]>,
    slo_ms: f64,
) -> Option<(&'a VariantSpec, ProfilePoint)> {
    if stage.variants.len() < 2 {
        return None;
    }
    let fits = |p: &&ProfilePoint| p.cores == 1 && p.batch >= 1 && p.latency_p99_ms <= slo_ms / 4.0;
    stage
        .variants
        .iter()
        .filter_map(|v| {
            let points = profiles.get(v.name.as_str())?;
            let best = points.iter().filter(fits).max_by(|a, b| a.throughput_rps.total_cmp(&b.throughput_rps))?;
            Some((v, *best))
        })
        .max_by(|(_, a), (_, b)| a.throughput_rps.total_cmp(&b.throughput_rps))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(variant: &str, node: &str, weight: f64) -> Assignment {
        Assignment {
            task: "t".into(),
            stage: "t".into(),
            variant: Some(VariantSpec { name: variant.into(), ..Default::default() }),
            node: node.into(),
            millicores: 1000,
            weight,
            ..Default::default()
        }
    }

    #[test]
    fn only_workers_with_no_share_on_their_node_are_standbys() {
        let plan = Plan {
            assignments: vec![
                assignment("r50", "a", 1.0),
                assignment("r18", "a", 0.0),
                assignment("r18", "b", 0.5),
                assignment("r50", "b", 0.5),
            ],
            ..Default::default()
        };
        assert!(serves_only_as_standby(&plan, "t", Some("a"), "r18"));
        assert!(!serves_only_as_standby(&plan, "t", Some("b"), "r18"), "a share on b");
        assert!(!serves_only_as_standby(&plan, "t", None, "r18"), "a share somewhere");
        assert!(!serves_only_as_standby(&plan, "t", Some("a"), "r50"));
        assert!(!serves_only_as_standby(&plan, "t", Some("a"), "r34"), "not planned: not a standby");
        assert!(!serves_only_as_standby(&plan, "other", Some("a"), "r18"));
    }
}
