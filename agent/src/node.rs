//! The node: the agent's state — its workers, routes, tasks and the plan it applied — and the
//! application of a new plan (validate, stage, execute; see `tidal_common::executor`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use thiserror::Error;
use tidal_auth::Security;
use tidal_common::executor::{execute, stage, Executor};
use tidal_common::plan::{validate_for_node, PlanError};
use tidal_common::reconcile::{desired_on, DesiredWorker, RunningWorker, WorkerKey, WorkerShape};
use tidal_proto::v1::inference_client::InferenceClient;
use tidal_proto::v1::{Plan, PlanDelta, TaskSpec, Transition, WorkerTelemetry};
use tracing::{info, warn};

use crate::cgroup::{CgroupError, CpuCgroups, CpuStats, WorkerCgroup};
use crate::metrics::AgentMetrics;
use crate::model_stats::ModelStats;
use crate::models::ModelDir;
use crate::router::{Remote, Router, StageKey};
use crate::telemetry::Telemetry;
use crate::worker::{BatchSettings, ProcessConfig, Worker, WorkerSpec};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub model_dir: PathBuf,
    /// CPU this node offers to workers, in millicores.
    pub millicores: u32,
    pub queue_capacity: usize,
    /// Largest inference request served; larger ones get RESOURCE_EXHAUSTED.
    pub max_request_bytes: usize,
    /// Most bytes of requests held at once (see [`crate::admission`]).
    pub max_inflight_bytes: usize,
    pub process: ProcessConfig,
    /// How long a stopped worker may take to serve what it has queued.
    pub drain: Duration,
}

/// How far ahead of what this agent knows (its applied plan, the controller's epoch at the
/// last registration or report) a plan's epoch may be: a plan beyond it would make every
/// later plan look stale. About two months of rounds every 5 s.
pub const MAX_EPOCH_STEP: u64 = 1 << 20;
/// The most a plan's Raft term may pass the highest term this agent knows of (from the plans
/// it applied and its controllers' answers): an election raises it by one, a partitioned
/// replica's failed elections by a few more, and a far higher term would make every later
/// plan of the real leader look deposed.
pub const MAX_TERM_STEP: u64 = 64;
/// Most revoked serials an agent holds (twice what the group keeps: a bound, not a policy).
pub const MAX_REVOKED: usize = 8192;

#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("plan {got:?} (epoch, term) is older than the applied plan {applied:?}: it comes from a deposed controller leader")]
    Stale { got: (u64, u64), applied: (u64, u64) },
    #[error("plan epoch {got} is more than {MAX_EPOCH_STEP} ahead of the epoch this agent knows ({known})")]
    TooFarAhead { got: u64, known: u64 },
    #[error("plan term {got} is more than {MAX_TERM_STEP} ahead of the term this agent knows ({known})")]
    TermTooFarAhead { got: u64, known: u64 },
    #[error("controller/{id} is not a replica of the group this agent follows (members {members:?})")]
    NotAMember { id: u64, members: Vec<u64> },
    #[error("malformed plan: {0}")]
    Invalid(#[from] PlanError),
    #[error("malformed plan delta: {0}")]
    InvalidDelta(String),
    #[error("the plan delta is from plan {base:?} (epoch, term); this agent applied {applied:?}: send the plan")]
    NotTheBase { base: (u64, u64), applied: (u64, u64) },
    #[error("creating a worker's cgroup (nothing of the plan was applied): {0}")]
    Cgroup(#[from] CgroupError),
}

/// A plan as the controller sends it: whole (cut for this node, or to be cut here), or as its
/// change from the plan (epoch, term) this node applied before.
pub enum Incoming {
    Plan(Plan),
    Delta { delta: PlanDelta, base: (u64, u64) },
}

/// A plan applied: its epoch, and the tasks held at what ran before (with why).
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub epoch: u64,
    pub held: Vec<String>,
}

