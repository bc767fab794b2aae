//! The agent's gRPC services: `Inference` (the request path) and `Agent` (plans, profiling,
//! status), mapped onto the node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use tidal_common::tensor::{f32_tensor, sample_values};
use tidal_proto::v1::agent_server::Agent;
use tidal_proto::v1::inference_server::Inference;
use tidal_proto::v1::{
    AgentStatus, AgentStatusRequest, ApplyPlanRequest, ApplyPlanResponse, InferRequest, InferResponse, ProfileRequest,
    ProfileResponse,
};
use tidal_proto::FORWARDED_METADATA;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};
use tracing::{info_span, warn, Instrument};

use crate::error::ServeError;
use crate::metrics::{RequestLabels, TaskLabels};
use crate::node::{ApplyError, Node};
use crate::profiler;
use crate::router::{Remote, Target};
use crate::telemetry::Outcome;

#[derive(Clone)]
pub struct AgentService {
    pub node: Arc<Node>,
}

impl AgentService {
    /// Serves a request here or on another agent. `forwarded`: it came from another agent's
    /// router, which already counted it; serve it here, whatever the weights say.
    async fn serve(&self, req: InferRequest, arrived: Instant, forwarded: bool) -> Result<InferResponse, ServeError> {
        let size = req.encoded_len();
        if size > self.node.cfg.max_request_bytes {
            return Err(ServeError::TooLarge { size, limit: self.node.cfg.max_request_bytes });
        }
        let task = self.node.task(&req.task).ok_or_else(|| ServeError::UnknownTask(req.task.clone()))?;
        if !forwarded {
            self.node.telemetry.arrival(&task.name, arrived, (req.budget_ms > 0).then_some(req.budget_ms));
        }
        let shape = task.variants.first().map(|v| v.input_shape.clone()).unwrap_or_default();
        let input = sample_values(req.input.as_ref(), &shape).map_err(|e| ServeError::InvalidInput(e.to_string()))?;
        let budget_ms = if req.budget_ms > 0 { req.budget_ms } else { task.slo_ms };
        let deadline = arrived + Duration::from_millis(budget_ms as u64);
        let router = &self.node.router;
        let target = if forwarded { router.pick_local(&task.name).map(Target::Local) } else { router.pick(&task.name) };
        let worker = match target.ok_or_else(|| ServeError::NoWorker(task.name.clone()))? {
            Target::Local(w) => w,
            Target::Remote(remote) => match self.forward(&remote, req, deadline, arrived).await {
                Ok(response) => return Ok(response),
                Err(e) => {
                    // The other agent is down or overloaded: serve here if this node can.
                    warn!(node = %remote.node, error = %e, "forwarding failed; serving locally");
                    router.pick_local(&task.name).ok_or(e)?
                }
            },
        };
        let (tx, rx) = oneshot::channel();
        worker.queue.push(deadline, input, tx).map_err(|(e, _)| e)?;
        let served = match tokio::time::timeout_at(deadline.into(), rx).await {
            Err(_) => return Err(ServeError::DeadlineExceeded(arrived.elapsed())),
            Ok(Err(_)) => return Err(ServeError::Unavailable("the worker dropped the request".into())),
            Ok(Ok(r)) => r?,
        };
        Ok(InferResponse {
            node: self.node.cfg.node.clone(),
            output: Some(f32_tensor(served.output_shape, &served.output)),
            variant: worker.spec.variant.name.clone(),
            accuracy: worker.spec.variant.accuracy,
            batch_size: served.batch_size,
            queue_us: served.queue_us,
            total_us: arrived.elapsed().as_micros() as u64,
        })
    }
}

impl AgentService {
    /// Sends a request to another agent's workers, within what is left of its budget.
    async fn forward(
        &self,
        remote: &Remote,
        mut req: InferRequest,
        deadline: Instant,
        arrived: Instant,
    ) -> Result<InferResponse, ServeError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ServeError::DeadlineExceeded(arrived.elapsed()));
        }
        req.budget_ms = (left.as_millis() as u32).max(1);
        let mut request = Request::new(req);
        request.set_timeout(left);
        request.metadata_mut().insert(FORWARDED_METADATA, tonic::metadata::MetadataValue::from_static("1"));
        let mut client = remote.client.clone();
        match tokio::time::timeout(left, client.infer(request)).await {
            Ok(Ok(response)) => {
                let mut response = response.into_inner();
                response.total_us = arrived.elapsed().as_micros() as u64;
                Ok(response)
            }
            Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
                Err(ServeError::DeadlineExceeded(arrived.elapsed()))
            }
            Ok(Err(status)) => {
                remote.mark_down(REMOTE_PAUSE);
                Err(ServeError::Unavailable(format!(
                    "agent {} ({}): {}",
                    remote.node,
                    remote.address,
                    status.message()
                )))
            }
            Err(_) => Err(ServeError::DeadlineExceeded(arrived.elapsed())),
        }
    }
}

