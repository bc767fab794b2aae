//! The controller's gRPC API for agents and for `tidalctl`.

use std::sync::Arc;
use std::time::Instant;

use tidal_auth::guard::{is_admin, may_read};
use tidal_auth::{Guard, Role};
use tidal_common::task::find_variant;
use tidal_proto::not_leader;
use tidal_proto::v1::controller_server::Controller as ControllerApi;
use tidal_proto::v1::{
    command::Change, ClusterStatus, ClusterStatusRequest, Command, DeleteTaskRequest, DeleteTaskResponse,
    DrainNodeRequest, DrainNodeResponse, FetchModelRequest, NodeStatus, PlanHistory, PlanHistoryRequest,
    RegisterNodeRequest, RegisterNodeResponse, RegisterTaskRequest, RegisterTaskResponse, RemoveNodeRequest,
    RemoveNodeResponse, RollbackTaskRequest, RollbackTaskResponse, SetShareRequest, SetShareResponse, SetSloRequest,
    SetSloResponse, StartRolloutRequest, StartRolloutResponse, StoreProfileRequest, StoreProfileResponse, TaskStatus,
    TelemetryAck, TelemetryReport,
};
use tidal_proto::v1::{
    AddReplicaRequest, ListReplicasRequest, ListRevokedRequest, MembershipResponse, RemoveReplicaRequest, Replica,
    ReplicaList, Revocations, RevokeCertificateRequest, RevokedCertificate, RevokedCertificates, TransferLeaderRequest,
};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::consensus::{MembershipChange, ProposeError};
use crate::controller::Controller;
use crate::model_store::{ChunkStream, ModelStore};
use crate::transport::AddressBook;

/// How long `add_replica` waits for a learner to catch up before promoting it.
const CATCH_UP: std::time::Duration = std::time::Duration::from_secs(10);
/// How long `delete_task` waits for a plan without the task's workers: the round a change
/// starts commits within a second or two; past this, the next round's plan frees them.
const DELETE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The controller's API. Agents register and report as their own node; admins change tasks,
/// profiles, nodes and membership; admins, readers and other replicas may read.
#[derive(Clone)]
pub struct ControllerService {
    pub ctl: Arc<Controller>,
    pub guard: Guard,
    /// The model files this replica sends to agents (`--model-dir`), if it has any.
    pub models: Option<Arc<ModelStore>>,
}

impl ControllerService {
    fn refusal(&self, e: ProposeError) -> Status {
        refusal(&self.ctl.raft.peers, e)
    }

    /// Calls that act on the cluster (writes, telemetry, live status) are served by the
    /// leader; a follower answers with the leader's address. While an election is under way
    /// (no leader known), the call waits for its outcome rather than fail at once.
    async fn require_leader(&self) -> Result<(), Status> {
        if self.ctl.raft.known_leader().await.is_leader {
            Ok(())
        } else {
            Err(not_leader(self.ctl.raft.leader_address().as_deref()))
        }
    }

    /// The group's replicas (voters and learners) and the current term, told to agents: only
    /// these replicas may push plans to them, at no term far beyond this one.
    fn members(&self) -> (Vec<u64>, u64) {
        let raft = self.ctl.raft.status();
        let mut members: Vec<u64> = raft.voters.iter().chain(&raft.learners).copied().collect();
        members.sort_unstable();
        members.dedup();
        (members, raft.term)
    }

    /// The revocation list for an agent that holds version `seen` (`None`: send it whatever
    /// it holds); nothing when it is current.
    fn revocations(&self, seen: Option<u64>) -> Option<Revocations> {
        self.ctl.raft.read(|s| {
            (seen != Some(s.revocations_version))
                .then(|| Revocations { version: s.revocations_version, serials: s.revoked.keys().cloned().collect() })
        })
    }

    fn revoked(&self) -> RevokedCertificates {
        RevokedCertificates { certificates: self.ctl.raft.read(|s| s.revoked.values().cloned().collect()) }
    }

    /// [`Self::commit`], then an audit line: who changed what.
    async fn commit_as(&self, by: &Option<Role>, change: Change) -> Result<(), Status> {
        let what = describe(&change);
        self.commit(change).await?;
        info!(target: "audit", by = %who(by), change = %what, "change committed");
        Ok(())
    }

