//! The node: the agent's state — its workers, routes, tasks and the plan it applied — and the
//! application of a new plan (validate, diff, act).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use thiserror::Error;
use tidal_common::plan::{validate_for_node, PlanError};
use tidal_proto::v1::inference_client::InferenceClient;
use tidal_proto::v1::{Plan, TaskSpec, WorkerTelemetry};
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::cgroup::{CgroupError, CpuCgroups, CpuStats};
use crate::metrics::AgentMetrics;
use crate::reconcile::{diff, Action, DesiredWorker, RunningWorker, WorkerKey};
use crate::router::{Remote, Router};
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
    pub process: ProcessConfig,
    /// How long a stopped worker may take to serve what it has queued.
    pub drain: Duration,
}

#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("plan {got:?} (epoch, term) is older than the applied plan {applied:?}: it comes from a deposed controller leader")]
    Stale { got: (u64, u64), applied: (u64, u64) },
    #[error("malformed plan: {0}")]
    Invalid(#[from] PlanError),
    #[error("malformed plan: model file {file:?} of variant {variant:?} is not in {dir}")]
    MissingModel { variant: String, file: String, dir: String },
    #[error("creating a worker's cgroup: {0}")]
    Cgroup(#[from] CgroupError),
}

pub struct Node {
    pub cfg: AgentConfig,
    pub cgroups: CpuCgroups,
    pub router: Router,
    pub telemetry: Telemetry,
    pub metrics: AgentMetrics,
    workers: tokio::sync::Mutex<HashMap<WorkerKey, Arc<Worker>>>,
    /// Workers being retired: they serve with weight 0 until a successor is ready.
    retiring: Mutex<Vec<Arc<Worker>>>,
    tasks: RwLock<HashMap<String, TaskSpec>>,
    /// Clients of the other agents this one routes to, by (node, address).
    remotes: Mutex<HashMap<(String, String), Arc<Remote>>>,
    applied_epoch: AtomicU64,
    /// Raft term of the controller leader that committed the applied plan.
    applied_term: AtomicU64,
    next_worker: AtomicU64,
    /// Last CPU reading per worker, to turn cumulative usage into a rate.
    cpu_seen: Mutex<HashMap<String, (Instant, CpuStats)>>,
}

impl Node {
    pub fn new(cfg: AgentConfig, cgroups: CpuCgroups, metrics: AgentMetrics) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            cgroups,
            router: Router::default(),
            telemetry: Telemetry::default(),
            metrics,
            workers: tokio::sync::Mutex::new(HashMap::new()),
            retiring: Mutex::new(Vec::new()),
            tasks: RwLock::new(HashMap::new()),
            remotes: Mutex::new(HashMap::new()),
            applied_epoch: AtomicU64::new(0),
            applied_term: AtomicU64::new(0),
            next_worker: AtomicU64::new(1),
            cpu_seen: Mutex::new(HashMap::new()),
        })
    }

    pub fn applied_epoch(&self) -> u64 {
        self.applied_epoch.load(Ordering::Relaxed)
    }

    pub fn applied_term(&self) -> u64 {
        self.applied_term.load(Ordering::Relaxed)
    }

    pub fn task(&self, name: &str) -> Option<TaskSpec> {
        self.tasks.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// Applies `plan` to this node: all of it or, if it is malformed or stale, none of it.
    /// Plans are ordered by (epoch, term): one older than the applied plan comes from a
    /// deposed leader (or a delayed push) and is refused.
    pub async fn apply_plan(self: &Arc<Self>, plan: Plan) -> Result<u64, ApplyError> {
        let mut workers = self.workers.lock().await;
        let applied = (self.applied_epoch(), self.applied_term());
        if (plan.epoch, plan.term) < applied {
            return Err(ApplyError::Stale { got: (plan.epoch, plan.term), applied });
        }
        validate_for_node(&plan, &self.cfg.node, self.cfg.millicores)?;
        let desired = self.desired_workers(&plan)?;
        let running: Vec<RunningWorker> = workers
            .iter()
            .map(|(key, w)| RunningWorker {
                key: key.clone(),
                model_file: w.spec.variant.model_file.clone(),
                millicores: w.millicores(),
                settings: w.settings(),
            })
            .collect();
        let actions = diff(&desired, &running);
        if !actions.is_empty() {
            info!(epoch = plan.epoch, actions = actions.len(), "applying plan");
        }
        for action in actions {
            self.act(&mut workers, action)?;
        }
        *self.tasks.write().unwrap_or_else(|p| p.into_inner()) =
            plan.tasks.iter().map(|t| (t.name.clone(), t.clone())).collect();
        self.update_routes(&plan, &workers);
        self.applied_epoch.store(plan.epoch, Ordering::Relaxed);
        self.applied_term.store(plan.term, Ordering::Relaxed);
        self.metrics.plan_epoch.set(plan.epoch as i64);
        Ok(plan.epoch)
    }

    fn desired_workers(&self, plan: &Plan) -> Result<Vec<DesiredWorker>, ApplyError> {
        let mut out = Vec::new();
        for a in plan.assignments.iter().filter(|a| a.node == self.cfg.node) {
            let variant = a.variant.clone().unwrap_or_default();
            if !self.cfg.model_dir.join(&variant.model_file).is_file() {
                return Err(ApplyError::MissingModel {
                    variant: variant.name,
                    file: variant.model_file,
                    dir: self.cfg.model_dir.display().to_string(),
                });
            }
            out.push(DesiredWorker {
                task: a.task.clone(),
                variant,
                millicores: a.millicores,
                settings: BatchSettings {
                    max_batch: a.max_batch,
                    max_delay: Duration::from_millis(a.max_delay_ms as u64),
                },
            });
        }
        Ok(out)
    }

    fn act(self: &Arc<Self>, workers: &mut HashMap<WorkerKey, Arc<Worker>>, action: Action) -> Result<(), ApplyError> {
        match action {
            Action::Stop(key) => {
                if let Some(w) = workers.remove(&key) {
                    info!(worker = %w.spec.id, variant = %w.spec.variant.name, "retiring worker");
                    self.retire(w);
                }
            }
            Action::Resize { key, millicores } => {
                if let Some(w) = workers.get(&key) {
                    let from = w.millicores();
                    w.resize(millicores)?;
                    self.metrics.resizes.inc();
                    info!(worker = %w.spec.id, from, to = millicores, "resized worker in place");
                }
            }
            Action::Rebatch { key, settings } => {
                if let Some(w) = workers.get(&key) {
                    w.set_batching(settings);
                }
            }
            Action::Start(d) => {
                let id = format!("worker-{}", self.next_worker.fetch_add(1, Ordering::Relaxed));
                let cgroup = self.cgroups.create(&id)?;
                let spec = WorkerSpec {
                    id: id.clone(),
                    task: d.task.clone(),
                    model_path: self.cfg.model_dir.join(&d.variant.model_file),
                    variant: d.variant.clone(),
                };
                info!(worker = %id, variant = %d.variant.name, millicores = d.millicores, "starting worker");
                let w = Worker::start(
                    spec,
                    cgroup,
                    d.millicores,
                    d.settings,
                    self.cfg.queue_capacity,
                    self.cfg.process.clone(),
                );
                workers.insert(d.key(), w);
            }
        }
        Ok(())
    }

    /// Keeps `w` serving with weight 0 until a worker of its task with a weight is ready (or
    /// the load timeout passes), then drains and stops it.
    fn retire(self: &Arc<Self>, w: Arc<Worker>) {
        self.retiring.lock().unwrap_or_else(|p| p.into_inner()).push(w.clone());
        let node = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            while started.elapsed() < node.cfg.process.load_timeout && !node.successor_ready(&w).await {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            node.retiring.lock().unwrap_or_else(|p| p.into_inner()).retain(|r| !Arc::ptr_eq(r, &w));
            node.refresh_routes(&w.spec.task).await;
            w.shutdown(node.cfg.drain).await;
            info!(worker = %w.spec.id, "worker stopped");
        });
    }

    async fn successor_ready(&self, retiring: &Worker) -> bool {
        let workers = self.workers.lock().await;
        let ready = workers.values().any(|w| w.spec.task == retiring.spec.task && w.is_ready());
        let task_gone = !workers.values().any(|w| w.spec.task == retiring.spec.task);
        ready || task_gone
    }

    async fn refresh_routes(&self, task: &str) {
        let workers = self.workers.lock().await;
        let weights: HashMap<String, f64> = self.router.weights(task).into_iter().collect();
        let routes = self.routes_for(task, &workers, |w| weights.get(&w.spec.id).copied().unwrap_or(0.0));
        self.router.set_routes(task, routes);
    }

    fn update_routes(&self, plan: &Plan, workers: &HashMap<WorkerKey, Arc<Worker>>) {
        for task in &plan.tasks {
            let weight_of = |w: &Worker| {
                plan.assignments
                    .iter()
                    .find(|a| {
                        a.node == self.cfg.node
                            && a.task == task.name
                            && a.variant.as_ref().is_some_and(|v| v.name == w.spec.variant.name)
                    })
                    .map_or(0.0, |a| a.weight)
            };
            let routes = self.routes_for(&task.name, workers, weight_of);
            self.router.set_routes(&task.name, routes);
            self.router.set_remote_routes(&task.name, self.remote_routes(plan, &task.name));
        }
        let planned: Vec<&str> = plan.tasks.iter().map(|t| t.name.as_str()).collect();
        for task in self.router.tasks() {
            if !planned.contains(&task.as_str()) {
                self.router.remove_task(&task);
            }
        }
    }

    /// The task's shares on other agents, one route per node (weights summed over its
    /// workers); nodes whose address the plan does not give are left out.
    fn remote_routes(&self, plan: &Plan, task: &str) -> Vec<(Arc<Remote>, f64)> {
        let mut weights: BTreeMap<&str, f64> = BTreeMap::new();
        for a in plan.assignments.iter().filter(|a| a.task == task && a.node != self.cfg.node) {
            *weights.entry(a.node.as_str()).or_default() += a.weight;
        }
        let mut remotes = self.remotes.lock().unwrap_or_else(|p| p.into_inner());
        let mut routes = Vec::new();
        for (node, weight) in weights {
            let Some(address) = plan.node_addresses.get(node) else {
                warn!(node, task, "the plan gives no address for a node serving this task; not routed there");
                continue;
            };
            let key = (node.to_string(), address.clone());
            let remote = match remotes.get(&key) {
                Some(r) => r.clone(),
                None => match Channel::from_shared(format!("http://{address}")) {
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

    fn routes_for(
        &self,
        task: &str,
        workers: &HashMap<WorkerKey, Arc<Worker>>,
        weight_of: impl Fn(&Worker) -> f64,
    ) -> Vec<(Arc<Worker>, f64)> {
        let mut routes: Vec<(Arc<Worker>, f64)> =
            workers.values().filter(|w| w.spec.task == task).map(|w| (w.clone(), weight_of(w))).collect();
        let retiring = self.retiring.lock().unwrap_or_else(|p| p.into_inner());
        routes.extend(retiring.iter().filter(|w| w.spec.task == task).map(|w| (w.clone(), 0.0)));
        routes
    }

    /// One line per worker for telemetry and status: sizes, queue, CPU use and throttling.
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
                variant: w.spec.variant.name.clone(),
                millicores: w.millicores(),
                max_batch: w.settings().max_batch,
                queue_len: w.queue.len() as u32,
                cpu_usage_cores: usage,
                nr_throttled: stats.nr_throttled,
                throttled_us: stats.throttled_us,
                restarts: w.restarts(),
                ready: w.is_ready(),
                cgroup: w.cgroup.cpu_dir().map(|d| d.display().to_string()).unwrap_or_default(),
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        self.metrics.set_workers(&out);
        out
    }

    /// The worker serving (task, variant), for tests and the profiler's reports.
    pub async fn worker(&self, task: &str, variant: &str) -> Option<Arc<Worker>> {
        self.workers.lock().await.get(&(task.to_string(), variant.to_string())).cloned()
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
