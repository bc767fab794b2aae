//! The request path, one for every protocol front (Tidal's API, V2 over gRPC, V2 over REST):
//! a request's stages in order, each on a worker here or on another agent as the router picks,
//! within the request's one deadline; the outcome counted once, where the client sent it.
//! The fronts translate their protocol to an [`InferRequest`] and back; nothing else.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use tidal_common::task::{fan_out, stage_input};
use tidal_common::tensor::{f32_tensor, sample_values, tensor_values};
use tidal_proto::v1::{InferRequest, InferResponse, StageServed, StageSpec};
use tidal_proto::{FORWARDED_METADATA, STAGE_METADATA};
use tokio::sync::oneshot;
use tonic::Request;
use tracing::{info_span, warn, Instrument};

use crate::connector::crops;
use crate::error::ServeError;
use crate::metrics::{RequestLabels, TaskLabels};
use crate::node::Node;
use crate::router::{Remote, StageKey, Target};
use crate::telemetry::Outcome;
use crate::worker::Worker;

/// The request path of a node.
#[derive(Clone)]
pub struct Pipeline {
    node: Arc<Node>,
}

/// A request another agent forwarded: serve one stage of it here.
pub struct Forwarded {
    /// The stage to run; empty: the task's first.
    pub stage: String,
}

/// One stage's output for one request.
struct StageOutput {
    values: Vec<f32>,
    shape: Vec<i64>,
    served: StageServed,
}

impl Pipeline {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// The node it serves on.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Serves one admitted request and counts how it ended: the one path behind every front.
    pub async fn infer(
        &self,
        req: InferRequest,
        arrived: Instant,
        forwarded: Option<Forwarded>,
        count_arrival: bool,
    ) -> Result<InferResponse, ServeError> {
        let span = info_span!("infer", task = %req.task);
        let task = req.task.clone();
        let is_forwarded = forwarded.is_some();
        let result = self.serve(req, arrived, forwarded, count_arrival).instrument(span).await;
        let (outcome, label) = match &result {
            Ok(_) => (Outcome::Served(arrived.elapsed()), "ok"),
            Err(ServeError::DeadlineExceeded(_) | ServeError::BudgetTooShort { .. }) => {
                (Outcome::DeadlineMissed, "deadline_exceeded")
            }
            Err(ServeError::UnknownTask(_)) => return result,
            Err(ServeError::InvalidInput(_) | ServeError::TooLarge { .. }) => (Outcome::Failed, "invalid"),
            Err(ServeError::QueueFull(_)) => (Outcome::Failed, "queue_full"),
            Err(ServeError::WouldMiss { .. }) => (Outcome::DeadlineMissed, "shed"),
            Err(_) => (Outcome::Failed, "failed"),
        };
        self.node.model_stats.record(&task, arrived, result.as_ref().ok());
        if !is_forwarded {
            // The agent the client called counts the request, once, end to end.
            self.node.telemetry.outcome(&task, outcome);
        }
        // A request counts once cluster-wide: where the client sent it. The agent it was
        // forwarded to counts it apart.
        let labels = RequestLabels { task: task.clone(), outcome: label };
        if is_forwarded {
            self.node.metrics.forwarded_requests.get_or_create(&labels).inc();
        } else {
            self.node.metrics.requests.get_or_create(&labels).inc();
            if let Outcome::Served(latency) = outcome {
                self.node.metrics.latency.get_or_create(&TaskLabels { task }).observe(latency.as_secs_f64());
            }
        }
        result
    }