pub struct Node {
    pub cfg: AgentConfig,
    pub cgroups: CpuCgroups,
    pub router: Router,
    pub telemetry: Telemetry,
    pub model_stats: ModelStats,
    pub metrics: AgentMetrics,
    /// The bytes of requests in flight (see [`crate::admission`]).
    pub inflight: crate::admission::InflightBytes,
    pub models: Arc<ModelDir>,
    /// How this agent dials the others (forwarded stages) and the controller.
    pub security: Security,
    /// The inference port's bearer token, when it takes one (forwarded stages carry it too).
    pub inference_token: Option<tidal_auth::Token>,
    workers: tokio::sync::Mutex<HashMap<WorkerKey, Arc<Worker>>>,
    /// Workers being retired: they serve with weight 0 until a successor is ready.
    retiring: Mutex<Vec<Arc<Worker>>>,
    tasks: RwLock<HashMap<String, TaskSpec>>,
    /// The plan applied (cut for this node), the base of the next delta; changed only while
    /// `workers` is locked.
    applied_plan: Mutex<Option<Plan>>,
    /// Clients of the other agents this one routes to, by (node, address).
    remotes: Mutex<HashMap<(String, String), Arc<Remote>>>,
    applied_epoch: AtomicU64,
    /// Raft term of the controller leader that committed the applied plan.
    applied_term: AtomicU64,
    /// The latest plan epoch the controller reported (registration, telemetry acks).
    controller_epoch: AtomicU64,
    /// The highest Raft term the controller reported.
    controller_term: AtomicU64,
    /// The replicas of the group the agent's controllers reported (empty before the first
    /// answer, or with no --controller): the only ones whose plans it applies.
    members: RwLock<Vec<u64>>,
    /// The certificates the group has revoked (every call's guard refuses them), and the
    /// version of the list held.
    pub revoked: Arc<tidal_auth::RevocationList>,
    revocations_version: AtomicU64,
    next_worker: AtomicU64,
    /// Last CPU reading per worker, to turn cumulative usage into a rate.
    cpu_seen: Mutex<HashMap<String, (Instant, CpuStats)>>,
}

impl Node {
    pub fn new(
        cfg: AgentConfig,
        cgroups: CpuCgroups,
        metrics: AgentMetrics,
        security: Security,
        inference_token: Option<tidal_auth::Token>,
    ) -> Arc<Self> {
        let inflight = crate::admission::InflightBytes::new(cfg.max_inflight_bytes, metrics.inflight_bytes.clone());
        Arc::new(Self {
            inflight,
            security,
            inference_token,
            models: ModelDir::new(cfg.model_dir.clone()),
            cfg,
            cgroups,
            router: Router::default(),
            telemetry: Telemetry::default(),
            model_stats: ModelStats::default(),
            metrics,
            workers: tokio::sync::Mutex::new(HashMap::new()),
            retiring: Mutex::new(Vec::new()),
            tasks: RwLock::new(HashMap::new()),
            applied_plan: Mutex::new(None),
            remotes: Mutex::new(HashMap::new()),
            applied_epoch: AtomicU64::new(0),
            applied_term: AtomicU64::new(0),
            controller_epoch: AtomicU64::new(0),
            controller_term: AtomicU64::new(0),
            members: RwLock::new(Vec::new()),
            revoked: Arc::default(),
            revocations_version: AtomicU64::new(0),
            next_worker: AtomicU64::new(1),
            cpu_seen: Mutex::new(HashMap::new()),
        })
    }

    pub fn applied_epoch(&self) -> u64 {
        self.applied_epoch.load(Ordering::Relaxed)
    }

    /// Records what a controller of the group answered: its plan epoch, Raft term and members.
    pub fn saw_group(&self, epoch: u64, term: u64, members: Vec<u64>) {
        self.controller_epoch.fetch_max(epoch, Ordering::Relaxed);
        self.controller_term.fetch_max(term, Ordering::Relaxed);
        if !members.is_empty() {
            let mut known = self.members.write().unwrap_or_else(|p| p.into_inner());
            if *known != members {
                info!(?members, "the controller group's members");
                *known = members;
            }
        }
    }

