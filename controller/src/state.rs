//! The controller's replicated state machine: what every replica agrees on, changed only by
//! applying committed Raft log entries (`Command`s), in log order, deterministically.

use std::collections::{BTreeMap, VecDeque};

use prost::Message;

use tidal_common::plan::{validate_node, validate_plan, Capacity};
use tidal_common::profile::validate_profile;
use tidal_common::task::{find_variant, normalise, parse_canary, validate_slo, validate_task};
use tidal_proto::v1::{
    command::Change, Command, Plan, RegisterNodeRequest, RevokedCertificate, Rollout, StateSnapshot, TaskSpec,
    VariantProfile,
};

/// Plans kept in the history (older ones are forgotten)...
pub const HISTORY_LEN: usize = 1000;
/// ...and their most bytes, encoded: the history is in every snapshot, and a cluster of
/// hundreds of tasks makes plans of a megabyte. The plan in force is always kept.
pub const HISTORY_BYTES: usize = 16 << 20;
/// Most certificates revoked at once: every call checks the list, and every agent holds it.
/// Beyond that, a cluster should issue a new CA.
pub const MAX_REVOKED: usize = 4096;
/// Earlier versions of a task kept for a rollback (the oldest are forgotten).
pub const KEPT_VERSIONS: usize = 8;

#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    /// Where inference requests go.
    pub address: String,
    /// Where plans go.
    pub control_address: String,
    pub cores: u32,
    /// The memory Tidal's workers may take on it (0: not declared), and the machine's.
    pub memory_bytes: u64,
    pub memory_total_bytes: u64,
    /// Planned empty (`DrainNode`) until undrained.
    pub draining: bool,
    /// The serial of the certificate it last registered with (empty in plaintext).
    pub cert_serial: String,
}