/// How long an agent that failed a forwarded request is left out of the rotation.
const REMOTE_PAUSE: Duration = Duration::from_secs(1);

#[tonic::async_trait]
impl Inference for AgentService {
    async fn infer(&self, request: Request<InferRequest>) -> Result<Response<InferResponse>, Status> {
        let arrived = Instant::now();
        let (metadata, _, req) = request.into_parts();
        let span = info_span!("infer", task = %req.task);
        let task = req.task.clone();
        let forwarded = request_forwarded(&metadata);
        let result = self.serve(req, arrived, forwarded).instrument(span).await;
        let (outcome, label) = match &result {
            Ok(_) => (Outcome::Served(arrived.elapsed()), "ok"),
            Err(ServeError::DeadlineExceeded(_)) => (Outcome::DeadlineMissed, "deadline_exceeded"),
            Err(ServeError::UnknownTask(_)) => return result.map(Response::new).map_err(Status::from),
            Err(ServeError::InvalidInput(_) | ServeError::TooLarge { .. }) => (Outcome::Failed, "invalid"),
            Err(ServeError::QueueFull(_)) => (Outcome::Failed, "queue_full"),
            Err(ServeError::WouldMiss { .. }) => (Outcome::DeadlineMissed, "shed"),
            Err(_) => (Outcome::Failed, "failed"),
        };
        if !forwarded {
            // The agent the client called counts the request, once, end to end.
            self.node.telemetry.outcome(&task, outcome);
        }
        self.node.metrics.requests.get_or_create(&RequestLabels { task: task.clone(), outcome: label }).inc();
        if let Outcome::Served(latency) = outcome {
            self.node.metrics.latency.get_or_create(&TaskLabels { task }).observe(latency.as_secs_f64());
        }
        result.map(Response::new).map_err(Status::from)
    }
}

impl From<ApplyError> for Status {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Stale { .. } => Status::failed_precondition(e.to_string()),
            ApplyError::Invalid(_) => Status::invalid_argument(e.to_string()),
            ApplyError::Cgroup(_) => Status::internal(e.to_string()),
        }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn apply_plan(&self, request: Request<ApplyPlanRequest>) -> Result<Response<ApplyPlanResponse>, Status> {
        let plan = request
            .into_inner()
            .plan
            .ok_or_else(|| Status::invalid_argument("malformed plan: the request has no plan"))?;
        let epoch = plan.epoch;
        match self.node.apply_plan(plan).instrument(info_span!("apply_plan", epoch)).await {
            Ok(applied) => Ok(Response::new(ApplyPlanResponse { applied_epoch: applied.epoch, held: applied.held })),
            Err(e) => {
                warn!(epoch, error = %e, "refused a plan");
                Err(e.into())
            }
        }
    }

    async fn profile(&self, request: Request<ProfileRequest>) -> Result<Response<ProfileResponse>, Status> {
        let req = request.into_inner();
        let points = profiler::profile(&self.node, &req).instrument(info_span!("profile")).await?;
        Ok(Response::new(ProfileResponse { points, node: self.node.cfg.node.clone() }))
    }

    async fn status(&self, _request: Request<AgentStatusRequest>) -> Result<Response<AgentStatus>, Status> {
        Ok(Response::new(AgentStatus {
            node: self.node.cfg.node.clone(),
            applied_epoch: self.node.applied_epoch(),
            applied_term: self.node.applied_term(),
            workers: self.node.worker_telemetry().await,
            cgroup_driver: self.node.cgroups.driver_name().to_string(),
        }))
    }
}

fn request_forwarded(metadata: &tonic::metadata::MetadataMap) -> bool {
    metadata.get(FORWARDED_METADATA).is_some()
}
