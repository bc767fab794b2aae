//! The request path, one for every protocol front (Tidal's API, V2 over gRPC, V2 over REST):
//! a request's stages in order, each on a worker here or on another agent as the router picks,
//! within the request's one deadline; the outcome counted once, where the client sent it.
//! The fronts translate their protocol to an [`InferRequest`] and back; nothing else.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use tidal_common::task::fan_out;
use tidal_common::tensor::{NamedTensor, StageIo, TensorError};
use tidal_common::text::{wire_io, TextError};
use tidal_proto::v1::{InferRequest, InferResponse, StageServed, StageSpec, TaskSpec};
use tidal_proto::{FORWARDED_METADATA, STAGE_METADATA};
use tokio::sync::oneshot;
use tonic::Request;
use tracing::{info, info_span, warn, Instrument};

use crate::connector::crops;
use crate::error::ServeError;
use crate::metrics::{RequestLabels, RerouteLabels, StageLabels, TaskLabels};
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

/// One stage's outputs for one request.
struct StageOutput {
    outputs: Vec<NamedTensor>,
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
        let mut req = req;
        // Another agent forwards a request to the version it chose (a canary by its name).
        let drawn = match forwarded {
            None => self.choose_version(&mut req)?,
            Some(_) => None,
        };
        let span = info_span!("infer", task = %req.task);
        let task = req.task.clone();
        let is_forwarded = forwarded.is_some();
        let retry = drawn.is_some().then(|| req.clone());
        let result = self.serve(req, arrived, forwarded, count_arrival).instrument(span.clone()).await;
        self.count(task, arrived, is_forwarded, result.as_ref());
        match (result, retry, drawn) {
            // A canary that failed where the version served would not have (its model, its
            // workers): counted against the canary, and the request served by the version
            // served, so that a broken canary loses no request.
            (Err(e), Some(mut again), Some(served)) if e.is_the_server_s() => {
                warn!(task = %served, canary = %again.task, error = %e, "the canary failed a request; the version served answers it");
                again.task = served.clone();
                let result = self.serve(again, arrived, None, false).instrument(span).await;
                self.count(served, arrived, false, result.as_ref());
                result
            }
            (result, _, _) => result,
        }
    }

    /// Points `req` at the version of its task that serves it: the one it names (the version
    /// served, or the canary's), or, naming none during a rollout, the canary for its share
    /// of such requests. Returns the task's own name when the canary was drawn by its share
    /// (a request it fails goes to the version served).
    fn choose_version(&self, req: &mut InferRequest) -> Result<Option<String>, ServeError> {
        let Some(task) = self.node.task(&req.task) else { return Ok(None) };
        // A canary the agent does not hold (a plan cut before it), or whose workers are not
        // ready yet, takes no share here: the version served answers until it is.
        let canary = task.canary.as_ref().filter(|c| self.node.task(&c.task).is_some());
        let ready = canary.filter(|c| self.node.task_ready(&c.task));
        let served = task.version.max(1).to_string();
        match req.version.trim() {
            "" | "0" => match ready {
                Some(c) if rand::random::<f64>() * 100.0 < c.percent as f64 => {
                    req.task = c.task.clone();
                    Ok(Some(task.name))
                }
                _ => Ok(None),
            },
            v if v == served => Ok(None),
            v => match canary.filter(|c| c.version.to_string() == v) {
                Some(c) => {
                    req.task = c.task.clone();
                    Ok(None)
                }
                None => Err(ServeError::UnknownTask(format!("{} version {v} (version {served} is served)", task.name))),
            },
        }
    }

    /// Counts a client's request to `task` that a front refused before it reached the request
    /// path (a V2 body that does not decode into requests), as [`Self::infer`] counts one it
    /// refuses, so that bad clients show in the metrics and statistics. Requests to tasks
    /// this agent does not know are not counted: their names are the caller's to choose.
    pub fn count_refused(&self, task: &str, arrived: Instant, error: &ServeError) {
        if self.node.task(task).is_some() {
            self.count(task.to_string(), arrived, false, Err(error));
            // As in `count`: a version the task does not have is not the task's request.
            if !matches!(error, ServeError::UnknownTask(_)) {
                self.node.model_stats.record_request(task, arrived, false);
            }
        }
    }

    fn count(&self, task: String, arrived: Instant, is_forwarded: bool, result: Result<&InferResponse, &ServeError>) {
        let (outcome, label) = match result {
            Ok(_) => (Outcome::Served(arrived.elapsed()), "ok"),
            Err(ServeError::DeadlineExceeded { .. } | ServeError::BudgetTooShort { .. }) => {
                (Outcome::DeadlineMissed, "deadline_exceeded")
            }
            Err(ServeError::UnknownTask(_)) => return,
            Err(ServeError::InvalidInput(_) | ServeError::TooLarge { .. }) => (Outcome::Failed, "invalid"),
            Err(ServeError::QueueFull(_)) => (Outcome::Failed, "queue_full"),
            Err(ServeError::WouldMiss { .. }) => (Outcome::DeadlineMissed, "shed"),
            Err(_) => (Outcome::Failed, "failed"),
        };
        if let Ok(served) = result {
            self.node.model_stats.record_inference(&task, served);
        }
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
        let last = stages.last().unwrap_or(first);
        // What each stage takes and gives on the wire (text, where a stage tokenizes).
        let io_of =
            |stage: &StageSpec| wire_io(stage).map_err(|why| ServeError::Model(format!("stage {}: {why}", stage.name)));
        let invalid = |e: TensorError| ServeError::InvalidInput(e.to_string());
        // The unnamed `input` of a model of one input is answered with the unnamed `output`.
        let unnamed = req.inputs.is_empty();
        if !unnamed && req.input.is_some() {
            return Err(ServeError::InvalidInput("a request gives `input` or `inputs`, not both".into()));
        }
        let tensors: Vec<NamedTensor> = req
            .input
            .into_iter()
            .chain(req.inputs)
            .map(NamedTensor::from_proto)
            .collect::<Result<_, _>>()
            .map_err(invalid)?;
        let first_io = io_of(first)?;
        // Inputs of later stages that no stage feeds come with the request (whole tasks only).
        let extra: Vec<String> = if forwarded.is_none() {
            let task_io = tidal_common::text::task_io(&task.stages)
                .map_err(|why| ServeError::Model(format!("task {}: {why}", task.name)))?;
            task_io.inputs[first_io.inputs.len()..].iter().map(|d| d.name.clone()).collect()
        } else {
            Vec::new()
        };
        let (extra_given, tensors): (Vec<NamedTensor>, Vec<NamedTensor>) =
            tensors.into_iter().partition(|t| extra.contains(&t.name));
        if let Some(missing) = extra.iter().find(|n| !extra_given.iter().any(|t| &t.name == *n)) {
            return Err(ServeError::InvalidInput(format!(
                "the request lacks input {missing:?}, which a later stage of task {} takes",
                task.name
            )));
        }
        let sample = first_io.sample(tensors).map_err(invalid)?;
        io_of(last)?.check_outputs(&req.outputs).map_err(invalid)?;
        // The request's image is kept only when a later stage crops it, and its inputs only
        // when a later stage takes one of them (a question asked of the text a stage wrote).
        let crops_later = stages.iter().skip(1).any(|s| fan_out(s) > 1);
        let image = if crops_later { sample.first().cloned() } else { None };
        let later_inputs: Vec<StageIo> = stages.iter().skip(1).map(|s| io_of(s)).collect::<Result<_, _>>()?;
        let taken_later = |t: &NamedTensor| later_inputs.iter().any(|io| io.inputs.iter().any(|d| d.name == t.name));
        let request_inputs: Vec<NamedTensor> =
            sample.iter().filter(|t| taken_later(t)).cloned().chain(extra_given).collect();
        // Checked, a request for a task unloaded while idle waits for a worker, then has its
        // whole budget.
        let waited = match &forwarded {
            None => self.wait_for_worker(&task).await?,
            Some(_) => Duration::ZERO,
        };
        let deadline = arrived + waited + Duration::from_millis(budget_ms as u64);
        let mut inputs = vec![sample];
        let mut served = Vec::new();
        let mut outputs: Vec<StageOutput> = Vec::new();
        for (i, stage) in stages.iter().enumerate() {
            // Per input of the stage: whether it skips the stage (by its label).
            let mut skipped = Vec::new();
            if i > 0 {
                if Instant::now() >= deadline {
                    return Err(late(arrived, format!("before stage {:?} began", stage.name)));
                }
                let io = &later_inputs[i - 1];
                let given = std::mem::take(&mut outputs);
                skipped = given.iter().map(|o| skips(stages[i - 1], stage, o)).collect::<Result<_, _>>()?;
                inputs = connect(stages[i - 1], stage, io, given, image.as_ref(), &request_inputs)?;
            }
            let key = StageKey::new(&task.name, &stage.name);
            let local_only = forwarded.is_some();
            let runs = std::mem::take(&mut inputs).into_iter().enumerate().map(|(j, input)| {
                // A stage that crops is never skipped, so its inputs outnumbering the labels
                // means none skips.
                let skip = skipped.get(j).copied().unwrap_or(false);
                let key = &key;
                async move {
                    if skip {
                        self.node
                            .metrics
                            .stage_skips
                            .get_or_create(&StageLabels { task: key.task.clone(), stage: key.stage.clone() })
                            .inc();
                        pass(stage, input)
                    } else {
                        self.run_stage(key, input, deadline, arrived, local_only).await
                    }
                }
            });
            outputs = futures::future::try_join_all(runs).await?;
            served.extend(outputs.iter().map(|o| o.served.clone()));
        }
        let last = outputs.last().ok_or_else(|| ServeError::NoWorker(task.name.clone()))?.served.clone();
        let mut answer = stack(outputs);
        if !req.outputs.is_empty() {
            answer.retain(|o| req.outputs.contains(&o.name));
        }
        let (output, outputs) = if unnamed {
            (answer.into_iter().next().map(NamedTensor::into_proto), Vec::new())
        } else {
            (None, answer.into_iter().map(NamedTensor::into_proto).collect())
        };
        Ok(InferResponse {
            node: last.node.clone(),
            output,
            outputs,
            variant: last.variant.clone(),
            accuracy: last.accuracy,
            batch_size: last.batch_size,
            queue_us: last.queue_us,
            total_us: arrived.elapsed().as_micros() as u64,
            stages: served,
            version: task.version.max(1),
        })
    }

    /// Waits while `task` has no worker for some stage (the plan gives it none: it was
    /// unloaded while idle), at most the node's cold-start wait, counted in the reports so
    /// that the controller plans it at once; returns how long it waited. A worker here must be
    /// ready (not loading) so that the wait, not the request's budget, pays for the load.
    async fn wait_for_worker(&self, task: &TaskSpec) -> Result<Duration, ServeError> {
        let router = &self.node.router;
        let keys: Vec<StageKey> = task.stages.iter().map(|s| StageKey::new(&task.name, &s.name)).collect();
        // Only a task that may go without a worker waits: another without one (short of cores
        // or memory) is refused at once. It waits while its worker loads too, so that the
        // load is paid by the wait and not by its budget.
        if tidal_common::task::unloads_after_s(task).is_none() || keys.iter().all(|k| router.stage_ready(k)) {
            return Ok(Duration::ZERO);
        }
        let started = Instant::now();
        let wait = self.node.cfg.cold_start_wait;
        let waiting =
            self.node.telemetry.wait(&task.name).ok_or(ServeError::WaitingFull(crate::telemetry::MAX_WAITING))?;
        if waiting.first {
            info!(task = %task.name, "the task has no ready worker (unloaded while idle): requests wait while one loads");
        }
        // The router is updated before each view is published (a plan applied, a worker
        // ready); another agent paused after a failure comes back without one, hence the tick.
        let mut views = self.node.subscribe();
        let ready = tokio::time::timeout(wait, async {
            while !keys.iter().all(|k| router.stage_ready(k)) {
                tokio::select! {
                    changed = views.changed() => changed.map_err(|_| ())?,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
            Ok::<(), ()>(())
        })
        .await
        .is_ok_and(|r| r.is_ok());
        match ready {
            true => {
                let waited = started.elapsed();
                self.node
                    .metrics
                    .cold_start
                    .get_or_create(&TaskLabels { task: task.name.clone() })
                    .observe(waited.as_secs_f64());
                Ok(waited)
            }
            false => Err(ServeError::Unavailable(format!(
                "task {} has no worker (unloaded while idle) and got none ready within the {} s a request waits \
                 for one (--cold-start-wait-s)",
                task.name,
                wait.as_secs()
            ))),
        }
    }

    /// Runs one stage of a request where the router sends it: on a local worker, or on
    /// another agent (falling back to a local worker if that agent fails). `local_only`: the
    /// request was forwarded here, and is not forwarded again.
    async fn run_stage(
        &self,
        key: &StageKey,
        input: Vec<NamedTensor>,
        deadline: Instant,
        arrived: Instant,
        local_only: bool,
    ) -> Result<StageOutput, ServeError> {
        let router = &self.node.router;
        let target = if local_only { router.pick_local(key).map(Target::Local) } else { router.pick(key) };
        let worker = match target.ok_or_else(|| ServeError::NoWorker(format!("{}/{}", key.task, key.stage)))? {
            Target::Local(w) => w,
            Target::Remote(remote) => match self.forward(&remote, key, &input, deadline, arrived).await {
                Ok(out) => return Ok(out),
                // The request's own fault (bad text the other agent tokenized) is the client's
                // answer, wherever it was found: nothing to retry, nobody to blame.
                Err(e @ ServeError::InvalidInput(_)) => return Err(e),
                Err(e) => {
                    // The other agent is down or overloaded: serve here if this node can.
                    warn!(node = %remote.node, stage = %key.stage, error = %e, "forwarding failed; serving locally");
                    router.pick_local(key).ok_or(e)?
                }
            },
        };
        let worker = self.bend_by_slack(key, worker, deadline);
        self.run_local(key, &worker, input, deadline, arrived).await
    }

    /// The worker a request picked by the plan's weights goes to: the pick, unless the plan
    /// routes by slack and the pick would refuse it; then the most accurate other ready
    /// worker of the stage here that would finish it in time (`tidal_common::slack`, the
    /// simulator's rule too). When none would, the pick refuses it with its reason.
    fn bend_by_slack(&self, key: &StageKey, picked: Arc<Worker>, deadline: Instant) -> Arc<Worker> {
        let router = &self.node.router;
        if !router.by_slack() {
            return picked;
        }
        let first = picked.queue.offer(deadline, picked.spec.variant.accuracy);
        if first.admits {
            return picked;
        }
        let others = router.other_ready_local(key, &picked);
        if others.is_empty() {
            return picked;
        }
        let mut offers = vec![first];
        offers.extend(others.iter().map(|w| w.queue.offer(deadline, w.spec.variant.accuracy)));
        match tidal_common::slack::choose(0, &offers) {
            Some(i) if i > 0 => {
                let chosen = others[i - 1].clone();
                let labels = RerouteLabels {
                    task: key.task.clone(),
                    stage: key.stage.clone(),
                    from: picked.spec.variant.name.clone(),
                    to: chosen.spec.variant.name.clone(),
                };
                self.node.metrics.slack_reroutes.get_or_create(&labels).inc();
                chosen
            }
            _ => picked,
        }
    }

    /// Queues a stage of a request on a local worker and waits for its answer.
    async fn run_local(
        &self,
        key: &StageKey,
        worker: &Worker,
        input: Vec<NamedTensor>,
        deadline: Instant,
        arrived: Instant,
    ) -> Result<StageOutput, ServeError> {
        let telemetry = &self.node.telemetry;
        let started = Instant::now();
        // Text becomes the model's tokens by this variant's tokenizer, and is checked as the
        // model takes it.
        let batched = worker.spec.io.batched;
        let (input, encoded) = match &worker.spec.text {
            None => (input, None),
            Some(text) => {
                // Tokenizing is CPU work, bounded by the text's size: off the runtime's threads.
                let text = text.clone();
                let encoding = tokio::task::spawn_blocking(move || text.encode(batched, input));
                let (tensors, encoded) =
                    encoding.await.map_err(|e| ServeError::Model(format!("tokenizing: {e}")))?.map_err(text_error)?;
                let tensors = worker.spec.io.sample(tensors).map_err(|e| ServeError::InvalidInput(e.to_string()))?;
                (tensors, encoded)
            }
        };
        let size = input.first().and_then(|t| tidal_common::tensor::element_count(&t.shape)).unwrap_or(0) as u64;
        telemetry.stage_arrival(&key.task, &key.stage, started, size);
        let (tx, rx) = oneshot::channel();
        let result = match worker.submit(deadline, input, tx) {
            Err((e, _)) => Err(e),
            Ok(()) => match tokio::time::timeout_at(deadline.into(), rx).await {
                Err(_) => Err(late(arrived, "before the worker answered".into())),
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
        let mut served = served;
        if let Some(text) = &worker.spec.text {
            if let Err(e) = text.decode(batched, encoded.as_ref(), &mut served.outputs) {
                telemetry.stage_outcome(&key.task, &key.stage, None);
                return Err(text_error(e));
            }
        }
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
                skipped: false,
            },
            outputs: served.outputs,
        })
    }

    /// Sends one stage of a request to another agent's workers, within what is left of its
    /// budget.
    async fn forward(
        &self,
        remote: &Remote,
        key: &StageKey,
        input: &[NamedTensor],
        deadline: Instant,
        arrived: Instant,
    ) -> Result<StageOutput, ServeError> {
        let started = Instant::now();
        let left = deadline.saturating_duration_since(started);
        if left.is_zero() {
            return Err(late(arrived, format!("before it was sent to agent {}", remote.node)));
        }
        let req = InferRequest {
            task: key.task.clone(),
            inputs: input.iter().cloned().map(NamedTensor::into_proto).collect(),
            budget_ms: (left.as_millis() as u32).max(1),
            ..Default::default()
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
        let mut response = match tokio::time::timeout(left, client.infer(request)).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
                return Err(late(arrived, format!("at agent {}: {}", remote.node, status.message())));
            }
            Ok(Err(status)) if status.code() == tonic::Code::InvalidArgument => {
                return Err(ServeError::InvalidInput(status.message().to_string()));
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
            Err(_) => return Err(late(arrived, format!("waiting for agent {}", remote.node))),
        };
        let outputs = std::mem::take(&mut response.outputs)
            .into_iter()
            .map(NamedTensor::from_proto)
            .collect::<Result<Vec<_>, _>>()
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
            skipped: false,
        });
        served.total_us = started.elapsed().as_micros() as u64;
        Ok(StageOutput { outputs, served })
    }
}