impl NodeInfo {
    fn registered(n: &RegisterNodeRequest, draining: bool) -> Self {
        // Registrations from before the control port was separated served both on `address`.
        let control = if n.control_address.is_empty() { &n.address } else { &n.control_address };
        Self {
            address: n.address.clone(),
            control_address: control.clone(),
            cores: n.cores,
            memory_bytes: n.memory_bytes,
            memory_total_bytes: n.memory_total_bytes,
            draining,
            cert_serial: n.cert_serial.clone(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    pub nodes: BTreeMap<String, NodeInfo>,
    /// The version of each task that serves.
    pub tasks: BTreeMap<String, TaskSpec>,
    /// Per task, its earlier versions by number (at most [`KEPT_VERSIONS`]), for a rollback,
    /// and versions staged for a rollout.
    pub earlier: BTreeMap<String, BTreeMap<u32, TaskSpec>>,
    /// Rollouts under way, by task.
    pub rollouts: BTreeMap<String, Rollout>,
    /// (task, variant) → the latest measured profile.
    pub profiles: BTreeMap<(String, String), VariantProfile>,
    pub plan: Option<Plan>,
    pub history: VecDeque<Plan>,
    /// The encoded size of `history`.
    history_bytes: usize,
    /// Raft id → address of the replicas that joined through a membership change (the
    /// bootstrap replicas' addresses come from each replica's configuration).
    pub replicas: BTreeMap<u64, String>,
    /// Revoked certificates by serial, and the log index that last changed them.
    pub revoked: BTreeMap<String, RevokedCertificate>,
    pub revocations_version: u64,
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
                .map(|(name, n)| RegisterNodeRequest {
                    node: name.clone(),
                    address: n.address.clone(),
                    cores: n.cores,
                    control_address: n.control_address.clone(),
                    cert_serial: n.cert_serial.clone(),
                    memory_bytes: n.memory_bytes,
                    memory_total_bytes: n.memory_total_bytes,
                })
                .collect(),
            draining_nodes: self.nodes.iter().filter(|(_, n)| n.draining).map(|(name, _)| name.clone()).collect(),
            tasks: self.tasks.values().cloned().collect(),
            profiles: self.profiles.values().cloned().collect(),
            plan: self.plan.clone(),
            history: self.history.iter().cloned().collect(),
            replicas: self.replicas.clone().into_iter().collect(),
            revoked: self.revoked.values().cloned().collect(),
            revocations_version: self.revocations_version,
            earlier_versions: self.earlier.values().flat_map(|v| v.values().cloned()).collect(),
            rollouts: self.rollouts.values().cloned().collect(),
        }
    }

    pub fn from_snapshot(s: StateSnapshot) -> Self {
        let mut earlier: BTreeMap<String, BTreeMap<u32, TaskSpec>> = BTreeMap::new();
        for t in s.earlier_versions.into_iter().map(normalise) {
            earlier.entry(t.name.clone()).or_default().insert(t.version, t);
        }
        Self {
            nodes: s
                .nodes
                .iter()
                .map(|n| (n.node.clone(), NodeInfo::registered(n, s.draining_nodes.contains(&n.node))))
                .collect(),
            tasks: s.tasks.into_iter().map(normalise).map(|t| (t.name.clone(), t)).collect(),
            earlier,
            rollouts: s.rollouts.into_iter().map(|r| (r.task.clone(), r)).collect(),
            profiles: s.profiles.into_iter().map(|p| ((p.task.clone(), p.variant.clone()), p)).collect(),
            plan: s.plan,
            history_bytes: s.history.iter().map(|p| p.encoded_len()).sum(),
            history: s.history.into(),
            replicas: s.replicas.into_iter().collect(),
            revoked: s.revoked.into_iter().map(|r| (r.serial.clone(), r)).collect(),
            revocations_version: s.revocations_version,
            applied_index: s.applied_index,
        }
    }

    /// Applies one committed command. A command that is not valid against the current state
    /// (e.g. a plan from a stale leader) or not valid at all (the checks the API makes, made
    /// again: the log is an input too) changes nothing and says why; every replica reaches the
    /// same verdict.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Result<(), String> {
        self.applied_index = index;
        match cmd.change.as_ref().ok_or("empty command")? {
            Change::RegisterNode(n) => {
                validate_node(n)?;
                if !n.cert_serial.is_empty() && tidal_auth::normalise_serial(&n.cert_serial)? != n.cert_serial {
                    return Err(format!("certificate serial {:?} is not in its one form", n.cert_serial));
                }
                let draining = self.nodes.get(&n.node).is_some_and(|old| old.draining);
                self.nodes.insert(n.node.clone(), NodeInfo::registered(n, draining));
            }
            Change::DrainNode(d) => {
                let node = self.nodes.get_mut(&d.node).ok_or_else(|| format!("unknown node {:?}", d.node))?;
                node.draining = !d.undrain;
            }
            Change::RemoveNode(r) => {
                let node = self.nodes.get(&r.node).ok_or_else(|| format!("unknown node {:?}", r.node))?;
                if !node.draining || self.plan.as_ref().is_some_and(|p| p.assignments.iter().any(|a| a.node == r.node))
                {
                    return Err(format!(
                        "node {:?} must be drained (DrainNode, then a plan without it) before it is removed",
                        r.node
                    ));
                }
                // A removed node's certificate lets nobody in any more (it may have been taken
                // with the machine); a node that comes back needs a new one.
                if !node.cert_serial.is_empty() && !r.keep_certificate {
                    let revoked = RevokedCertificate {
                        serial: node.cert_serial.clone(),
                        identity: format!("agent/{}", r.node),
                        reason: "node removed".into(),
                    };
                    self.revoke(index, &revoked)?;
                }
                self.nodes.remove(&r.node);
            }
            Change::RevokeCertificate(c) => self.revoke(index, c)?,
            Change::RegisterTask(t) => self.register_task(t, false)?,
            Change::StageTask(t) => self.register_task(t, true)?,
            Change::RollbackTask(r) if self.rollouts.contains_key(&r.task) => {
                // During a rollout, a rollback ends it: the version served stays.
                if r.version != 0 {
                    return Err(format!(
                        "a rollout of task {:?} is under way: a rollback without a version ends it",
                        r.task
                    ));
                }
                self.rollouts.remove(&r.task);
            }
            Change::RollbackTask(r) => {
                let served = self.tasks.get(&r.task).ok_or_else(|| format!("unknown task {:?}", r.task))?;
                let earlier = self.earlier.entry(r.task.clone()).or_default();
                let to = match r.version {
                    0 => earlier.range(..served.version).next_back().map(|(&v, _)| v),
                    v => Some(v),
                };
                let Some(mut spec) = to.and_then(|v| earlier.remove(&v)) else {
                    let kept: Vec<String> = earlier.keys().map(u32::to_string).collect();
                    return Err(format!(
                        "task {:?} serves version {} and keeps no version {} to roll back to (kept: {})",
                        r.task,
                        served.version,
                        to.map_or_else(|| "below it".to_string(), |v| v.to_string()),
                        if kept.is_empty() { "none".to_string() } else { kept.join(", ") }
                    ));
                };
                // The SLO and the share are the task's, not a version's.
                spec.slo_ms = served.slo_ms;
                spec.share = served.share;
                earlier.insert(served.version, served.clone());
                self.tasks.insert(r.task.clone(), spec);
            }
            Change::DeleteTask(d) => {
                if self.tasks.remove(&d.task).is_none() {
                    return Err(format!("unknown task {:?}", d.task));
                }
                self.earlier.remove(&d.task);
                self.rollouts.remove(&d.task);
                // A task registered later under the name starts from nothing: no profile of
                // the deleted one is planned with.
                self.profiles.retain(|(task, _), _| task != &d.task);
            }
            Change::StartRollout(r) => {
                validate_rollout(r)?;
                let served = self.tasks.get(&r.task).ok_or_else(|| format!("unknown task {:?}", r.task))?;
                if self.rollouts.contains_key(&r.task) {
                    return Err(format!("a rollout of task {:?} is under way", r.task));
                }
                if served.version == r.version {
                    return Err(format!("task {:?} serves version {} already", r.task, r.version));
                }
                if !self.earlier.get(&r.task).is_some_and(|e| e.contains_key(&r.version)) {
                    return Err(format!(
                        "task {:?} keeps no version {} (register it with --staged)",
                        r.task, r.version
                    ));
                }
                self.rollouts.insert(r.task.clone(), r.clone());
            }
            Change::EndRollout(end) => {
                let rollout =
                    self.rollouts.get(&end.task).ok_or_else(|| format!("no rollout of task {:?}", end.task))?;
                if rollout.version != end.version {
                    return Err(format!(
                        "the rollout of task {:?} is of version {}, not the version {} judged",
                        end.task, rollout.version, end.version
                    ));
                }
                let rollout = self.rollouts.remove(&end.task).unwrap_or_default();
                if end.promote {
                    self.serve_kept(&end.task, rollout.version)?;
                }
            }
            Change::SetSlo(s) => {
                validate_slo(s.slo_ms)?;
                let task = self.tasks.get_mut(&s.task).ok_or_else(|| format!("unknown task {:?}", s.task))?;
                task.slo_ms = s.slo_ms;
            }
            Change::SetShare(s) => {
                let task = self.tasks.get_mut(&s.task).ok_or_else(|| format!("unknown task {:?}", s.task))?;
                task.share = Some(tidal_common::task::changed_share(task.share.as_ref(), s)?);
            }
            Change::StoreProfile(p) => {
                validate_profile(p)?;
                let kept = self.earlier.get(&p.task).into_iter().flat_map(|e| e.values());
                if !self.tasks.get(&p.task).into_iter().chain(kept).any(|t| find_variant(t, &p.variant).is_some()) {
                    return Err(format!("task {:?} has no variant {:?}", p.task, p.variant));
                }
                self.profiles
                    .insert((p.task.clone(), p.variant.clone()), VariantProfile { stored_index: index, ..p.clone() });
            }
            Change::CommitPlan(plan) => self.commit_plan(plan.clone())?,
            Change::CommitPlanDelta(delta) => {
                // The epoch is checked before the delta is applied to the plan in force: a
                // delta from a stale leader was written against another plan.
                self.next_epoch(delta.epoch)?;
                let plan = tidal_common::plan::delta::apply(self.plan.as_ref(), delta)?;
                self.commit_plan(plan)?;
            }
        }
        Ok(())
    }

