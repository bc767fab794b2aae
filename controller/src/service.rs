//! The controller's gRPC API for agents and for `tidalctl`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use tidal_proto::v1::controller_server::Controller as ControllerApi;
use tidal_proto::v1::{
    command::Change, ClusterStatus, ClusterStatusRequest, Command, NodeStatus, PlanHistory, PlanHistoryRequest,
    RegisterNodeRequest, RegisterNodeResponse, RegisterTaskRequest, RegisterTaskResponse, SetSloRequest,
    SetSloResponse, StoreProfileRequest, StoreProfileResponse, TaskSpec, TaskStatus, TelemetryAck, TelemetryReport,
};
use tonic::{Request, Response, Status};

use crate::consensus::ProposeError;
use crate::controller::Controller;

#[derive(Clone)]
pub struct ControllerService {
    pub ctl: Arc<Controller>,
}

impl From<ProposeError> for Status {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::NotLeader(_) | ProposeError::Stopped => Status::unavailable(e.to_string()),
            ProposeError::Rejected(_) => Status::failed_precondition(e.to_string()),
            ProposeError::Raft(_) => Status::internal(e.to_string()),
        }
    }
}

impl ControllerService {
    async fn commit(&self, change: Change) -> Result<(), Status> {
        self.ctl.raft.propose(Command { change: Some(change) }).await?;
        self.ctl.replan.notify_one();
        Ok(())
    }
}