/// A request whose time ran out `waiting` (where it was), `arrived` then.
fn late(arrived: Instant, waiting: String) -> ServeError {
    ServeError::DeadlineExceeded { after: arrived.elapsed(), waiting }
}

/// A text stage's error: the request's (INVALID_ARGUMENT) or the model's.
fn text_error(e: TextError) -> ServeError {
    match e {
        TextError::Input(why) => ServeError::InvalidInput(why),
        TextError::Model(why) => ServeError::Model(why),
        TextError::Unfinished(why) => ServeError::Unfinished(why),
    }
}

/// The inputs of `stage` from the outputs of the stage before it (`prev`), one request's
/// worth each: the outputs by name (the output the stage's `connect` names for an input, else
/// the output of the input's name, else the request's own input of that name, else, for a
/// stage of one input, the first output), or the crops of the request's `image` around each
/// output's most confident detections. Each checked as the stage takes it.
fn connect(
    prev: &StageSpec,
    stage: &StageSpec,
    io: &StageIo,
    outputs: Vec<StageOutput>,
    image: Option<&NamedTensor>,
    request: &[NamedTensor],
) -> Result<Vec<Vec<NamedTensor>>, ServeError> {
    let mismatch =
        |why: String| ServeError::Model(format!("stage {} cannot feed stage {}: {why}", prev.name, stage.name));
    if fan_out(stage) == 1 {
        return outputs
            .into_iter()
            .map(|o| {
                let given = o.outputs;
                let mut tensors = Vec::with_capacity(io.inputs.len());
                for input in &io.inputs {
                    let named = stage.connect.iter().find(|c| c.input == input.name).map(|c| c.output.as_str());
                    let from = named.unwrap_or(&input.name);
                    let at = match given.iter().position(|t| t.name == from) {
                        Some(at) => at,
                        // An input of the request's (a question asked of a transcript); not
                        // the positional `input` every stage of a task without signatures has.
                        None if named.is_none() && !io.positional && request.iter().any(|t| t.name == input.name) => {
                            tensors.extend(request.iter().find(|t| t.name == input.name).cloned());
                            continue;
                        }
                        // A stage of one input takes the one output it is given.
                        None if named.is_none() && io.inputs.len() == 1 && !given.is_empty() => 0,
                        None => {
                            let names: Vec<&str> = given.iter().map(|t| t.name.as_str()).collect();
                            return Err(mismatch(format!(
                                "no output {from:?} for input {:?} (it gives {names:?})",
                                input.name
                            )));
                        }
                    };
                    let mut t = given[at].clone();
                    t.name = input.name.clone();
                    tensors.push(t);
                }
                io.sample(tensors).map_err(|e| mismatch(e.to_string()))
            })
            .collect();
    }
    let dims = |s: &[i64]| -> Option<[usize; 3]> {
        match s {
            [c, h, w] => Some([usize::try_from(*c).ok()?, usize::try_from(*h).ok()?, usize::try_from(*w).ok()?]),
            _ => None,
        }
    };
    let input = io.inputs.first().ok_or_else(|| mismatch("it takes no input".into()))?;
    let to = dims(io.sample_shape(input)).ok_or_else(|| mismatch(format!("crops cannot make {input:?}")))?;
    let image = image.ok_or_else(|| mismatch("the request has no image to crop".into()))?;
    let (Some(from), Some(pixels)) = (dims(&image.shape), image.f32_values()) else {
        return Err(mismatch(format!("the request's input {:?} is not an FP32 [c, h, w] image", image.name)));
    };
    let shape: Vec<i64> = to.iter().map(|&d| d as i64).collect();
    let mut inputs = Vec::new();
    for o in &outputs {
        let detections = o.outputs.first().and_then(NamedTensor::f32_values).unwrap_or_default();
        let row = o.outputs.first().and_then(|t| t.shape.last()).and_then(|&r| usize::try_from(r).ok()).unwrap_or(0);
        let k = fan_out(stage) as usize;
        let cut = crops(&detections, row, k, &pixels, from, to)
            .map_err(|e| mismatch(format!("no detections to crop ({e})")))?;
        for values in cut {
            let crop = NamedTensor::f32(input.name.clone(), shape.clone(), &values);
            inputs.push(io.sample(vec![crop]).map_err(|e| mismatch(e.to_string()))?);
        }
    }
    Ok(inputs)
}