    async fn commit(&self, change: Change) -> Result<(), Status> {
        // Not proposed again on a refusal: a proposal that lost its leader may still commit.
        self.require_leader().await?;
        self.ctl.raft.propose(Command { change: Some(change) }).await.map_err(|e| self.refusal(e))?;
        self.ctl.replan.notify_one();
        Ok(())
    }

    /// Waits until replica `id` has replicated the log up to the leader's commit index of now.
    async fn wait_caught_up(&self, id: u64) -> Result<(), Status> {
        let target = self.ctl.raft.status().commit;
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        loop {
            let raft = self.ctl.raft.status();
            if !raft.is_leader {
                return Err(not_leader(self.ctl.raft.leader_address().as_deref()));
            }
            if raft.matched.iter().any(|&(r, m)| r == id && m >= target) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Status::deadline_exceeded(format!(
                    "replica {id} joined as a learner but has not caught up within {CATCH_UP:?} (is it running with \
                     --join at the address given?); add it again to promote it once it has"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// The epoch of the first plan in force without workers of `task`, waiting (on applied
    /// entries, not polls) up to `within`; `None` if none came in that time.
    async fn plan_without(&self, task: &str, within: std::time::Duration) -> Option<u64> {
        let mut status = self.ctl.raft.watch();
        let without = || {
            self.ctl.raft.read(|s| {
                let has = s.plan.as_ref().is_some_and(|p| p.assignments.iter().any(|a| of_task(&a.task, task)));
                (!has).then(|| s.plan_epoch())
            })
        };
        let waited = tokio::time::timeout(within, async {
            loop {
                if let Some(epoch) = without() {
                    return Some(epoch);
                }
                status.changed().await.ok()?;
            }
        });
        waited.await.ok().flatten()
    }

    async fn change_membership(&self, change: MembershipChange) -> Result<Response<MembershipResponse>, Status> {
        self.require_leader().await?;
        info!(?change, "membership change requested");
        self.ctl.raft.change_membership(change).await.map_err(|e| self.refusal(e))?;
        Ok(Response::new(MembershipResponse::default()))
    }
}

#[tonic::async_trait]
impl ControllerApi for ControllerService {
    async fn register_node(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        let node = request.get_ref().node.clone();
        let holder = self.guard.require_holder(&request, "RegisterNode", |r| *r == Role::Agent(node.clone()))?;
        self.require_leader().await?;
        let mut req = request.into_inner();
        // The serial is the one the caller showed, never what it wrote.
        req.cert_serial = holder.as_ref().map(|h| h.serial.clone()).unwrap_or_default();
        tidal_common::plan::validate_node(&req).map_err(Status::invalid_argument)?;
        let known = self.ctl.raft.read(|s| {
            s.nodes.get(&req.node).is_some_and(|n| {
                n.address == req.address
                    && n.control_address == req.control_address
                    && n.cores == req.cores
                    && n.memory_bytes == req.memory_bytes
                    && n.memory_total_bytes == req.memory_total_bytes
                    && n.cert_serial == req.cert_serial
            })
        });
        if !known {
            self.commit_as(&holder.as_ref().map(|h| h.role.clone()), Change::RegisterNode(req.clone())).await?;
        }
        // A registering agent has (re)started: whatever plan it acknowledged before is gone.
        self.ctl.forget_acknowledgement(&req.node);
        self.ctl.push_if_behind(&req.node, 0);
        let (members, term) = self.members();
        Ok(Response::new(RegisterNodeResponse {
            plan_epoch: self.ctl.raft.read(|s| s.plan_epoch()),
            members,
            term,
            revocations: self.revocations(None),
        }))
    }

    async fn report_telemetry(&self, request: Request<TelemetryReport>) -> Result<Response<TelemetryAck>, Status> {
        let node = request.get_ref().node.clone();
        self.guard.require(&request, "ReportTelemetry", |r| *r == Role::Agent(node.clone()))?;
        self.require_leader().await?;
        let report = request.into_inner();
        let (node, applied, seen) = (report.node.clone(), report.applied_epoch, report.revocations_seen);
        if !self.ctl.raft.read(|s| s.nodes.contains_key(&node)) {
            return Err(Status::failed_precondition(format!("node {node:?} is not registered")));
        }
        let now = Instant::now();
        let waiting: Vec<String> = report.tasks.iter().filter(|t| t.waiting > 0).map(|t| t.task.clone()).collect();
        if self.ctl.observed(|o| o.record(report, now)) {
            self.ctl.reconsider.notify_one();
        }
        self.ctl.wake(&waiting);
        self.ctl.check_surge(now);
        self.ctl.push_if_behind(&node, applied);
        let (members, term) = self.members();
        Ok(Response::new(TelemetryAck {
            plan_epoch: self.ctl.raft.read(|s| s.plan_epoch()),
            members,
            term,
            revocations: self.revocations(Some(seen)),
            draining: self.ctl.raft.read(|s| s.nodes.get(&node).is_some_and(|n| n.draining)),
        }))
    }

    async fn register_task(
        &self,
        request: Request<RegisterTaskRequest>,
    ) -> Result<Response<RegisterTaskResponse>, Status> {
        let by = self.guard.require(&request, "RegisterTask", is_admin)?;
        self.require_leader().await?;
        let RegisterTaskRequest { task, staged } = request.into_inner();
        let task = tidal_common::task::normalise(task.ok_or_else(|| Status::invalid_argument("no task"))?);
        tidal_common::task::validate_task(&task).map_err(Status::invalid_argument)?;
        if !tidal_common::task::valid_name(&task.name) {
            return Err(Status::invalid_argument(format!("task name {:?}: `@` names canaries", task.name)));
        }
        let name = task.name.clone();
        // The version served, or with `staged` the highest kept.
        let version_of = |s: &crate::state::ClusterState| {
            let served = s.tasks.get(&name).map(|t| t.version);
            let kept = s.earlier.get(&name).and_then(|e| e.keys().next_back().copied());
            if staged {
                kept.max(served)
            } else {
                served
            }
        };
        let before = self.ctl.raft.read(version_of);
        // The state refuses a staged first version and a new version during a rollout
        // (FAILED_PRECONDITION, with why).
        let change = if staged { Change::StageTask(task) } else { Change::RegisterTask(task) };
        self.commit_as(&by, change).await?;
        let version = self.ctl.raft.read(version_of).unwrap_or_default();
        Ok(Response::new(RegisterTaskResponse { version, new_version: before != Some(version) }))
    }

    async fn start_rollout(
        &self,
        request: Request<StartRolloutRequest>,
    ) -> Result<Response<StartRolloutResponse>, Status> {
        let by = self.guard.require(&request, "StartRollout", is_admin)?;
        self.require_leader().await?;
        let rollout = request.into_inner().rollout.ok_or_else(|| Status::invalid_argument("no rollout"))?;
        crate::state::validate_rollout(&rollout).map_err(Status::invalid_argument)?;
        if !self.ctl.raft.read(|s| s.tasks.contains_key(&rollout.task)) {
            return Err(Status::not_found(format!("unknown task {:?}", rollout.task)));
        }
        // The state refuses a version it does not keep, or a second rollout.
        self.commit_as(&by, Change::StartRollout(rollout)).await?;
        Ok(Response::new(StartRolloutResponse {}))
    }

    async fn rollback_task(
        &self,
        request: Request<RollbackTaskRequest>,
    ) -> Result<Response<RollbackTaskResponse>, Status> {
        let by = self.guard.require(&request, "RollbackTask", is_admin)?;
        self.require_leader().await?;
        let req = request.into_inner();
        let Some(from_version) = self.ctl.raft.read(|s| s.tasks.get(&req.task).map(|t| t.version)) else {
            return Err(Status::not_found(format!("unknown task {:?}", req.task)));
        };
        let task = req.task.clone();
        // The state refuses a version it does not keep (FAILED_PRECONDITION, with those kept).
        self.commit_as(&by, Change::RollbackTask(req)).await?;
        let version = self.ctl.raft.read(|s| s.tasks.get(&task).map_or(0, |t| t.version));
        Ok(Response::new(RollbackTaskResponse { from_version, version }))
    }

    async fn set_slo(&self, request: Request<SetSloRequest>) -> Result<Response<SetSloResponse>, Status> {
        let by = self.guard.require(&request, "SetSlo", is_admin)?;
        self.require_leader().await?;
        let req = request.into_inner();
        tidal_common::task::validate_slo(req.slo_ms).map_err(Status::invalid_argument)?;
        if !self.ctl.raft.read(|s| s.tasks.contains_key(&req.task)) {
            return Err(Status::not_found(format!("unknown task {:?}", req.task)));
        }
        self.commit_as(&by, Change::SetSlo(req)).await?;
        Ok(Response::new(SetSloResponse {}))
    }

    async fn set_share(&self, request: Request<SetShareRequest>) -> Result<Response<SetShareResponse>, Status> {
        let by = self.guard.require(&request, "SetShare", is_admin)?;
        self.require_leader().await?;
        let req = request.into_inner();
        let current = self.ctl.raft.read(|s| s.tasks.get(&req.task).map(|t| t.share));
        let Some(current) = current else {
            return Err(Status::not_found(format!("unknown task {:?}", req.task)));
        };
        let share = tidal_common::task::changed_share(current.as_ref(), &req).map_err(Status::invalid_argument)?;
        self.commit_as(&by, Change::SetShare(req)).await?;
        Ok(Response::new(SetShareResponse { share: Some(share) }))
    }

    async fn delete_task(&self, request: Request<DeleteTaskRequest>) -> Result<Response<DeleteTaskResponse>, Status> {
        let by = self.guard.require(&request, "DeleteTask", is_admin)?;
        self.require_leader().await?;
        let req = request.into_inner();
        let workers = self.ctl.raft.read(|s| {
            let planned =
                s.plan.as_ref().map_or(0, |p| p.assignments.iter().filter(|a| of_task(&a.task, &req.task)).count());
            s.tasks.contains_key(&req.task).then_some(planned as u32)
        });
        let Some(workers) = workers else {
            return Err(Status::not_found(format!("unknown task {:?}", req.task)));
        };
        let task = req.task.clone();
        // The commit starts a round, whose plan leaves the task out; the agents drain its
        // workers (queued requests are served) as they apply that plan.
        self.commit_as(&by, Change::DeleteTask(req)).await?;
        self.ctl.observed(|o| o.forget_task(&task));
        let plan_epoch = self.plan_without(&task, DELETE_WAIT).await;
        info!(target: "audit", task = %task, workers, plan_epoch = ?plan_epoch, "task deleted");
        Ok(Response::new(DeleteTaskResponse { plan_epoch: plan_epoch.unwrap_or(0), workers }))
    }

    async fn store_profile(
        &self,
        request: Request<StoreProfileRequest>,
    ) -> Result<Response<StoreProfileResponse>, Status> {
        let by = self.guard.require(&request, "StoreProfile", is_admin)?;
        self.require_leader().await?;
        let profile = request.into_inner().profile.ok_or_else(|| Status::invalid_argument("no profile"))?;
        tidal_common::profile::validate_profile(&profile).map_err(Status::invalid_argument)?;
        let known = self.ctl.raft.read(|s| {
            // The version served's variants, or a kept (staged or earlier) version's.
            let kept = s.earlier.get(&profile.task).into_iter().flat_map(|e| e.values());
            s.tasks.get(&profile.task).into_iter().chain(kept).any(|t| find_variant(t, &profile.variant).is_some())
        });
        if !known {
            return Err(Status::not_found(format!("task {:?} has no variant {:?}", profile.task, profile.variant)));
        }
        self.commit_as(&by, Change::StoreProfile(profile)).await?;
        Ok(Response::new(StoreProfileResponse {}))
    }

    async fn status(&self, request: Request<ClusterStatusRequest>) -> Result<Response<ClusterStatus>, Status> {
        self.guard.require(&request, "Status", may_read)?;
        self.require_leader().await?;
        let asked = self.ctl.raft.status();
        // Even the leader confirms it still leads before answering (it may be cut off).
        self.ctl.raft.read_index().await.map_err(|e| self.refusal(e))?;
        let raft = self.ctl.raft.status();
        if !raft.is_leader || raft.term != asked.term {
            // It lost leadership during the read: the answer would name a leader it was not
            // read under.
            return Err(not_leader(self.ctl.raft.leader_address().as_deref()));
        }
        let state = self.ctl.raft.read(|s| s.clone());
        let now = Instant::now();
        let status = self.ctl.observed(|o| {
            let nodes = state
                .nodes
                .iter()
                .map(|(name, info)| {
                    let report = o.reports.get(name);
                    NodeStatus {
                        node: name.clone(),
                        address: info.address.clone(),
                        control_address: info.control_address.clone(),
                        draining: info.draining,
                        cores: info.cores,
                        memory_bytes: info.memory_bytes,
                        memory_total_bytes: info.memory_total_bytes,
                        memory_planned_bytes: state
                            .plan
                            .iter()
                            .flat_map(|p| &p.assignments)
                            .filter(|a| &a.node == name)
                            .map(|a| a.memory_bytes)
                            .sum(),
                        applied_epoch: report.map_or(0, |(_, r)| r.applied_epoch),
                        seconds_since_report: report
                            .map_or(f64::INFINITY, |(t, _)| now.duration_since(*t).as_secs_f64()),
                        workers: report.map_or_else(Vec::new, |(_, r)| r.workers.clone()),
                        last_push: self.ctl.pushers.last_answer(name),
                    }
                })
                .collect();
            let tasks = state
                .tasks
                .values()
                .map(|t| {
                    let (served, errors) = o.totals.get(&t.name).copied().unwrap_or_default();
                    TaskStatus {
                        spec: Some(t.clone()),
                        rate_rps: o.rate(&t.name, now, 5),
                        forecast_rps: o.round_rates.get(&t.name).map_or(0.0, |r| r.forecast_rps),
                        planned_rps: o.round_rates.get(&t.name).map_or(0.0, |r| r.planned_rps),
                        latency_p99_ms: o.p99(&t.name),
                        served,
                        errors,
                        profiled_variants: state
                            .profiles
                            .keys()
                            .filter(|(task, _)| *task == t.name)
                            .map(|(_, v)| v.clone())
                            .collect(),
                        profiles: state
                            .profiles
                            .iter()
                            .filter(|((task, _), _)| *task == t.name)
                            .map(|(_, p)| p.clone())
                            .collect(),
                        stages: o.stages(&t.name, &t.stages.iter().map(|s| s.name.clone()).collect::<Vec<_>>()),
                        corrections: o.corrections.get(&t.name).cloned().unwrap_or_default(),
                        earlier_versions: state
                            .earlier
                            .get(&t.name)
                            .map_or_else(Vec::new, |e| e.keys().copied().collect()),
                        rollout: state.rollouts.get(&t.name).cloned(),
                        rollout_progress: o.rollouts.get(&t.name).map(|w| w.progress.clone()).unwrap_or_default(),
                    }
                })
                .collect();
            ClusterStatus {
                leader: self.ctl.cfg.advertise.clone(),
                term: raft.term,
                plan: state.plan.clone(),
                nodes,
                tasks,
            }
        });
        Ok(Response::new(status))
    }

    async fn drain_node(&self, request: Request<DrainNodeRequest>) -> Result<Response<DrainNodeResponse>, Status> {
        let by = self.guard.require(&request, "DrainNode", is_admin)?;
        self.require_leader().await?;
        let req = request.into_inner();
        if !self.ctl.raft.read(|s| s.nodes.contains_key(&req.node)) {
            return Err(Status::not_found(format!("unknown node {:?}", req.node)));
        }
        info!(node = %req.node, undrain = req.undrain, "drain requested");
        self.commit_as(&by, Change::DrainNode(req)).await?;
        Ok(Response::new(DrainNodeResponse {}))
    }

    async fn remove_node(&self, request: Request<RemoveNodeRequest>) -> Result<Response<RemoveNodeResponse>, Status> {
        let by = self.guard.require(&request, "RemoveNode", is_admin)?;
        self.require_leader().await?;
        let req = request.into_inner();
        let Some(serial) = self.ctl.raft.read(|s| s.nodes.get(&req.node).map(|n| n.cert_serial.clone())) else {
            return Err(Status::not_found(format!("unknown node {:?}", req.node)));
        };
        // The state refuses a node not yet drained (FAILED_PRECONDITION, with why), and revokes
        // the certificate it registered with.
        self.commit_as(&by, Change::RemoveNode(req.clone())).await?;
        let revoked = self.ctl.raft.read(|s| s.revoked.get(&serial).cloned());
        info!(target: "audit", node = %req.node, revoked = ?revoked.as_ref().map(|r| &r.serial), "node removed");
        Ok(Response::new(RemoveNodeResponse { revoked }))
    }

    /// Served by any replica, after a read index: never a stale follower's view.
    async fn history(&self, request: Request<PlanHistoryRequest>) -> Result<Response<PlanHistory>, Status> {
        self.guard.require(&request, "History", may_read)?;
        let limit = request.into_inner().limit.max(1) as usize;
        self.ctl.raft.read_index().await.map_err(|e| self.refusal(e))?;
        let plans =
            self.ctl.raft.read(|s| s.history.iter().skip(s.history.len().saturating_sub(limit)).cloned().collect());
        Ok(Response::new(PlanHistory { plans }))
    }

    /// This replica's own view of the group (no read index: it is for diagnosing, and must
    /// answer while there is no leader).
    async fn list_replicas(&self, request: Request<ListReplicasRequest>) -> Result<Response<ReplicaList>, Status> {
        self.guard.require(&request, "ListReplicas", may_read)?;
        let raft = self.ctl.raft.status();
        let book = self.ctl.raft.peers.all();
        let matched = |id: u64| raft.matched.iter().find(|(r, _)| *r == id).map_or(0, |(_, m)| *m);
        let replicas = raft
            .voters
            .iter()
            .map(|&id| (id, true))
            .chain(raft.learners.iter().map(|&id| (id, false)))
            .map(|(id, voter)| Replica {
                id,
                address: book.get(&id).cloned().unwrap_or_default(),
                voter,
                matched: matched(id),
            })
            .collect();
        Ok(Response::new(ReplicaList {
            replicas,
            leader: raft.leader,
            leader_address: self.ctl.raft.leader_address().unwrap_or_default(),
            term: raft.term,
            commit: raft.commit,
            applied: raft.applied,
            snapshot_index: raft.snapshot_index,
            answered_by: raft.id,
            last_index: raft.last_index,
        }))
    }

    async fn add_replica(&self, request: Request<AddReplicaRequest>) -> Result<Response<MembershipResponse>, Status> {
        let by = self.guard.require(&request, "AddReplica", is_admin)?;
        info!(target: "audit", by = %who(&by), call = "AddReplica", request = ?request.get_ref(), "membership change asked");
        let req = request.into_inner();
        if req.id == 0 {
            return Err(Status::invalid_argument("a replica id must be positive"));
        }
        crate::transport::parse_replica_address(&req.address).map_err(Status::invalid_argument)?;
        self.require_leader().await?;
        let raft = self.ctl.raft.status();
        if raft.voters.contains(&req.id) {
            return Err(Status::already_exists(format!("replica {} is already a voter", req.id)));
        }
        // First as a learner, so that a replica still copying the log does not count towards
        // (and slow down) the quorum; then promoted once it has caught up.
        if !raft.learners.contains(&req.id) {
            let (id, address) = (req.id, req.address.clone());
            self.change_membership(MembershipChange::AddLearner { id, address }).await?;
        }
        self.wait_caught_up(req.id).await?;
        self.change_membership(MembershipChange::Add { id: req.id, address: req.address }).await
    }

    async fn remove_replica(
        &self,
        request: Request<RemoveReplicaRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let by = self.guard.require(&request, "RemoveReplica", is_admin)?;
        info!(target: "audit", by = %who(&by), call = "RemoveReplica", request = ?request.get_ref(), "membership change asked");
        let RemoveReplicaRequest { id, keep_certificate } = request.into_inner();
        self.require_leader().await?;
        let raft = self.ctl.raft.status();
        if !raft.voters.contains(&id) && !raft.learners.contains(&id) {
            return Err(Status::not_found(format!("replica {id} is not a member")));
        }
        if raft.voters == [id] {
            return Err(Status::failed_precondition("the last replica cannot be removed"));
        }
        if id == raft.id {
            return Err(Status::failed_precondition(format!(
                "replica {id} is the leader: transfer leadership first (tidalctl controller remove does this)"
            )));
        }
        self.change_membership(MembershipChange::Remove { id }).await?;
        if keep_certificate {
            info!(target: "audit", id, "replica removed; its certificate is kept valid, as asked");
            return Ok(Response::new(MembershipResponse { revoked: None }));
        }
        // A removed replica's certificate lets nobody in any more: revoked as this leader saw it
        // speak Raft (a replica it never heard from is revoked by file, `tidalctl certs revoke`).
        let Some(serial) = self.ctl.raft.certificates.get(id) else {
            info!(target: "audit", id, "replica removed; its certificate was never seen here and is not revoked");
            return Ok(Response::new(MembershipResponse { revoked: None }));
        };
        let revoked =
            RevokedCertificate { serial, identity: format!("controller/{id}"), reason: "replica removed".into() };
        self.commit(Change::RevokeCertificate(revoked.clone())).await?;
        info!(target: "audit", id, serial = %revoked.serial, "replica removed; its certificate revoked");
        Ok(Response::new(MembershipResponse { revoked: Some(revoked) }))
    }

    async fn revoke_certificate(
        &self,
        request: Request<RevokeCertificateRequest>,
    ) -> Result<Response<RevokedCertificates>, Status> {
        let admin = self.guard.require(&request, "RevokeCertificate", is_admin)?;
        let mut c = request.into_inner().certificate.ok_or_else(|| Status::invalid_argument("no certificate"))?;
        c.serial = tidal_auth::normalise_serial(&c.serial).map_err(Status::invalid_argument)?;
        crate::state::validate_revocation(&c).map_err(Status::invalid_argument)?;
        self.require_leader().await?;
        self.commit(Change::RevokeCertificate(c.clone())).await?;
        info!(target: "audit", serial = %c.serial, identity = %c.identity, by = ?admin, "certificate revoked");
        Ok(Response::new(self.revoked()))
    }

    type FetchModelStream = ChunkStream;

    /// Served by any replica, from its own copy, to agents: only a file that a kept version
    /// of a task names with that digest (this replica's state may lag a registration by a
    /// moment: the agent then asks another).
    async fn fetch_model(
        &self,
        request: Request<FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        let by = self.guard.require(&request, "FetchModel", |r| matches!(r, Role::Agent(_)))?;
        let FetchModelRequest { model_file, sha256 } = request.into_inner();
        let Some(store) = &self.models else {
            return Err(Status::not_found("this replica keeps no model files (it runs without --model-dir)"));
        };
        let registered = self.ctl.raft.read(|s| {
            s.tasks.values().chain(s.earlier.values().flat_map(|kept| kept.values())).any(|task| {
                tidal_common::task::variants(task).any(|(_, v)| v.model_file == model_file && v.model_sha256 == sha256)
            })
        });
        if !registered {
            return Err(Status::not_found(format!(
                "no task kept here has a variant of model file {model_file:?} with SHA-256 {sha256:?}"
            )));
        }
        let stream = store.send(&model_file).await?;
        info!(by = %who(&by), %model_file, "sending a model file");
        Ok(Response::new(stream))
    }

    /// Served by any replica, after a read index.
    async fn list_revoked(
        &self,
        request: Request<ListRevokedRequest>,
    ) -> Result<Response<RevokedCertificates>, Status> {
        self.guard.require(&request, "ListRevoked", may_read)?;
        self.ctl.raft.read_index().await.map_err(|e| self.refusal(e))?;
        Ok(Response::new(self.revoked()))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let by = self.guard.require(&request, "TransferLeader", is_admin)?;
        info!(target: "audit", by = %who(&by), call = "TransferLeader", request = ?request.get_ref(), "membership change asked");
        let to = request.into_inner().id;
        self.require_leader().await?;
        let raft = self.ctl.raft.status();
        if !raft.voters.contains(&to) {
            return Err(Status::not_found(format!("replica {to} is not a voting member")));
        }
        if to == raft.id {
            return Ok(Response::new(MembershipResponse::default()));
        }
        info!(to, "leadership transfer requested");
        self.ctl.raft.transfer_leader(to).await.map_err(|e| self.refusal(e))?;
        Ok(Response::new(MembershipResponse::default()))
    }
}

/// Whether a plan's task `name` is `task` or one of its canaries.
fn of_task(name: &str, task: &str) -> bool {
    name == task || tidal_common::task::parse_canary(name).is_some_and(|(base, _)| base == task)
}

/// Who made a change, for the audit line.
fn who(by: &Option<Role>) -> String {
    by.as_ref().map_or_else(|| "anyone (plaintext)".to_string(), Role::to_string)
}

/// A change in a few words, for the audit line (not the whole message: a task or profile can be
/// large).
pub(crate) fn describe(change: &Change) -> String {
    match change {
        Change::RegisterNode(n) => format!("register node {} ({} cores at {})", n.node, n.cores, n.address),
        Change::RegisterTask(t) => {
            format!("register task {} ({} variants, SLO {} ms)", t.name, t.variants.len(), t.slo_ms)
        }
        Change::SetSlo(s) => format!("task {} SLO {} ms", s.task, s.slo_ms),
        Change::DeleteTask(d) => format!("delete task {}", d.task),
        Change::StageTask(t) => format!("stage a version of task {} ({} stages)", t.name, t.stages.len()),
        Change::StartRollout(r) => format!(
            "roll out version {} of task {} on {} % for {} s (margins: {:.1} error points, {:.1}× p99)",
            r.version,
            r.task,
            r.canary_percent,
            r.window_s,
            100.0 * r.max_error_increase,
            r.max_slowdown
        ),
        Change::EndRollout(e) => {
            format!("{} the rollout of task {}: {}", if e.promote { "promote" } else { "roll back" }, e.task, e.reason)
        }
        Change::RollbackTask(r) => match r.version {
            0 => format!("roll task {} back to the version before", r.task),
            v => format!("roll task {} back to version {v}", r.task),
        },
        Change::SetShare(s) => format!("task {} share {s:?}", s.task),
        Change::StoreProfile(p) => format!("profile of {}/{} ({} points)", p.task, p.variant, p.points.len()),
        Change::CommitPlan(p) => format!("plan {}", p.epoch),
        Change::CommitPlanDelta(d) => format!("plan {} (delta)", d.epoch),
        Change::DrainNode(d) => format!("{} node {}", if d.undrain { "undrain" } else { "drain" }, d.node),
        Change::RemoveNode(r) => format!("remove node {} (keep certificate: {})", r.node, r.keep_certificate),
        Change::RevokeCertificate(c) => format!("revoke {} ({})", c.serial, c.identity),
    }
}

/// The status a consensus error maps to; a refusal for not leading names the leader's API
/// address (the address book holds `API/PEER`, and clients follow the API address only).
fn refusal(peers: &AddressBook, e: ProposeError) -> Status {
    match e {
        ProposeError::NotLeader(leader) => not_leader(leader.and_then(|id| peers.api(id)).as_deref()),
        ProposeError::Stopped | ProposeError::Timeout(_) | ProposeError::Busy => Status::unavailable(e.to_string()),
        ProposeError::Rejected(_) => Status::failed_precondition(e.to_string()),
        ProposeError::Raft(_) => Status::internal(e.to_string()),
        // Not UNAVAILABLE, which says "nothing was done, send it again": a client that
        // retried this could apply the command twice.
        ProposeError::OutcomeUnknown(_) => Status::unknown(format!("{e}; read the state before sending it again")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_for_not_leading_names_the_leaders_api_address() {
        let peers = AddressBook::new([(2, "127.0.0.1:7001/127.0.0.1:7101".to_string())]);
        let named = refusal(&peers, ProposeError::NotLeader(Some(2)));
        assert_eq!(named.code(), tonic::Code::Unavailable);
        assert_eq!(tidal_proto::leader_hint(&named).as_deref(), Some("127.0.0.1:7001"));
        let unknown = refusal(&peers, ProposeError::NotLeader(Some(3)));
        assert_eq!(tidal_proto::leader_hint(&unknown), None);
        assert_eq!(tidal_proto::leader_hint(&refusal(&peers, ProposeError::NotLeader(None))), None);
    }
}