    /// Serves a request: every stage of its task in order, each here or on another agent as
    /// the plan's weights pick, within the request's one deadline. A request another agent
    /// forwarded runs only the stage it names, here. A request is counted as an arrival of
    /// its task (the demand the controller plans for) where `count_arrival` says: where a
    /// client sent it first, not where it was forwarded or retried after being counted.
    async fn serve(
        &self,
        req: InferRequest,
        arrived: Instant,
        forwarded: Option<Forwarded>,
        count_arrival: bool,
    ) -> Result<InferResponse, ServeError> {
        let size = req.encoded_len();
        if size > self.node.cfg.max_request_bytes {
            return Err(ServeError::TooLarge { size, limit: self.node.cfg.max_request_bytes });
        }
        // Held until this request is answered, forwarded stages included.
        let _admitted = self.node.inflight.admit(size)?;
        let task = self.node.task(&req.task).ok_or_else(|| ServeError::UnknownTask(req.task.clone()))?;
        let budget_ms = if req.budget_ms > 0 { req.budget_ms } else { task.slo_ms };
        let deadline = arrived + Duration::from_millis(budget_ms as u64);
        let stages: Vec<&StageSpec> = match &forwarded {
            Some(f) if !f.stage.is_empty() => {
                let stage = task.stages.iter().find(|s| s.name == f.stage);
                vec![stage.ok_or_else(|| {
                    ServeError::InvalidInput(format!("task {} has no stage {:?}", task.name, f.stage))
                })?]
            }
            Some(_) => task.stages.first().into_iter().collect(),
            None => {
                if count_arrival {
                    self.node.telemetry.arrival(&task.name, arrived, (req.budget_ms > 0).then_some(req.budget_ms));
                }
                task.stages.iter().collect()
            }
        };
        let first = stages.first().ok_or_else(|| ServeError::NoWorker(task.name.clone()))?;
        let image = sample_values(req.input.as_ref(), stage_input(first))
            .map_err(|e| ServeError::InvalidInput(e.to_string()))?;
        // The request's image is kept only when a later stage crops it.
        let crops_later = stages.iter().skip(1).any(|s| fan_out(s) > 1);
        let (mut inputs, image) = if crops_later { (vec![image.clone()], image) } else { (vec![image], Vec::new()) };
        let mut served = Vec::new();
        let mut outputs: Vec<StageOutput> = Vec::new();
        for (i, stage) in stages.iter().enumerate() {
            if i > 0 {
                if Instant::now() >= deadline {
                    return Err(ServeError::DeadlineExceeded(arrived.elapsed()));
                }
                inputs = connect(stages[i - 1], stage, std::mem::take(&mut outputs), &image, stage_input(first))?;
            }
            let key = StageKey::new(&task.name, &stage.name);
            let local_only = forwarded.is_some();
            let runs = std::mem::take(&mut inputs)
                .into_iter()
                .map(|input| self.run_stage(&key, stage, input, deadline, arrived, local_only));
            outputs = futures::future::try_join_all(runs).await?;
            served.extend(outputs.iter().map(|o| o.served.clone()));
        }
        let last = outputs.last().ok_or_else(|| ServeError::NoWorker(task.name.clone()))?.served.clone();
        let (shape, values) = stack(outputs);
        Ok(InferResponse {
            node: last.node.clone(),
            output: Some(f32_tensor(shape, &values)),
            variant: last.variant.clone(),
            accuracy: last.accuracy,
            batch_size: last.batch_size,
            queue_us: last.queue_us,
            total_us: arrived.elapsed().as_micros() as u64,
            stages: served,
        })
    }

    /// Runs one stage of a request where the router sends it: on a local worker, or on
    /// another agent (falling back to a local worker if that agent fails). `local_only`: the
    /// request was forwarded here, and is not forwarded again.
    async fn run_stage(
        &self,
        key: &StageKey,
        stage: &StageSpec,
        input: Vec<f32>,
        deadline: Instant,
        arrived: Instant,
        local_only: bool,
    ) -> Result<StageOutput, ServeError> {
        let router = &self.node.router;
        let target = if local_only { router.pick_local(key).map(Target::Local) } else { router.pick(key) };
        let worker = match target.ok_or_else(|| ServeError::NoWorker(format!("{}/{}", key.task, key.stage)))? {
            Target::Local(w) => w,
            Target::Remote(remote) => match self.forward(&remote, key, stage, &input, deadline, arrived).await {
                Ok(out) => return Ok(out),
                Err(e) => {
                    // The other agent is down or overloaded: serve here if this node can.
                    warn!(node = %remote.node, stage = %key.stage, error = %e, "forwarding failed; serving locally");
                    router.pick_local(key).ok_or(e)?
                }
            },
        };
        self.run_local(key, &worker, input, deadline, arrived).await
    }

    /// Queues a stage of a request on a local worker and waits for its answer.
    async fn run_local(
        &self,
        key: &StageKey,
        worker: &Worker,
        input: Vec<f32>,
        deadline: Instant,
        arrived: Instant,
    ) -> Result<StageOutput, ServeError> {
        let telemetry = &self.node.telemetry;
        let started = Instant::now();
        telemetry.stage_arrival(&key.task, &key.stage, started);
        let (tx, rx) = oneshot::channel();
        let result = match worker.queue.push(deadline, input, tx) {
            Err((e, _)) => Err(e),
            Ok(()) => match tokio::time::timeout_at(deadline.into(), rx).await {
                Err(_) => Err(ServeError::DeadlineExceeded(arrived.elapsed())),
                Ok(Err(_)) => Err(ServeError::Unavailable("the worker dropped the request".into())),
                Ok(Ok(r)) => r,
            },
        };
        let served = match result {
            Ok(s) => s,
            Err(e) => {
                telemetry.stage_outcome(&key.task, &key.stage, None);
                return Err(e);
            }
        };
        let took = started.elapsed();
        telemetry.stage_outcome(&key.task, &key.stage, Some((Duration::from_micros(served.queue_us), took)));
        Ok(StageOutput {
            served: StageServed {
                stage: key.stage.clone(),
                variant: worker.spec.variant.name.clone(),
                accuracy: worker.spec.variant.accuracy,
                node: self.node.cfg.node.clone(),
                batch_size: served.batch_size,
                queue_us: served.queue_us,
                total_us: took.as_micros() as u64,
                run_us: served.run_us,
            },
            values: served.output,
            shape: served.output_shape,
        })
    }