    /// Registers a task: its first version, its next one (other models), or the same one with
    /// another SLO and share; `staged`: the next version is kept, not served (for a rollout).
    fn register_task(&mut self, t: &TaskSpec, staged: bool) -> Result<(), String> {
        // Entries written before tasks had stages are read in the one-stage form.
        let mut t = normalise(t.clone());
        validate_task(&t)?;
        if parse_canary(&t.name).is_some() {
            return Err(format!("task name {:?}: `@` names canaries", t.name));
        }
        let name = t.name.clone();
        let served = self.tasks.get(&name).cloned();
        if staged && served.is_none() {
            return Err(format!("task {name:?} is not registered: its first version is served, not staged"));
        }
        if staged && served.as_ref().is_some_and(|s| s.stages == t.stages) {
            return Err(format!("task {name:?} serves these models already: nothing to stage"));
        }
        if self.rollouts.contains_key(&name) && served.as_ref().is_none_or(|s| s.stages != t.stages) {
            return Err(format!("a rollout of task {name:?} is under way: wait for its end, or end it (rollback)"));
        }
        let earlier = self.earlier.entry(name.clone()).or_default();
        match served {
            None => {
                t.version = 1;
                self.tasks.insert(name.clone(), t);
            }
            // The same models: the SLO and share change in place.
            Some(served) if served.stages == t.stages => {
                t.version = served.version;
                self.tasks.insert(name.clone(), t);
            }
            Some(served) => {
                t.version = earlier.keys().copied().chain([served.version]).max().unwrap_or(0) + 1;
                if staged {
                    earlier.insert(t.version, t);
                } else {
                    earlier.insert(served.version, served);
                    self.tasks.insert(name.clone(), t);
                }
                while earlier.len() > KEPT_VERSIONS {
                    earlier.pop_first();
                }
            }
        }
        if self.earlier.get(&name).is_some_and(|e| e.is_empty()) {
            self.earlier.remove(&name);
        }
        self.keep_profiles_of_kept_versions(&name);
        Ok(())
    }

    /// Serves kept version `version` of `task` (its SLO and share as the task's are now); the
    /// version served is kept.
    fn serve_kept(&mut self, task: &str, version: u32) -> Result<(), String> {
        let served = self.tasks.get(task).cloned().ok_or_else(|| format!("unknown task {task:?}"))?;
        let earlier = self.earlier.entry(task.to_string()).or_default();
        let mut spec = earlier.remove(&version).ok_or_else(|| format!("task {task:?} keeps no version {version}"))?;
        // The SLO and the share are the task's, not a version's.
        spec.slo_ms = served.slo_ms;
        spec.share = served.share;
        earlier.insert(served.version, served);
        self.tasks.insert(task.to_string(), spec);
        Ok(())
    }

    /// Forgets the profiles of `task`'s variants that no kept version has (a rollback plans
    /// with the profiles its variants had).
    fn keep_profiles_of_kept_versions(&mut self, task: &str) {
        let versions: Vec<&TaskSpec> = self
            .tasks
            .get(task)
            .into_iter()
            .chain(self.earlier.get(task).into_iter().flat_map(|e| e.values()))
            .collect();
        let kept: std::collections::HashSet<String> = self
            .profiles
            .keys()
            .filter(|(t, v)| t == task && versions.iter().any(|spec| find_variant(spec, v).is_some()))
            .map(|(_, v)| v.clone())
            .collect();
        self.profiles.retain(|(t, v), _| t != task || kept.contains(v));
    }

    /// Adds a certificate to the revoked (a serial already there keeps its first record).
    fn revoke(&mut self, index: u64, c: &RevokedCertificate) -> Result<(), String> {
        validate_revocation(c)?;
        if self.revoked.contains_key(&c.serial) {
            return Ok(());
        }
        if self.revoked.len() >= MAX_REVOKED {
            return Err(format!("{MAX_REVOKED} certificates are revoked already: issue a new cluster CA"));
        }
        self.revoked.insert(c.serial.clone(), c.clone());
        self.revocations_version = index;
        Ok(())
    }

    /// Whether a plan may name task `name`: a registered task, or the canary of a rollout
    /// under way.
    pub fn may_plan(&self, name: &str) -> bool {
        match parse_canary(name) {
            Some((task, version)) => self.rollouts.get(task).is_some_and(|r| r.version == version),
            None => self.tasks.contains_key(name),
        }
    }

    fn next_epoch(&self, epoch: u64) -> Result<(), String> {
        let expected = self.plan_epoch() + 1;
        if epoch != expected {
            return Err(format!("plan epoch {epoch} is not the next epoch {expected}"));
        }
        Ok(())
    }

