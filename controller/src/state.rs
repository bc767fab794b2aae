//! The controller's replicated state machine: what every replica agrees on, changed only by
//! applying committed Raft log entries (`Command`s), in log order, deterministically.

use std::collections::BTreeMap;

use tidal_common::task::{find_variant, normalise};
use tidal_proto::v1::{command::Change, Command, Plan, RegisterNodeRequest, StateSnapshot, TaskSpec, VariantProfile};

/// Plans kept in the history (older ones are forgotten).
pub const HISTORY_LEN: usize = 1000;

#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub address: String,
    pub cores: u32,
}

#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    pub nodes: BTreeMap<String, NodeInfo>,
    pub tasks: BTreeMap<String, TaskSpec>,
    /// (task, variant) → the latest measured profile.
    pub profiles: BTreeMap<(String, String), VariantProfile>,
    pub plan: Option<Plan>,
    pub history: Vec<Plan>,
    /// Raft id → address of the replicas that joined through a membership change (the
    /// bootstrap replicas' addresses come from each replica's configuration).
    pub replicas: BTreeMap<u64, String>,
    pub applied_index: u64,
}

impl ClusterState {
    pub fn plan_epoch(&self) -> u64 {
        self.plan.as_ref().map_or(0, |p| p.epoch)
    }

    /// Records an applied membership change: `address` is the joining replica's, `None` for
    /// a removal.
    pub fn apply_membership(&mut self, index: u64, id: u64, address: Option<String>) {
        self.applied_index = index;
        match address {
            Some(a) => self.replicas.insert(id, a),
            None => self.replicas.remove(&id),
        };
    }

    /// The whole state, as the data of a Raft snapshot.
    pub fn to_snapshot(&self) -> StateSnapshot {
        StateSnapshot {
            applied_index: self.applied_index,
            nodes: self
                .nodes
                .iter()
                .map(|(name, n)| RegisterNodeRequest { node: name.clone(), address: n.address.clone(), cores: n.cores })
                .collect(),
            tasks: self.tasks.values().cloned().collect(),
            profiles: self.profiles.values().cloned().collect(),
            plan: self.plan.clone(),
            history: self.history.clone(),
            replicas: self.replicas.clone().into_iter().collect(),
        }
    }

    pub fn from_snapshot(s: StateSnapshot) -> Self {
        Self {
            nodes: s.nodes.into_iter().map(|n| (n.node, NodeInfo { address: n.address, cores: n.cores })).collect(),
            tasks: s.tasks.into_iter().map(normalise).map(|t| (t.name.clone(), t)).collect(),
            profiles: s.profiles.into_iter().map(|p| ((p.task.clone(), p.variant.clone()), p)).collect(),
            plan: s.plan,
            history: s.history,
            replicas: s.replicas.into_iter().collect(),
            applied_index: s.applied_index,
        }
    }

    /// Applies one committed command. A command that is not valid against the current state
    /// (e.g. a plan from a stale leader) changes nothing and says why; every replica reaches
    /// the same verdict.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Result<(), String> {
        self.applied_index = index;
        match cmd.change.as_ref().ok_or("empty command")? {
            Change::RegisterNode(n) => {
                self.nodes.insert(n.node.clone(), NodeInfo { address: n.address.clone(), cores: n.cores });
            }
            Change::RegisterTask(t) => {
                // Entries written before tasks had stages are read in the one-stage form.
                let t = normalise(t.clone());
                self.profiles.retain(|(task, variant), _| task != &t.name || find_variant(&t, variant).is_some());
                self.tasks.insert(t.name.clone(), t);
            }
            Change::SetSlo(s) => {
                let task = self.tasks.get_mut(&s.task).ok_or_else(|| format!("unknown task {:?}", s.task))?;
                task.slo_ms = s.slo_ms;
            }
            Change::StoreProfile(p) => {
                if self.tasks.get(&p.task).is_none_or(|t| find_variant(t, &p.variant).is_none()) {
                    return Err(format!("task {:?} has no variant {:?}", p.task, p.variant));
                }
                self.profiles.insert((p.task.clone(), p.variant.clone()), p.clone());
            }
            Change::CommitPlan(plan) => {
                let expected = self.plan_epoch() + 1;
                if plan.epoch != expected {
                    return Err(format!("plan epoch {} is not the next epoch {expected}", plan.epoch));
                }
                self.plan = Some(plan.clone());
                self.history.push(plan.clone());
                if self.history.len() > HISTORY_LEN {
                    self.history.remove(0);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidal_proto::v1::{SetSloRequest, VariantSpec};

    fn plan(epoch: u64) -> Command {
        Command { change: Some(Change::CommitPlan(Plan { epoch, term: 1, ..Default::default() })) }
    }

    #[test]
    fn plans_must_come_in_epoch_order() {
        let mut s = ClusterState::default();
        assert!(s.apply(1, &plan(1)).is_ok());
        assert!(s.apply(2, &plan(1)).is_err(), "a stale epoch is refused");
        assert!(s.apply(3, &plan(3)).is_err(), "a gap is refused");
        assert!(s.apply(4, &plan(2)).is_ok());
        assert_eq!(s.plan_epoch(), 2);
        assert_eq!(s.history.len(), 2);
    }

    #[test]
    fn a_snapshot_restores_the_same_state() {
        let mut s = ClusterState::default();
        let task = TaskSpec {
            name: "t".into(),
            slo_ms: 100,
            variants: vec![VariantSpec { name: "v".into(), ..Default::default() }],
            stages: vec![],
        };
        s.apply(1, &Command { change: Some(Change::RegisterTask(task)) }).unwrap();
        let node = RegisterNodeRequest { node: "n".into(), address: "a:1".into(), cores: 4 };
        s.apply(2, &Command { change: Some(Change::RegisterNode(node)) }).unwrap();
        s.apply(3, &plan(1)).unwrap();
        s.apply_membership(4, 7, Some("127.0.0.7:7000".into()));
        let restored = ClusterState::from_snapshot(s.to_snapshot());
        assert_eq!(restored.to_snapshot(), s.to_snapshot());
        assert_eq!(restored.applied_index, 4);
        assert_eq!(restored.plan_epoch(), 1);
        assert_eq!(restored.replicas[&7], "127.0.0.7:7000");
        assert_eq!(restored.nodes["n"].cores, 4);
        assert_eq!(
            restored.tasks["t"].stages[0].variants[0].name, "v",
            "a task in the one-stage form reads as a stage"
        );
    }

    #[test]
    fn slo_changes_and_profiles_need_a_known_task() {
        let mut s = ClusterState::default();
        let set = Command { change: Some(Change::SetSlo(SetSloRequest { task: "t".into(), slo_ms: 50 })) };
        assert!(s.apply(1, &set).is_err());
        let task = TaskSpec {
            name: "t".into(),
            slo_ms: 100,
            variants: vec![VariantSpec { name: "v".into(), ..Default::default() }],
            stages: vec![],
        };
        s.apply(2, &Command { change: Some(Change::RegisterTask(task)) }).unwrap();
        s.apply(3, &set).unwrap();
        assert_eq!(s.tasks["t"].slo_ms, 50);
        let profile = |variant: &str| Command {
            change: Some(Change::StoreProfile(VariantProfile {
                task: "t".into(),
                variant: variant.into(),
                ..Default::default()
            })),
        };
        assert!(s.apply(4, &profile("v")).is_ok());
        assert!(s.apply(5, &profile("w")).is_err());
    }
}