    /// Sends one stage of a request to another agent's workers, within what is left of its
    /// budget.
    async fn forward(
        &self,
        remote: &Remote,
        key: &StageKey,
        stage: &StageSpec,
        input: &[f32],
        deadline: Instant,
        arrived: Instant,
    ) -> Result<StageOutput, ServeError> {
        let started = Instant::now();
        let left = deadline.saturating_duration_since(started);
        if left.is_zero() {
            return Err(ServeError::DeadlineExceeded(arrived.elapsed()));
        }
        let shape: Vec<i64> = std::iter::once(1).chain(stage_input(stage).iter().copied()).collect();
        let req = InferRequest {
            task: key.task.clone(),
            input: Some(f32_tensor(shape, input)),
            budget_ms: (left.as_millis() as u32).max(1),
        };
        let mut request = Request::new(req);
        request.set_timeout(left);
        // With a certificate the agent shows it, which the peer admits in place of the token;
        // the token travels only where there is nothing else to show (plaintext).
        if let Some(token) = self.node.inference_token.as_ref().filter(|_| self.node.security.role().is_none()) {
            token.attach(request.metadata_mut());
        }
        request.metadata_mut().insert(FORWARDED_METADATA, tonic::metadata::MetadataValue::from_static("1"));
        if let Ok(name) = tonic::metadata::MetadataValue::try_from(key.stage.as_str()) {
            request.metadata_mut().insert(STAGE_METADATA, name);
        }
        let mut client = remote.client.clone();
        let response = match tokio::time::timeout(left, client.infer(request)).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
                return Err(ServeError::DeadlineExceeded(arrived.elapsed()));
            }
            Ok(Err(status)) => {
                remote.mark_down(REMOTE_PAUSE);
                return Err(ServeError::Unavailable(format!(
                    "agent {} ({}): {}",
                    remote.node,
                    remote.address,
                    status.message()
                )));
            }
            Err(_) => return Err(ServeError::DeadlineExceeded(arrived.elapsed())),
        };
        let output = response.output.unwrap_or_default();
        let values = tensor_values(&output)
            .map_err(|e| ServeError::Unavailable(format!("agent {} answered a malformed output: {e}", remote.node)))?;
        let mut served = response.stages.into_iter().next().unwrap_or_else(|| StageServed {
            stage: key.stage.clone(),
            variant: response.variant,
            accuracy: response.accuracy,
            node: response.node,
            batch_size: response.batch_size,
            queue_us: response.queue_us,
            total_us: 0,
            run_us: 0,
        });
        served.total_us = started.elapsed().as_micros() as u64;
        Ok(StageOutput { values, shape: output.shape, served })
    }
}

/// The inputs of `stage` from the outputs of the stage before it (`prev`): each output as is,
/// or the crops of the request's `image` around each output's most confident detections.
fn connect(
    prev: &StageSpec,
    stage: &StageSpec,
    outputs: Vec<StageOutput>,
    image: &[f32],
    image_shape: &[i64],
) -> Result<Vec<Vec<f32>>, ServeError> {
    let want = stage_input(stage);
    let mismatch = |got: String| {
        ServeError::Model(format!("stage {} gives {got} per input; stage {} takes {want:?}", prev.name, stage.name))
    };
    if fan_out(stage) == 1 {
        return outputs
            .into_iter()
            .map(|o| {
                let fits = o.values.len() as i64 == want.iter().product::<i64>();
                if fits {
                    Ok(o.values)
                } else {
                    Err(mismatch(format!("{} values", o.values.len())))
                }
            })
            .collect();
    }
    let dims = |s: &[i64]| -> Option<[usize; 3]> {
        match s {
            [c, h, w] => Some([usize::try_from(*c).ok()?, usize::try_from(*h).ok()?, usize::try_from(*w).ok()?]),
            _ => None,
        }
    };
    let (Some(from), Some(to)) = (dims(image_shape), dims(want)) else {
        return Err(mismatch("crops of an image".into()));
    };
    let mut inputs = Vec::new();
    for o in &outputs {
        let row = o.shape.last().and_then(|&r| usize::try_from(r).ok()).unwrap_or(0);
        let k = fan_out(stage) as usize;
        inputs.extend(
            crops(&o.values, row, k, image, from, to).map_err(|e| mismatch(format!("no detections to crop ({e})")))?,
        );
    }
    Ok(inputs)
}

/// The last stage's outputs as one tensor: one output as it came; several (crops) stacked
/// along the first dimension.
fn stack(outputs: Vec<StageOutput>) -> (Vec<i64>, Vec<f32>) {
    if outputs.len() == 1 {
        let o = outputs.into_iter().next().expect("one output");
        return (o.shape, o.values);
    }
    let mut shape = outputs.first().map(|o| o.shape.clone()).unwrap_or_default();
    if let Some(n) = shape.first_mut() {
        *n = outputs.len() as i64;
    }
    (shape, outputs.into_iter().flat_map(|o| o.values).collect())
}

/// How long an agent that failed a forwarded request is left out of the rotation.
const REMOTE_PAUSE: Duration = Duration::from_secs(1);
