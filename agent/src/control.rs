//! The agent's control service on the control port: plans only from a controller (of the
//! group this agent follows), profiling from a controller or an admin, status for readers too.

use std::sync::Arc;
use std::time::Instant;

use tidal_auth::guard::{is_admin, is_controller, may_read};
use tidal_auth::{Guard, Role};
use tidal_proto::v1::agent_server::Agent;
use tidal_proto::v1::{
    AgentStatus, AgentStatusRequest, ApplyPlanRequest, ApplyPlanResponse, ProfileRequest, ProfileResponse,
};
use tonic::{Request, Response, Status};
use tracing::{info, info_span, warn, Instrument};

use crate::node::Node;
use crate::profiler;
use crate::reconciler::{ApplyError, Incoming};

#[derive(Clone)]
pub struct ControlService {
    pub node: Arc<Node>,
    pub guard: Guard,
}

impl From<ApplyError> for Status {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Stale { .. } | ApplyError::NotTheBase { .. } => Status::failed_precondition(e.to_string()),
            ApplyError::Invalid(_)
            | ApplyError::InvalidDelta(_)
            | ApplyError::TooFarAhead { .. }
            | ApplyError::TermTooFarAhead { .. }
            | ApplyError::Signature { .. } => Status::invalid_argument(e.to_string()),
            ApplyError::NotAMember { .. } => Status::permission_denied(e.to_string()),
            ApplyError::Cgroup(_) => Status::internal(e.to_string()),
            ApplyError::Stopping => Status::unavailable(e.to_string()),
        }
    }
}

#[tonic::async_trait]
impl Agent for ControlService {
    async fn apply_plan(&self, request: Request<ApplyPlanRequest>) -> Result<Response<ApplyPlanResponse>, Status> {
        let arrived = Instant::now();
        let pusher = match self.guard.require(&request, "ApplyPlan", is_controller)? {
            Some(Role::Controller(id)) => Some(id),
            _ => None,
        };
        if let Some(id) = pusher {
            if let Err(e) = self.node.admit_pusher(id) {
                warn!(from = %format!("controller/{id}"), error = %e, "refused a plan");
                return Err(e.into());
            }
        }
        let request = request.into_inner();
        let incoming = match (request.plan, request.delta) {
            (Some(plan), None) => Incoming::Plan(plan),
            (None, Some(delta)) => Incoming::Delta { delta, base: (request.base_epoch, request.base_term) },
            _ => return Err(Status::invalid_argument("malformed plan: the request needs a plan or a delta, not both")),
        };
        let epoch = match &incoming {
            Incoming::Plan(p) => p.epoch,
            Incoming::Delta { delta, .. } => delta.epoch,
        };
        let from = pusher.map_or_else(|| "a controller (plaintext)".to_string(), |id| format!("controller/{id}"));
        match self.node.apply_plan(incoming).instrument(info_span!("apply_plan", epoch, %from)).await {
            Ok(applied) => {
                let apply_us = arrived.elapsed().as_micros() as u64;
                self.node.metrics.plan_apply.observe(apply_us as f64 / 1e6);
                info!(target: "audit", %from, epoch = applied.epoch, held = applied.held.len(), "plan applied");
                Ok(Response::new(ApplyPlanResponse { applied_epoch: applied.epoch, held: applied.held, apply_us }))
            }
            Err(e) => {
                warn!(epoch, %from, error = %e, "refused a plan");
                Err(e.into())
            }
        }
    }

    async fn profile(&self, request: Request<ProfileRequest>) -> Result<Response<ProfileResponse>, Status> {
        self.guard.require(&request, "Profile", |r| is_controller(r) || is_admin(r))?;
        let req = request.into_inner();
        let points = profiler::profile(&self.node, &req).instrument(info_span!("profile")).await?;
        Ok(Response::new(ProfileResponse { points, node: self.node.cfg.node.clone() }))
    }

    async fn status(&self, request: Request<AgentStatusRequest>) -> Result<Response<AgentStatus>, Status> {
        self.guard.require(&request, "Status", may_read)?;
        Ok(Response::new(AgentStatus {
            node: self.node.cfg.node.clone(),
            applied_epoch: self.node.applied_epoch(),
            applied_term: self.node.applied_term(),
            workers: self.node.worker_telemetry(),
            cgroup_driver: self.node.cgroups.driver_name().to_string(),
        }))
    }
}