    fn commit_plan(&mut self, plan: Plan) -> Result<(), String> {
        self.next_epoch(plan.epoch)?;
        let mut normalised = plan.clone();
        tidal_common::plan::normalise(&mut normalised);
        validate_plan(&normalised, |n| {
            self.nodes
                .get(n)
                .map(|i| Capacity { millicores: i.cores.saturating_mul(1000), memory_bytes: i.memory_bytes })
        })?;
        // A round solved before a task was deleted plans for it still: refused, and the round
        // the deletion started plans without it.
        if let Some(t) = normalised.tasks.iter().find(|t| !self.may_plan(&t.name)) {
            return Err(format!("plan {} has task {:?}, which is not registered (deleted?)", plan.epoch, t.name));
        }
        self.history_bytes += plan.encoded_len();
        self.history.push_back(plan.clone());
        self.plan = Some(plan);
        while self.history.len() > HISTORY_LEN || (self.history_bytes > HISTORY_BYTES && self.history.len() > 1) {
            let forgotten = self.history.pop_front().map_or(0, |p| p.encoded_len());
            self.history_bytes -= forgotten;
        }
        Ok(())
    }
}

/// Most of a task's requests a canary may take, in percent.
pub const MAX_CANARY_PERCENT: u32 = 50;
/// The longest a rollout may compare, in seconds.
pub const MAX_ROLLOUT_WINDOW_S: u32 = 24 * 3600;

/// A rollout as the API and the log must carry it: a canary share of 1–50 %, a window of
/// 1 s – a day, margins that are numbers in range.
pub fn validate_rollout(r: &Rollout) -> Result<(), String> {
    if !(1..=MAX_CANARY_PERCENT).contains(&r.canary_percent) {
        return Err(format!("a canary takes 1–{MAX_CANARY_PERCENT} % of the requests, not {}", r.canary_percent));
    }
    if !(1..=MAX_ROLLOUT_WINDOW_S).contains(&r.window_s) {
        return Err(format!("a rollout's window is 1–{MAX_ROLLOUT_WINDOW_S} s, not {}", r.window_s));
    }
    if !(0.0..=1.0).contains(&r.max_error_increase) {
        return Err(format!("the error margin is a fraction 0–1, not {}", r.max_error_increase));
    }
    if !(1.0..=100.0).contains(&r.max_slowdown) {
        return Err(format!("the slow-down margin is 1–100 times, not {}", r.max_slowdown));
    }
    Ok(())
}

/// A revocation as the API and the log must carry it: a serial in its one form, bounded text.
pub fn validate_revocation(c: &RevokedCertificate) -> Result<(), String> {
    if tidal_auth::normalise_serial(&c.serial)? != c.serial {
        return Err(format!("serial {:?} is not in lowercase hex without separators or leading zeros", c.serial));
    }
    if c.identity.len() > 128 || c.reason.len() > 256 {
        return Err("a revocation's identity is at most 128 bytes and its reason 256".into());
    }
    Ok(())
}

/// The replicated revocations, read by every call's [`tidal_auth::Guard`] on this replica.
pub struct StateRevocations(pub std::sync::Arc<std::sync::RwLock<ClusterState>>);