    /// Takes the group's revocation list when a controller sends one (it sends it only when
    /// the version this agent holds is not current).
    pub fn saw_revocations(&self, revocations: Option<tidal_proto::v1::Revocations>) {
        let Some(r) = revocations else { return };
        if r.serials.len() > MAX_REVOKED {
            warn!(serials = r.serials.len(), "a revocation list beyond {MAX_REVOKED} serials; ignored");
            return;
        }
        let count = r.serials.len();
        if self.revoked.replace(r.serials) {
            info!(target: "audit", version = r.version, revoked = count, "the group's revoked certificates");
        }
        self.revocations_version.store(r.version, Ordering::Relaxed);
    }

    pub fn revocations_version(&self) -> u64 {
        self.revocations_version.load(Ordering::Relaxed)
    }

    /// Whether controller `id` may push plans here: a member of the group this agent's
    /// controllers reported, or any controller while none has answered (an agent with no
    /// --controller takes plans from any controller certificate of the cluster).
    pub fn admit_pusher(&self, id: u64) -> Result<(), ApplyError> {
        let members = self.members.read().unwrap_or_else(|p| p.into_inner());
        if members.is_empty() || members.contains(&id) {
            Ok(())
        } else {
            Err(ApplyError::NotAMember { id, members: members.clone() })
        }
    }

    pub fn applied_term(&self) -> u64 {
        self.applied_term.load(Ordering::Relaxed)
    }

    pub fn task(&self, name: &str) -> Option<TaskSpec> {
        self.tasks.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// The tasks of the applied plan, by name.
    pub fn task_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tasks.read().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        names.sort();
        names
    }

    /// Whether a request of `task` can be served through this agent now: every stage has a
    /// ready worker here or a reachable agent elsewhere.
    pub fn task_ready(&self, task: &str) -> bool {
        self.task(task)
            .is_some_and(|t| t.stages.iter().all(|s| self.router.stage_ready(&StageKey::new(&t.name, &s.name))))
    }