/// Checks a task before it is replicated: a bad one is refused with the reason.
pub fn validate_task(t: &TaskSpec) -> Result<(), String> {
    if t.name.is_empty() || t.name.len() > 64 || !t.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!("task name {:?} must be 1–64 characters of [A-Za-z0-9-_.]", t.name));
    }
    if t.slo_ms == 0 {
        return Err("the SLO must be positive".into());
    }
    if t.variants.is_empty() {
        return Err("a task needs at least one variant".into());
    }
    let mut names = HashSet::new();
    for v in &t.variants {
        if v.name.is_empty() || !names.insert(v.name.as_str()) {
            return Err(format!("variant names must be non-empty and unique ({:?})", v.name));
        }
        if !(0.0..=100.0).contains(&v.accuracy) {
            return Err(format!("variant {}: accuracy {} is not a percentage", v.name, v.accuracy));
        }
        if v.input_shape.is_empty() || v.input_shape.iter().any(|&d| d <= 0) {
            return Err(format!("variant {}: input shape {:?} must be positive dimensions", v.name, v.input_shape));
        }
        if v.input_shape != t.variants[0].input_shape {
            return Err(format!(
                "variant {} takes {:?} but {} takes {:?}: the variants of a task must take the same input",
                v.name, v.input_shape, t.variants[0].name, t.variants[0].input_shape
            ));
        }
        if v.model_file.is_empty() || v.model_file.starts_with('/') || v.model_file.contains("..") {
            return Err(format!("variant {}: model file {:?} must be a relative path", v.name, v.model_file));
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl ControllerApi for ControllerService {
    async fn register_node(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        let req = request.into_inner();
        if req.node.is_empty() || req.address.is_empty() || req.cores == 0 {
            return Err(Status::invalid_argument("a node needs a name, an address and at least one core"));
        }
        let known = self
            .ctl
            .raft
            .read(|s| s.nodes.get(&req.node).is_some_and(|n| n.address == req.address && n.cores == req.cores));
        if !known {
            self.commit(Change::RegisterNode(req.clone())).await?;
        }
        self.ctl.push_if_behind(&req.node, 0);
        Ok(Response::new(RegisterNodeResponse { plan_epoch: self.ctl.raft.read(|s| s.plan_epoch()) }))
    }

    async fn report_telemetry(&self, request: Request<TelemetryReport>) -> Result<Response<TelemetryAck>, Status> {
        let report = request.into_inner();
        let (node, applied) = (report.node.clone(), report.applied_epoch);
        if !self.ctl.raft.read(|s| s.nodes.contains_key(&node)) {
            return Err(Status::failed_precondition(format!("node {node:?} is not registered")));
        }
        let now = Instant::now();
        self.ctl.observed(|o| o.record(report, now));
        self.ctl.check_surge(now);
        self.ctl.push_if_behind(&node, applied);
        Ok(Response::new(TelemetryAck { plan_epoch: self.ctl.raft.read(|s| s.plan_epoch()) }))
    }

    async fn register_task(
        &self,
        request: Request<RegisterTaskRequest>,
    ) -> Result<Response<RegisterTaskResponse>, Status> {
        let task = request.into_inner().task.ok_or_else(|| Status::invalid_argument("no task"))?;
        validate_task(&task).map_err(Status::invalid_argument)?;
        self.commit(Change::RegisterTask(task)).await?;
        Ok(Response::new(RegisterTaskResponse {}))
    }

    async fn set_slo(&self, request: Request<SetSloRequest>) -> Result<Response<SetSloResponse>, Status> {
        let req = request.into_inner();
        if req.slo_ms == 0 {
            return Err(Status::invalid_argument("the SLO must be positive"));
        }
        if !self.ctl.raft.read(|s| s.tasks.contains_key(&req.task)) {
            return Err(Status::not_found(format!("unknown task {:?}", req.task)));
        }
        self.commit(Change::SetSlo(req)).await?;
        Ok(Response::new(SetSloResponse {}))
    }

    async fn store_profile(
        &self,
        request: Request<StoreProfileRequest>,
    ) -> Result<Response<StoreProfileResponse>, Status> {
        let profile = request.into_inner().profile.ok_or_else(|| Status::invalid_argument("no profile"))?;
        let bad = profile.points.iter().any(|p| {
            p.cores == 0
                || p.batch == 0
                || !(p.throughput_rps.is_finite() && p.throughput_rps > 0.0)
                || !(p.latency_p99_ms.is_finite() && p.latency_p99_ms > 0.0)
        });
        if profile.points.is_empty() || bad {
            return Err(Status::invalid_argument(
                "a profile needs points with positive cores, batch, latency and throughput",
            ));
        }
        let known = self
            .ctl
            .raft
            .read(|s| s.tasks.get(&profile.task).is_some_and(|t| t.variants.iter().any(|v| v.name == profile.variant)));
        if !known {
            return Err(Status::not_found(format!("task {:?} has no variant {:?}", profile.task, profile.variant)));
        }
        self.commit(Change::StoreProfile(profile)).await?;
        Ok(Response::new(StoreProfileResponse {}))
    }

    async fn status(&self, _request: Request<ClusterStatusRequest>) -> Result<Response<ClusterStatus>, Status> {
        let raft = self.ctl.raft.status();
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
                        cores: info.cores,
                        applied_epoch: report.map_or(0, |(_, r)| r.applied_epoch),
                        seconds_since_report: report
                            .map_or(f64::INFINITY, |(t, _)| now.duration_since(*t).as_secs_f64()),
                        workers: report.map_or_else(Vec::new, |(_, r)| r.workers.clone()),
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
                        forecast_rps: o.forecasts.get(&t.name).copied().unwrap_or(0.0),
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
                    }
                })
                .collect();
            ClusterStatus {
                leader: if raft.is_leader {
                    self.ctl.cfg.advertise.clone()
                } else {
                    format!("replica {}", raft.leader)
                },
                term: raft.term,
                plan: state.plan.clone(),
                nodes,
                tasks,
            }
        });
        Ok(Response::new(status))
    }

    async fn history(&self, request: Request<PlanHistoryRequest>) -> Result<Response<PlanHistory>, Status> {
        let limit = request.into_inner().limit.max(1) as usize;
        let plans = self.ctl.raft.read(|s| s.history[s.history.len().saturating_sub(limit)..].to_vec());
        Ok(Response::new(PlanHistory { plans }))
    }
}