impl tidal_auth::Revocations for StateRevocations {
    fn is_revoked(&self, serial: &str) -> bool {
        self.0.read().unwrap_or_else(|p| p.into_inner()).revoked.contains_key(serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidal_proto::v1::{
        Assignment, DrainNodeRequest, ProfilePoint, RemoveNodeRequest, SetShareRequest, SetSloRequest, TaskShare,
        VariantSpec,
    };

    fn plan(epoch: u64) -> Command {
        Command { change: Some(Change::CommitPlan(Plan { epoch, term: 1, ..Default::default() })) }
    }

    fn cmd(change: Change) -> Command {
        Command { change: Some(change) }
    }

    fn variant() -> VariantSpec {
        VariantSpec {
            name: "v".into(),
            model_file: "v.onnx".into(),
            accuracy: 70.0,
            input_shape: vec![3],
            tensor_names: Default::default(),
            tokenizer_file: String::new(),
            io: None,
            model_sha256: String::new(),
        }
    }

    fn task() -> TaskSpec {
        TaskSpec { name: "t".into(), slo_ms: 100, variants: vec![variant()], ..Default::default() }
    }

    fn node(name: &str) -> RegisterNodeRequest {
        RegisterNodeRequest {
            node: name.into(),
            address: "127.0.0.1:7001".into(),
            cores: 4,
            control_address: "127.0.0.1:7101".into(),
            cert_serial: String::new(),
            memory_total_bytes: 0,
            memory_bytes: 0,
        }
    }

    fn profile(variant: &str, cores: u32) -> Command {
        let point = ProfilePoint {
            cores,
            batch: 1,
            latency_p50_ms: 5.0,
            latency_p99_ms: 6.0,
            throughput_rps: 100.0,
            size: 0,
            output_tokens: 0,
            resident_bytes: 0,
        };
        cmd(Change::StoreProfile(VariantProfile {
            task: "t".into(),
            variant: variant.into(),
            node: "n".into(),
            points: vec![point],
            ..Default::default()
        }))
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
    fn a_plan_delta_rebuilds_the_plan_against_the_plan_in_force() {
        use tidal_common::plan::delta::{canonical, delta};
        let mut s = ClusterState::default();
        s.apply(1, &cmd(Change::RegisterTask(task()))).unwrap();
        s.apply(2, &cmd(Change::RegisterNode(node("n")))).unwrap();
        let worker = |millicores| Assignment {
            task: "t".into(),
            stage: "t".into(),
            variant: Some(variant()),
            node: "n".into(),
            millicores,
            max_batch: 1,
            max_delay_ms: 0,
            weight: 1.0,
            replica: 0,
            memory_bytes: 0,
        };
        let first =
            Plan { epoch: 1, term: 1, tasks: vec![task()], assignments: vec![worker(1000)], ..Default::default() };
        s.apply(3, &cmd(Change::CommitPlanDelta(delta(None, &first)))).unwrap();
        assert_eq!(s.plan, Some(canonical(first.clone())));
        let second = Plan { epoch: 2, assignments: vec![worker(3000)], ..first.clone() };
        let d = delta(s.plan.as_ref(), &second);
        s.apply(4, &cmd(Change::CommitPlanDelta(d.clone()))).unwrap();
        assert_eq!(s.plan, Some(canonical(second)));
        assert_eq!(s.history.len(), 2);
        // Replayed (a stale leader's entry), or over the node's cores, it changes nothing.
        assert!(s.apply(5, &cmd(Change::CommitPlanDelta(d))).unwrap_err().contains("epoch"));
        let over = Plan { epoch: 3, assignments: vec![worker(5000)], ..first };
        assert!(s.apply(6, &cmd(Change::CommitPlanDelta(delta(s.plan.as_ref(), &over)))).is_err());
        assert_eq!(s.plan_epoch(), 2);
    }

    #[test]
    fn a_plan_over_a_node_s_declared_memory_is_refused_and_the_memory_survives_a_snapshot() {
        const GIB: u64 = 1 << 30;
        let mut s = ClusterState::default();
        s.apply(1, &cmd(Change::RegisterTask(task()))).unwrap();
        let declared = RegisterNodeRequest { memory_bytes: 2 * GIB, memory_total_bytes: 4 * GIB, ..node("n") };
        s.apply(2, &cmd(Change::RegisterNode(declared))).unwrap();
        let worker = |replica, memory_bytes| Assignment {
            task: "t".into(),
            stage: "t".into(),
            variant: Some(variant()),
            node: "n".into(),
            millicores: 1000,
            max_batch: 1,
            max_delay_ms: 0,
            weight: 0.5,
            replica,
            memory_bytes,
        };
        let plan = |epoch, assignments| {
            cmd(Change::CommitPlan(Plan { epoch, term: 1, tasks: vec![task()], assignments, ..Default::default() }))
        };
        let e = s.apply(3, &plan(1, vec![worker(0, GIB + 1), worker(1, GIB)])).unwrap_err();
        assert!(e.contains("memory"), "{e}");
        assert_eq!(s.plan_epoch(), 0, "nothing committed");
        s.apply(4, &plan(1, vec![worker(0, GIB), worker(1, GIB)])).unwrap();
        assert_eq!(s.plan_epoch(), 1);
        let restored = ClusterState::from_snapshot(s.to_snapshot());
        assert_eq!((restored.nodes["n"].memory_bytes, restored.nodes["n"].memory_total_bytes), (2 * GIB, 4 * GIB));
        let too_much = RegisterNodeRequest { memory_bytes: 1 << 51, ..node("m") };
        assert!(s.apply(5, &cmd(Change::RegisterNode(too_much))).is_err(), "a bound on what a node declares");
    }

    #[test]
    fn the_history_is_bounded_in_bytes_and_keeps_the_plan_in_force() {
        let mut s = ClusterState::default();
        let big = |epoch| Plan { epoch, term: 1, notes: vec!["x".repeat(HISTORY_BYTES / 4)], ..Default::default() };
        for epoch in 1..=10 {
            s.apply(epoch, &cmd(Change::CommitPlan(big(epoch)))).unwrap();
        }
        assert!(s.history.len() <= 4, "{} plans of a quarter of the bound each", s.history.len());
        assert_eq!(s.history.back().map(|p| p.epoch), Some(10));
        assert_eq!(ClusterState::from_snapshot(s.to_snapshot()).history_bytes, s.history_bytes);
        let huge = Plan { epoch: 11, term: 1, notes: vec!["x".repeat(HISTORY_BYTES + 1)], ..Default::default() };
        s.apply(11, &cmd(Change::CommitPlan(huge))).unwrap();
        assert_eq!(s.history.iter().map(|p| p.epoch).collect::<Vec<_>>(), vec![11], "the plan in force stays");
    }

    #[test]
    fn a_snapshot_restores_the_same_state() {
        let mut s = ClusterState::default();
        s.apply(1, &cmd(Change::RegisterTask(task()))).unwrap();
        s.apply(2, &cmd(Change::RegisterNode(node("n")))).unwrap();
        s.apply(3, &plan(1)).unwrap();
        s.apply_membership(4, 7, Some("127.0.0.7:7000".into()));
        s.apply(5, &cmd(Change::RegisterNode(node("m")))).unwrap();
        s.apply(6, &cmd(Change::DrainNode(DrainNodeRequest { node: "m".into(), undrain: false }))).unwrap();
        let restored = ClusterState::from_snapshot(s.to_snapshot());
        assert_eq!(restored.to_snapshot(), s.to_snapshot());
        assert_eq!(restored.applied_index, 6);
        assert_eq!(restored.plan_epoch(), 1);
        assert_eq!(restored.replicas[&7], "127.0.0.7:7000");
        assert_eq!(restored.nodes["n"].cores, 4);
        assert_eq!(restored.nodes["n"].control_address, "127.0.0.1:7101");
        assert!(restored.nodes["m"].draining && !restored.nodes["n"].draining);
        assert_eq!(
            restored.tasks["t"].stages[0].variants[0].name, "v",
            "a task in the one-stage form reads as a stage"
        );
    }

    #[test]
    fn slo_changes_and_profiles_need_a_known_task() {
        let mut s = ClusterState::default();
        let set = cmd(Change::SetSlo(SetSloRequest { task: "t".into(), slo_ms: 50 }));
        assert!(s.apply(1, &set).is_err());
        s.apply(2, &cmd(Change::RegisterTask(task()))).unwrap();
        s.apply(3, &set).unwrap();
        assert_eq!(s.tasks["t"].slo_ms, 50);
        assert!(s.apply(4, &profile("v", 1)).is_ok());
        assert!(s.apply(5, &profile("w", 1)).is_err());
        // Each store is stamped with its log index (whatever the client sent): the same
        // points stored again are another profile, on every replica and after a snapshot.
        assert_eq!(s.profiles[&("t".to_string(), "v".to_string())].stored_index, 4);
        let mut sent = profile("v", 1);
        if let Some(Change::StoreProfile(p)) = sent.change.as_mut() {
            p.stored_index = 99;
        }
        s.apply(6, &sent).unwrap();
        assert_eq!(s.profiles[&("t".to_string(), "v".to_string())].stored_index, 6);
        let restored = ClusterState::from_snapshot(s.to_snapshot());
        assert_eq!(restored.profiles[&("t".to_string(), "v".to_string())].stored_index, 6);
    }

    #[test]
    fn a_share_change_sets_only_what_it_names() {
        let mut s = ClusterState::default();
        s.apply(1, &cmd(Change::RegisterTask(task()))).unwrap();
        let set = |weight, min_cores, max_cores| {
            cmd(Change::SetShare(SetShareRequest {
                task: "t".into(),
                weight,
                min_cores,
                max_cores,
                ..Default::default()
            }))
        };
        s.apply(2, &set(Some(2.5), None, Some(8))).unwrap();
        s.apply(3, &set(None, Some(1), None)).unwrap();
        assert_eq!(
            s.tasks["t"].share,
            Some(TaskShare { weight: Some(2.5), min_cores: 1, max_cores: 8, ..Default::default() })
        );
        // A minimum above the maximum, or a weight out of range, changes nothing.
        assert!(s.apply(4, &set(None, Some(9), None)).is_err());
        assert!(s.apply(5, &set(Some(f64::NAN), None, None)).is_err());
        assert!(s.apply(6, &set(Some(-1.0), None, None)).is_err());
        assert_eq!(
            s.tasks["t"].share,
            Some(TaskShare { weight: Some(2.5), min_cores: 1, max_cores: 8, ..Default::default() })
        );
        // The share survives a snapshot.
        assert_eq!(ClusterState::from_snapshot(s.to_snapshot()).tasks["t"].share, s.tasks["t"].share);
    }

    /// The log is an input too: an entry that the API would have refused (say, forged by a
    /// peer) changes nothing when it is applied.
    #[test]
    fn entries_the_api_refuses_change_nothing() {
        let mut s = ClusterState::default();
        s.apply(1, &cmd(Change::RegisterTask(task()))).unwrap();
        s.apply(2, &cmd(Change::RegisterNode(node("n")))).unwrap();
        let before = s.to_snapshot();
        let bad_name = TaskSpec { name: "../x".into(), ..task() };
        let no_slo = TaskSpec { name: "u".into(), slo_ms: 0, ..task() };
        let huge_node = RegisterNodeRequest { cores: 1 << 30, ..node("big") };
        let unknown_node = Plan {
            epoch: 1,
            term: 1,
            tasks: vec![normalise(task())],
            assignments: vec![Assignment {
                task: "t".into(),
                stage: "t".into(),
                variant: Some(variant()),
                node: "ghost".into(),
                millicores: 1000,
                max_batch: 1,
                weight: 1.0,
                ..Default::default()
            }],
            ..Default::default()
        };
        let refused = [
            cmd(Change::RegisterTask(bad_name)),
            cmd(Change::RegisterTask(no_slo)),
            cmd(Change::SetSlo(SetSloRequest { task: "t".into(), slo_ms: 0 })),
            profile("v", 1_000_000_000),
            cmd(Change::RegisterNode(huge_node)),
            cmd(Change::CommitPlan(unknown_node)),
            cmd(Change::RemoveNode(RemoveNodeRequest { node: "n".into(), keep_certificate: false })),
        ];
        for (i, c) in refused.iter().enumerate() {
            assert!(s.apply(3 + i as u64, c).is_err(), "entry {i} was applied: {c:?}");
        }
        let mut after = s.to_snapshot();
        after.applied_index = before.applied_index;
        assert_eq!(after, before);
    }

    #[test]
    fn a_node_is_removed_only_once_drained_and_out_of_the_plan() {
        let mut s = ClusterState::default();
        s.apply(1, &cmd(Change::RegisterNode(node("n")))).unwrap();
        let remove = cmd(Change::RemoveNode(RemoveNodeRequest { node: "n".into(), keep_certificate: false }));
        assert!(s.apply(2, &remove).is_err(), "not drained");
        s.apply(3, &cmd(Change::DrainNode(DrainNodeRequest { node: "n".into(), undrain: false }))).unwrap();
        s.apply(4, &cmd(Change::RegisterNode(node("n")))).unwrap();
        assert!(s.nodes["n"].draining, "registering again keeps the drain");
        s.apply(5, &remove).unwrap();
        assert!(s.nodes.is_empty());
        assert!(s.revoked.is_empty(), "a node registered without a certificate revokes nothing");
    }

    #[test]
    fn a_deleted_task_leaves_nothing_behind_and_its_name_is_free() {
        use tidal_proto::v1::DeleteTaskRequest;
        let mut s = ClusterState::default();
        s.apply(1, &cmd(Change::RegisterTask(task()))).unwrap();
        s.apply(2, &cmd(Change::RegisterNode(node("n")))).unwrap();
        s.apply(3, &profile("v", 1)).unwrap();
        let worker = Assignment {
            task: "t".into(),
            stage: "t".into(),
            variant: Some(variant()),
            node: "n".into(),
            millicores: 1000,
            max_batch: 1,
            weight: 1.0,
            ..Default::default()
        };
        let with_task = |epoch| Plan {
            epoch,
            term: 1,
            tasks: vec![normalise(task())],
            assignments: vec![worker.clone()],
            ..Default::default()
        };
        s.apply(4, &cmd(Change::CommitPlan(with_task(1)))).unwrap();
        let delete = cmd(Change::DeleteTask(DeleteTaskRequest { task: "t".into() }));
        s.apply(5, &delete).unwrap();
        assert!(s.tasks.is_empty() && s.profiles.is_empty(), "the task and its profiles are gone");
        assert!(s.apply(6, &delete).unwrap_err().contains("unknown task"), "deleted once");
        // A round solved before the deletion still plans for the task: refused.
        assert!(s.apply(7, &cmd(Change::CommitPlan(with_task(2)))).unwrap_err().contains("not registered"));
        s.apply(8, &plan(2)).unwrap();
        assert!(s.apply(9, &cmd(Change::SetSlo(SetSloRequest { task: "t".into(), slo_ms: 50 }))).is_err());
        // The name is free: a new task under it starts without the old one's profiles.
        s.apply(10, &cmd(Change::RegisterTask(task()))).unwrap();
        assert!(s.profiles.is_empty());
        s.apply(11, &cmd(Change::CommitPlan(with_task(3)))).unwrap();
        let restored = ClusterState::from_snapshot(s.to_snapshot());
        assert_eq!(restored.to_snapshot(), s.to_snapshot());
    }

    #[test]
    fn other_models_make_a_new_version_and_a_rollback_serves_an_earlier_one() {
        use tidal_proto::v1::RollbackTaskRequest;
        let mut s = ClusterState::default();
        let with = |variant: &str, slo_ms| TaskSpec {
            name: "t".into(),
            slo_ms,
            variants: vec![VariantSpec { name: variant.into(), ..self::variant() }],
            version: 77, // a client's is ignored
            ..Default::default()
        };
        s.apply(1, &cmd(Change::RegisterTask(with("v", 100)))).unwrap();
        assert_eq!(s.tasks["t"].version, 1);
        s.apply(2, &profile("v", 1)).unwrap();
        // The same models with another SLO: the same version, changed in place.
        s.apply(3, &cmd(Change::RegisterTask(with("v", 200)))).unwrap();
        assert_eq!((s.tasks["t"].version, s.tasks["t"].slo_ms), (1, 200));
        assert!(s.earlier.get("t").is_none_or(|e| e.is_empty()));
        // Other models: version 2; version 1 is kept, with its variant's profile.
        s.apply(4, &cmd(Change::RegisterTask(with("w", 200)))).unwrap();
        assert_eq!(s.tasks["t"].version, 2);
        assert_eq!(s.earlier["t"].keys().copied().collect::<Vec<_>>(), vec![1]);
        assert!(s.profiles.contains_key(&("t".to_string(), "v".to_string())), "kept for a rollback");
        s.apply(5, &cmd(Change::SetSlo(SetSloRequest { task: "t".into(), slo_ms: 300 }))).unwrap();
        // Back to the one before: version 1's models, the task's SLO as it is now.
        let back = |version| cmd(Change::RollbackTask(RollbackTaskRequest { task: "t".into(), version }));
        s.apply(6, &back(0)).unwrap();
        assert_eq!(s.tasks["t"].version, 1);
        assert_eq!(s.tasks["t"].stages[0].variants[0].name, "v");
        assert_eq!(s.tasks["t"].slo_ms, 300);
        assert!(s.apply(7, &back(0)).unwrap_err().contains("keeps no version below"), "nothing below 1");
        assert!(s.apply(8, &back(5)).unwrap_err().contains("kept: 2"));
        // Forward again by number, and a later registration numbers on from the highest.
        s.apply(9, &back(2)).unwrap();
        assert_eq!(s.tasks["t"].version, 2);
        s.apply(10, &cmd(Change::RegisterTask(with("x", 300)))).unwrap();
        assert_eq!(s.tasks["t"].version, 3);
        assert!(
            !s.profiles.is_empty() && s.profiles.keys().all(|(_, v)| v == "v"),
            "the profile of v is kept while a kept version has v"
        );
        let restored = ClusterState::from_snapshot(s.to_snapshot());
        assert_eq!(restored.to_snapshot(), s.to_snapshot());
        assert_eq!(restored.earlier["t"].keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        // Bounded: the oldest are forgotten, and their variants' profiles with them.
        for (i, v) in (0..KEPT_VERSIONS + 2).map(|i| format!("m{i}")).enumerate() {
            s.apply(20 + i as u64, &cmd(Change::RegisterTask(with(&v, 300)))).unwrap();
        }
        assert_eq!(s.earlier["t"].len(), KEPT_VERSIONS);
        assert!(s.profiles.is_empty(), "no kept version has v any more");
        // Deleted, the name starts again at version 1.
        s.apply(40, &cmd(Change::DeleteTask(tidal_proto::v1::DeleteTaskRequest { task: "t".into() }))).unwrap();
        s.apply(41, &cmd(Change::RegisterTask(with("v", 100)))).unwrap();
        assert_eq!(s.tasks["t"].version, 1);
        assert!(!s.earlier.contains_key("t"));
    }

    #[test]
    fn a_staged_version_is_rolled_out_then_promoted_or_rolled_back() {
        use tidal_proto::v1::{EndRollout, RollbackTaskRequest};
        let mut s = ClusterState::default();
        let with = |variant: &str| TaskSpec {
            name: "t".into(),
            slo_ms: 100,
            variants: vec![VariantSpec { name: variant.into(), ..self::variant() }],
            ..Default::default()
        };
        let rollout = |version, canary_percent| Rollout {
            task: "t".into(),
            version,
            canary_percent,
            window_s: 60,
            max_error_increase: 0.01,
            max_slowdown: 1.5,
        };
        let start = |r: Rollout| cmd(Change::StartRollout(r));
        let end = |promote, version| {
            cmd(Change::EndRollout(EndRollout { task: "t".into(), promote, reason: "test".into(), version }))
        };
        assert!(s.apply(1, &cmd(Change::StageTask(with("v")))).unwrap_err().contains("first version"));
        s.apply(2, &cmd(Change::RegisterTask(with("v")))).unwrap();
        assert!(s.apply(3, &cmd(Change::StageTask(with("v")))).unwrap_err().contains("nothing to stage"));
        s.apply(3, &cmd(Change::StageTask(with("w")))).unwrap();
        assert_eq!(s.tasks["t"].version, 1, "staged, not served");
        assert!(s.earlier["t"].contains_key(&2));
        s.apply(4, &profile("w", 1)).unwrap(); // a staged version's variant may be profiled
        for (i, bad) in [rollout(2, 0), rollout(2, 51), rollout(1, 10), rollout(3, 10)].into_iter().enumerate() {
            assert!(s.apply(10 + i as u64, &start(bad)).is_err(), "rollout {i}");
        }
        s.apply(20, &start(rollout(2, 10))).unwrap();
        assert!(s.apply(21, &start(rollout(2, 10))).is_err(), "one rollout at a time");
        assert!(s.apply(22, &cmd(Change::RegisterTask(with("x")))).unwrap_err().contains("under way"));
        // A plan may name the canary of the rollout under way, and no other.
        let canary = |version| TaskSpec { name: format!("t@{version}"), ..normalise(with("w")) };
        let with_canary = |epoch, version| Plan { epoch, term: 1, tasks: vec![canary(version)], ..Default::default() };
        s.apply(23, &cmd(Change::CommitPlan(with_canary(1, 2)))).unwrap();
        assert!(s.apply(24, &cmd(Change::CommitPlan(with_canary(2, 3)))).is_err());
        let restored = ClusterState::from_snapshot(s.to_snapshot());
        assert_eq!(restored.rollouts["t"], rollout(2, 10));
        // Promoted: version 2 serves, version 1 is kept. A verdict on another version is refused.
        assert!(s.apply(24, &end(true, 1)).unwrap_err().contains("not the version 1 judged"));
        s.apply(25, &end(true, 2)).unwrap();
        assert!(s.rollouts.is_empty());
        assert_eq!(s.tasks["t"].version, 2);
        assert!(s.earlier["t"].contains_key(&1));
        assert!(s.apply(26, &end(true, 2)).is_err(), "no rollout to end");
        // Rolled back: the version served stays; a rollback during a rollout only ends it.
        s.apply(27, &start(rollout(1, 20))).unwrap();
        s.apply(28, &end(false, 1)).unwrap();
        assert_eq!(s.tasks["t"].version, 2);
        s.apply(29, &start(rollout(1, 20))).unwrap();
        let named = cmd(Change::RollbackTask(RollbackTaskRequest { task: "t".into(), version: 1 }));
        assert!(s.apply(30, &named).unwrap_err().contains("under way"));
        s.apply(30, &cmd(Change::RollbackTask(RollbackTaskRequest { task: "t".into(), version: 0 }))).unwrap();
        assert!(s.rollouts.is_empty());
        assert_eq!(s.tasks["t"].version, 2);
        // A registered name may not look like a canary's.
        assert!(s.apply(31, &cmd(Change::RegisterTask(TaskSpec { name: "t@3".into(), ..with("v") }))).is_err());
    }

    #[test]
    fn a_removed_nodes_certificate_is_revoked_and_the_list_is_bounded() {
        let mut s = ClusterState::default();
        let with_cert = RegisterNodeRequest { cert_serial: "1a2b".into(), ..node("n") };
        s.apply(1, &cmd(Change::RegisterNode(with_cert))).unwrap();
        s.apply(2, &cmd(Change::DrainNode(DrainNodeRequest { node: "n".into(), undrain: false }))).unwrap();
        s.apply(3, &cmd(Change::RemoveNode(RemoveNodeRequest { node: "n".into(), keep_certificate: false }))).unwrap();
        assert_eq!(s.revoked["1a2b"].identity, "agent/n");
        assert_eq!(s.revocations_version, 3);
        let revoke = |serial: &str| {
            cmd(Change::RevokeCertificate(RevokedCertificate {
                serial: serial.into(),
                identity: "admin/x".into(),
                reason: String::new(),
            }))
        };
        for bad in ["0A", "0a", "", "zz", "a:b"] {
            assert!(s.apply(4, &revoke(bad)).is_err(), "{bad:?} is not in the one form");
        }
        s.apply(5, &revoke("1a2b")).unwrap();
        assert_eq!(s.revocations_version, 3, "revoking again changes nothing");
        assert_eq!(s.revoked["1a2b"].identity, "agent/n", "the first record stays");
        for i in 1..MAX_REVOKED {
            s.apply(10 + i as u64, &revoke(&format!("{:x}", 0x10000 + i))).unwrap();
        }
        assert_eq!(s.revoked.len(), MAX_REVOKED);
        assert!(s.apply(100_000, &revoke("ffffffff")).is_err(), "bounded");
        let restored = ClusterState::from_snapshot(s.to_snapshot());
        assert_eq!(restored.to_snapshot(), s.to_snapshot());
        assert!(tidal_auth::Revocations::is_revoked(
            &StateRevocations(std::sync::Arc::new(std::sync::RwLock::new(restored))),
            "1a2b"
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Whatever bytes a log entry holds, applying what decodes from them never panics,
        /// and the state still snapshots and restores to itself.
        #[test]
        fn any_decodable_entry_applies_without_panicking(
            entries in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256), 0..12),
        ) {
            use prost::Message;
            let mut s = ClusterState::default();
            s.apply(1, &cmd(Change::RegisterTask(task()))).unwrap();
            s.apply(2, &cmd(Change::RegisterNode(node("n")))).unwrap();
            for (i, bytes) in entries.iter().enumerate() {
                if let Ok(c) = Command::decode(bytes.as_slice()) {
                    let _ = s.apply(3 + i as u64, &c);
                }
            }
            let restored = ClusterState::from_snapshot(s.to_snapshot());
            proptest::prop_assert_eq!(restored.to_snapshot(), s.to_snapshot());
        }
    }
}