    /// Applies `plan` to this node: all of it or, if it is malformed, stale or a new worker's
    /// cgroup cannot be made, none of it. A task whose model file is missing here is held at
    /// what runs for it and named in the result; the other tasks move. Plans are ordered by
    /// (epoch, term): one older than the applied plan comes from a deposed leader (or a
    /// delayed push) and is refused.
    pub async fn apply_plan(self: &Arc<Self>, incoming: Incoming) -> Result<Applied, ApplyError> {
        let mut workers = self.workers.lock().await;
        let mut plan = match incoming {
            Incoming::Plan(plan) => plan,
            Incoming::Delta { delta, base } => {
                let applied_plan = self.applied_plan.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let applied = applied_plan.as_ref().map_or((0, 0), |p| (p.epoch, p.term));
                if applied_plan.is_none() || applied != base {
                    return Err(ApplyError::NotTheBase { base, applied });
                }
                tidal_common::plan::delta::apply(applied_plan.as_ref(), &delta).map_err(ApplyError::InvalidDelta)?
            }
        };
        tidal_common::plan::normalise(&mut plan);
        // A whole plan (from a controller before plans were cut, or a test) is cut here: the
        // routes below are read from the cut form only.
        if plan.for_node.is_empty() {
            plan = tidal_common::plan::cut(&plan, &self.cfg.node);
        }
        validate_for_node(&plan, &self.cfg.node, self.cfg.millicores)?;
        let desired = desired_on(&plan, &self.cfg.node);
        // Only the models of workers to start are checked (a file read, off the runtime); a
        // plan that resizes or rebatches running workers touches no file.
        let to_load: Vec<tidal_proto::v1::VariantSpec> = desired
            .iter()
            .filter(|d| workers.get(&d.key).is_none_or(|w| w.spec.variant.model_file != d.variant.model_file))
            .map(|d| d.variant.clone())
            .collect();
        let models = if to_load.is_empty() { HashMap::new() } else { self.models.check_all(to_load).await };
        let applied = (self.applied_epoch(), self.applied_term());
        if (plan.epoch, plan.term) < applied {
            return Err(ApplyError::Stale { got: (plan.epoch, plan.term), applied });
        }
        let known = applied.0.max(self.controller_epoch.load(Ordering::Relaxed));
        if plan.epoch > known.saturating_add(MAX_EPOCH_STEP) {
            return Err(ApplyError::TooFarAhead { got: plan.epoch, known });
        }
        let known_term = applied.1.max(self.controller_term.load(Ordering::Relaxed));
        if plan.term > known_term.saturating_add(MAX_TERM_STEP) {
            return Err(ApplyError::TermTooFarAhead { got: plan.term, known: known_term });
        }
        if desired.is_empty() && !workers.is_empty() {
            warn!(
                epoch = plan.epoch,
                term = plan.term,
                workers = workers.len(),
                "this plan stops every worker of this node"
            );
        }
        let running: Vec<RunningWorker> = workers
            .iter()
            .map(|(key, w)| RunningWorker {
                key: key.clone(),
                model_file: w.spec.variant.model_file.clone(),
                shape: shape_of(w),
            })
            .collect();
        let transition = Transition::try_from(plan.transition).unwrap_or(Transition::InPlace);
        let staged = stage(&desired, &running, transition, |v| models.get(&v.name).cloned().unwrap_or(Ok(())));
        if !staged.actions.is_empty() {
            info!(epoch = plan.epoch, actions = staged.actions.len(), ?transition, "applying plan");
        }
        let held: Vec<String> = staged.held.iter().map(|(task, why)| format!("{task}: {why}")).collect();
        for why in &held {
            warn!(epoch = plan.epoch, "task held at what runs: {why}");
        }
        let mut exec = NodeExecutor { node: self, workers: &mut workers, epoch: plan.epoch };
        execute(&mut exec, staged.actions)?;
        *self.tasks.write().unwrap_or_else(|p| p.into_inner()) =
            plan.tasks.iter().map(|t| (t.name.clone(), t.clone())).collect();
        self.update_routes(&plan, &workers, &staged.held);
        self.applied_epoch.store(plan.epoch, Ordering::Relaxed);
        self.applied_term.store(plan.term, Ordering::Relaxed);
        self.metrics.plan_epoch.set(plan.epoch as i64);
        let epoch = plan.epoch;
        *self.applied_plan.lock().unwrap_or_else(|p| p.into_inner()) = Some(plan);
        Ok(Applied { epoch, held })
    }

    /// Keeps `w` serving with weight 0 until its `successors` serve (or the load timeout
    /// passes), then drains and stops it.
    fn retire(self: &Arc<Self>, w: Arc<Worker>, successors: Vec<Arc<Worker>>) {
        info!(worker = %w.spec.id, variant = %w.spec.variant.name, successors = successors.len(), "retiring worker");
        self.retiring.lock().unwrap_or_else(|p| p.into_inner()).push(w.clone());
        let node = self.clone();
        tokio::spawn(async move {
            node.wait_ready(&successors).await;
            node.retiring.lock().unwrap_or_else(|p| p.into_inner()).retain(|r| !Arc::ptr_eq(r, &w));
            node.refresh_routes(&StageKey::new(&w.spec.task, &w.spec.stage)).await;
            w.shutdown(node.cfg.drain).await;
            info!(worker = %w.spec.id, "worker stopped");
        });
    }