/// Whether a request skips `stage` (see `StageSpec.skip`): the label the stage before it
/// (`prev`) gave it, `given`, is one that skips it.
fn skips(prev: &StageSpec, stage: &StageSpec, given: &StageOutput) -> Result<bool, ServeError> {
    let Some(skip) = &stage.skip else { return Ok(false) };
    let label = given.outputs.iter().find(|t| t.name == skip.when).and_then(NamedTensor::string_values);
    match label {
        Some(values) if !values.is_empty() => Ok(values.iter().all(|v| skip.labels.iter().any(|l| l.as_bytes() == *v))),
        _ => Err(ServeError::Model(format!(
            "stage {} gave no label {:?} to tell whether stage {} runs",
            prev.name, skip.when, stage.name
        ))),
    }
}

/// What a skipped stage gives a request: its inputs as the outputs `skip.pass` names, served
/// by no variant.
fn pass(stage: &StageSpec, input: Vec<NamedTensor>) -> Result<StageOutput, ServeError> {
    let passes = stage.skip.as_ref().map_or(&[][..], |s| s.pass.as_slice());
    let outputs = passes
        .iter()
        .map(|c| match input.iter().find(|t| t.name == c.input) {
            Some(t) => Ok(NamedTensor { name: c.output.clone(), ..t.clone() }),
            None => Err(ServeError::Model(format!(
                "stage {} is skipped but has no input {:?} to pass",
                stage.name, c.input
            ))),
        })
        .collect::<Result<_, _>>()?;
    let served = StageServed { stage: stage.name.clone(), skipped: true, ..Default::default() };
    Ok(StageOutput { outputs, served })
}

/// The last stage's outputs as one request's: one output each as it came; several (crops)
/// stacked along the first dimension.
fn stack(outputs: Vec<StageOutput>) -> Vec<NamedTensor> {
    let n = outputs.len();
    let mut all = outputs.into_iter().map(|o| o.outputs);
    let Some(mut stacked) = all.next() else { return Vec::new() };
    if n == 1 {
        return stacked;
    }
    for t in &mut stacked {
        if let Some(d) = t.shape.first_mut() {
            *d = n as i64;
        }
    }
    for more in all {
        for (t, m) in stacked.iter_mut().zip(more) {
            t.data.extend_from_slice(&m.data);
        }
    }
    stacked
}

/// How long an agent that failed a forwarded request is left out of the rotation.
const REMOTE_PAUSE: Duration = Duration::from_secs(1);