    /// Waits until every worker of `workers` serves, or the load timeout passes.
    async fn wait_ready(&self, workers: &[Arc<Worker>]) {
        let started = Instant::now();
        while started.elapsed() < self.cfg.process.load_timeout && !workers.iter().all(|w| w.is_ready()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Shrinks a worker once the task's new workers serve, unless a newer plan came meanwhile
    /// (it decides the worker's size itself).
    fn resize_after(self: &Arc<Self>, w: Arc<Worker>, millicores: u32, successors: Vec<Arc<Worker>>, epoch: u64) {
        let node = self.clone();
        tokio::spawn(async move {
            node.wait_ready(&successors).await;
            let _guard = node.workers.lock().await;
            if node.applied_epoch() == epoch {
                node.resize_now(&w, millicores);
            }
        });
    }

    fn resize_now(&self, w: &Worker, millicores: u32) {
        let from = w.millicores();
        match w.resize(millicores) {
            Ok(()) => {
                self.metrics.resizes.inc();
                info!(worker = %w.spec.id, from, to = millicores, "resized worker in place");
            }
            Err(e) => warn!(worker = %w.spec.id, error = %e, "resizing the worker failed; the next plan retries"),
        }
    }

    async fn refresh_routes(&self, stage: &StageKey) {
        let workers = self.workers.lock().await;
        let weights: HashMap<String, f64> = self.router.weights(stage).into_iter().collect();
        let routes = self.routes_for(stage, &workers, |w| weights.get(&w.spec.id).copied().unwrap_or(0.0));
        self.router.set_routes(stage, routes);
    }

    /// Routes each stage of each task by the plan's weights; a held task keeps the routes it
    /// had.
    fn update_routes(&self, plan: &Plan, workers: &HashMap<WorkerKey, Arc<Worker>>, held: &BTreeMap<String, String>) {
        let mut planned = Vec::new();
        for task in &plan.tasks {
            for stage in &task.stages {
                let key = StageKey::new(&task.name, &stage.name);
                planned.push(key.clone());
                if held.contains_key(&task.name) {
                    continue;
                }
                let weight_of = |w: &Worker| {
                    plan.assignments
                        .iter()
                        .find(|a| {
                            a.node == self.cfg.node
                                && a.task == task.name
                                && a.stage == stage.name
                                && a.replica == w.spec.replica
                                && a.variant.as_ref().is_some_and(|v| v.name == w.spec.variant.name)
                        })
                        .map_or(0.0, |a| a.weight)
                };
                let routes = self.routes_for(&key, workers, weight_of);
                self.router.set_routes(&key, routes);
                self.router.set_remote_routes(&key, self.remote_routes(plan, &key));
            }
        }
        self.router.retain(&planned);
    }

    /// The stage's shares on other agents (the cut plan's routes, one per node); nodes whose
    /// address the plan does not give are left out.
    fn remote_routes(&self, plan: &Plan, stage: &StageKey) -> Vec<(Arc<Remote>, f64)> {
        let (task, stage_name) = (stage.task.as_str(), stage.stage.as_str());
        let weights =
            plan.routes.iter().filter(|r| r.task == task && r.stage == stage_name).map(|r| (r.node.as_str(), r.weight));
        let mut remotes = self.remotes.lock().unwrap_or_else(|p| p.into_inner());
        let mut routes = Vec::new();
        for (node, weight) in weights {
            let Some(address) = plan.node_addresses.get(node) else {
                warn!(
                    node,
                    task,
                    stage = stage_name,
                    "the plan gives no address for a node serving this stage; not routed there"
                );
                continue;
            };
            let key = (node.to_string(), address.clone());
            let remote = match remotes.get(&key) {
                Some(r) => r.clone(),
                // Only to the agent the plan names there: a holder of any other certificate of
                // the cluster at that address gets nothing forwarded.
                None => match self.security.endpoint_of(
                    address,
                    tidal_auth::Role::Agent(node.to_string()),
                    Some(self.revoked.clone()),
                ) {
                    Ok(endpoint) => {
                        let channel = endpoint.connect_timeout(Duration::from_secs(1)).connect_lazy();
                        let client = InferenceClient::new(channel)
                            .max_decoding_message_size(4 * self.cfg.max_request_bytes.max(1 << 20))
                            .max_encoding_message_size(4 * self.cfg.max_request_bytes.max(1 << 20));
                        let r = Arc::new(Remote::new(node.to_string(), address.clone(), client));
                        remotes.insert(key, r.clone());
                        r
                    }
                    Err(e) => {
                        warn!(node, address, error = %e, "bad agent address in the plan");
                        continue;
                    }
                },
            };
            routes.push((remote, weight));
        }
        routes
    }

    /// A stage's local routes: its workers by `weight_of`, and the workers being retired with
    /// the weight they had, so that they keep serving their share until their successors
    /// serve (make before break; the simulator does the same).
    fn routes_for(
        &self,
        stage: &StageKey,
        workers: &HashMap<WorkerKey, Arc<Worker>>,
        weight_of: impl Fn(&Worker) -> f64,
    ) -> Vec<(Arc<Worker>, f64)> {
        let previous: HashMap<String, f64> = self.router.weights(stage).into_iter().collect();
        let serves = |w: &Worker| w.spec.task == stage.task && w.spec.stage == stage.stage;
        let mut routes: Vec<(Arc<Worker>, f64)> =
            workers.values().filter(|w| serves(w)).map(|w| (w.clone(), weight_of(w))).collect();
        let retiring = self.retiring.lock().unwrap_or_else(|p| p.into_inner());
        routes.extend(
            retiring
                .iter()
                .filter(|w| serves(w))
                .map(|w| (w.clone(), previous.get(&w.spec.id).copied().unwrap_or(0.0))),
        );
        routes
    }

    /// One line per worker for telemetry and status: sizes, queue, CPU use and throttling.
    /// How many workers run here, and whether every one of them serves.
    pub async fn workers_serving(&self) -> (usize, bool) {
        let workers = self.workers.lock().await;
        (workers.len(), workers.values().all(|w| w.is_ready()))
    }

    pub async fn worker_telemetry(&self) -> Vec<WorkerTelemetry> {
        let workers = self.workers.lock().await;
        let now = Instant::now();
        let mut seen = self.cpu_seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for w in workers.values() {
            let stats = w.cgroup.stats().unwrap_or_else(|e| {
                warn!(worker = %w.spec.id, error = %e, "cannot read cgroup stats");
                CpuStats::default()
            });
            let usage = match seen.insert(w.spec.id.clone(), (now, stats)) {
                Some((t, prev)) if now > t => {
                    stats.usage_us.saturating_sub(prev.usage_us) as f64
                        / now.duration_since(t).as_micros().max(1) as f64
                }
                _ => 0.0,
            };
            out.push(WorkerTelemetry {
                id: w.spec.id.clone(),
                task: w.spec.task.clone(),
                stage: w.spec.stage.clone(),
                variant: w.spec.variant.name.clone(),
                millicores: w.millicores(),
                max_batch: w.settings().max_batch,
                queue_len: w.queue.len() as u32,
                cpu_usage_cores: usage,
                nr_throttled: stats.nr_throttled,
                throttled_us: stats.throttled_us,
                restarts: w.restarts(),
                ready: w.is_ready(),
                load_ms: w.load_ms(),
                cgroup: w.cgroup.cpu_dir().map(|d| d.display().to_string()).unwrap_or_default(),
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        self.metrics.set_workers(&out);
        out
    }

    /// The first replica of (task, variant), for tests and the profiler's reports.
    pub async fn worker(&self, task: &str, variant: &str) -> Option<Arc<Worker>> {
        let workers = self.workers.lock().await;
        workers.iter().find(|(k, _)| k.task == task && k.variant == variant && k.replica == 0).map(|(_, w)| w.clone())
    }

    /// Stops every worker (draining briefly) and removes the cgroups.
    pub async fn shutdown(&self) {
        let workers: Vec<Arc<Worker>> = self.workers.lock().await.drain().map(|(_, w)| w).collect();
        let retiring: Vec<Arc<Worker>> = self.retiring.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        let all = workers.into_iter().chain(retiring);
        futures::future::join_all(all.map(|w| async move { w.shutdown(Duration::from_secs(2)).await })).await;
        let cgroups = self.cgroups.clone();
        let swept = tokio::task::spawn_blocking(move || cgroups.sweep()).await.unwrap_or(0);
        if swept > 0 {
            info!(swept, "removed cgroups left by interrupted operations");
        }
        self.cgroups.remove();
    }
}

fn shape_of(w: &Worker) -> WorkerShape {
    let settings = w.settings();
    WorkerShape {
        millicores: w.millicores(),
        max_batch: settings.max_batch,
        max_delay_ms: settings.max_delay.as_millis().min(u32::MAX as u128) as u32,
    }
}

/// The node's executor of a plan: processes in cgroups, make before break.
struct NodeExecutor<'a> {
    node: &'a Arc<Node>,
    workers: &'a mut HashMap<WorkerKey, Arc<Worker>>,
    epoch: u64,
}

impl NodeExecutor<'_> {
    /// The workers running under `keys` (what a shrink or a retirement waits for).
    fn workers_of(&self, keys: &[WorkerKey]) -> Vec<Arc<Worker>> {
        keys.iter().filter_map(|k| self.workers.get(k).cloned()).collect()
    }
}

impl Executor for NodeExecutor<'_> {
    type Prepared = (String, WorkerCgroup);
    type Error = ApplyError;

    fn prepare(&mut self, _: &DesiredWorker) -> Result<Self::Prepared, ApplyError> {
        let id = format!("worker-{}", self.node.next_worker.fetch_add(1, Ordering::Relaxed));
        let cgroup = self.node.cgroups.create(&id)?;
        Ok((id, cgroup))
    }

    fn abandon(&mut self, (_, cgroup): Self::Prepared) {
        cgroup.remove();
    }

    fn start(&mut self, d: DesiredWorker, (id, cgroup): Self::Prepared) {
        let spec = WorkerSpec {
            id: id.clone(),
            task: d.key.task.clone(),
            stage: d.key.stage.clone(),
            replica: d.key.replica,
            model_path: self.node.cfg.model_dir.join(&d.variant.model_file),
            variant: d.variant.clone(),
        };
        info!(worker = %id, key = %d.key, millicores = d.shape.millicores, "starting worker");
        let settings = BatchSettings {
            max_batch: d.shape.max_batch,
            max_delay: Duration::from_millis(d.shape.max_delay_ms as u64),
        };
        let cfg = &self.node.cfg;
        let w = Worker::start(spec, cgroup, d.shape.millicores, settings, cfg.queue_capacity, cfg.process.clone());
        if let Some(old) = self.workers.insert(d.key, w.clone()) {
            self.node.retire(old, vec![w]);
        }
    }

    fn rebatch(&mut self, key: &WorkerKey, max_batch: u32, max_delay_ms: u32) {
        if let Some(w) = self.workers.get(key) {
            w.set_batching(BatchSettings { max_batch, max_delay: Duration::from_millis(max_delay_ms as u64) });
        }
    }

    fn resize(&mut self, key: &WorkerKey, millicores: u32, after: &[WorkerKey]) {
        let Some(w) = self.workers.get(key).cloned() else { return };
        if after.is_empty() {
            self.node.resize_now(&w, millicores);
        } else {
            self.node.resize_after(w, millicores, self.workers_of(after), self.epoch);
        }
    }

    fn stop(&mut self, key: &WorkerKey, after: &[WorkerKey]) {
        let successors = self.workers_of(after);
        if let Some(w) = self.workers.remove(key) {
            self.node.retire(w, successors);
        }
    }

    fn millicores(&self, key: &WorkerKey) -> Option<u32> {
        self.workers.get(key).map(|w| w.millicores())
    }

    fn starting(&self, task: &str) -> Vec<WorkerKey> {
        self.workers.iter().filter(|(k, w)| k.task == task && !w.is_ready()).map(|(k, _)| k.clone()).collect()
    }
}
