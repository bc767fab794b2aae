//! The node: what the agent's services share — its configuration, telemetry, metrics, trust
//! (members, revocations) and the handle of the [`crate::reconciler`], which alone owns the
//! workers and the applied plan and publishes what the rest reads.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tidal_auth::Security;
use tidal_common::plan::Capacity;
use tidal_proto::v1::{TaskSpec, WorkerTelemetry};
use tracing::{info, warn};

use crate::cgroup::{CpuCgroups, CpuStats};
use crate::fetch::{Fetcher, ModelCache};
use crate::metrics::AgentMetrics;
use crate::model_stats::ModelStats;
use crate::models::ModelDir;
pub use crate::reconciler::{Applied, ApplyError, Incoming};
use crate::reconciler::{KnownGroup, Parts, Reconciler, View};
use crate::router::{Router, StageKey};
use crate::telemetry::Telemetry;
use crate::worker::{ProcessConfig, Spawner, Worker};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub model_dir: PathBuf,
    /// Where files fetched from the controllers are kept, and the most bytes kept (none:
    /// nothing is fetched).
    pub model_cache: Option<(PathBuf, u64)>,
    /// The controller replicas, which send the model files the node lacks.
    pub controllers: Vec<String>,
    /// CPU this node offers to workers, in millicores.
    pub millicores: u32,
    /// Memory this node offers to workers, bytes (0: not declared), and the machine's.
    pub memory_bytes: u64,
    pub memory_total_bytes: u64,
    /// Transitions may pass `memory_bytes` (see [`crate::reconciler::Parts::overlap_transitions`]).
    pub overlap_transitions: bool,
    pub queue_capacity: usize,
    /// Largest inference request served; larger ones get RESOURCE_EXHAUSTED.
    pub max_request_bytes: usize,
    /// Most bytes of requests held at once (see [`crate::admission`]).
    pub max_inflight_bytes: usize,
    pub process: ProcessConfig,
    /// How long a stopped worker may take to serve what it has queued.
    pub drain: Duration,
    /// How long a request for a task without a worker (unloaded while idle) waits for one.
    pub cold_start_wait: Duration,
}

/// Most revoked serials an agent holds (twice what the group keeps: a bound, not a policy).
pub const MAX_REVOKED: usize = 8192;

pub struct Node {
    pub cfg: AgentConfig,
    pub cgroups: CpuCgroups,
    pub router: Arc<Router>,
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
    /// The one owner of this node's workers and applied plan.
    reconciler: Reconciler,
    /// The epoch and term the controllers reported (bounds on a plan's).
    known: Arc<KnownGroup>,
    /// The replicas of the group the agent's controllers reported (empty before the first
    /// answer, or with no --controller): the only ones whose plans it applies.
    members: RwLock<Vec<u64>>,
    /// The certificates the group has revoked (every call's guard refuses them), and the
    /// version of the list held.
    pub revoked: Arc<tidal_auth::RevocationList>,
    revocations_version: AtomicU64,
    /// Whether the controllers say this node drains (it then reports itself not ready).
    draining: AtomicBool,
    /// Last CPU reading per worker, to turn cumulative usage into a rate.
    cpu_seen: Mutex<HashMap<String, (Instant, CpuStats)>>,
}

impl Node {
    /// The node, its reconciler started on the current runtime with `spawner` (the agent's:
    /// [`crate::worker::Processes`]).
    pub fn new(
        cfg: AgentConfig,
        cgroups: CpuCgroups,
        spawner: Arc<dyn Spawner>,
        metrics: AgentMetrics,
        security: Security,
        inference_token: Option<tidal_auth::Token>,
    ) -> Arc<Self> {
        let inflight = crate::admission::InflightBytes::new(cfg.max_inflight_bytes, metrics.inflight_bytes.clone());
        // Files are fetched only with controllers to fetch them from.
        let cache = match &cfg.model_cache {
            Some((dir, max_bytes)) if !cfg.controllers.is_empty() => match ModelCache::open(dir.clone(), *max_bytes) {
                Ok(cache) => Some(Arc::new(cache)),
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "the model cache cannot be used: model files are not fetched");
                    None
                }
            },
            _ => None,
        };
        let fetcher = cache.clone().map(|cache| {
            Arc::new(Fetcher {
                controllers: cfg.controllers.clone(),
                security: security.clone(),
                cache,
                attempts: metrics.model_fetches.clone(),
                fetched_bytes: metrics.model_fetched_bytes.clone(),
            })
        });
        let models = ModelDir::new(cfg.model_dir.clone(), cache);
        let router = Arc::new(Router::default());
        let known = Arc::new(KnownGroup::default());
        let revoked: Arc<tidal_auth::RevocationList> = Arc::default();
        let reconciler = Reconciler::start(Parts {
            node: cfg.node.clone(),
            capacity: Capacity { millicores: cfg.millicores, memory_bytes: cfg.memory_bytes },
            overlap_transitions: cfg.overlap_transitions,
            models: models.clone(),
            fetcher,
            queue_capacity: cfg.queue_capacity,
            drain: cfg.drain,
            max_request_bytes: cfg.max_request_bytes,
            spawner,
            router: router.clone(),
            known: known.clone(),
            security: security.clone(),
            revoked: revoked.clone(),
            plan_epoch: metrics.plan_epoch.clone(),
            resizes: metrics.resizes.clone(),
        });
        Arc::new(Self {
            inflight,
            security,
            inference_token,
            models,
            cfg,
            cgroups,
            router,
            telemetry: Telemetry::default(),
            model_stats: ModelStats::default(),
            metrics,
            reconciler,
            known,
            members: RwLock::new(Vec::new()),
            revoked,
            revocations_version: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            cpu_seen: Mutex::new(HashMap::new()),
        })
    }

    /// What the reconciler last published: the applied plan's tasks and workers.
    pub fn view(&self) -> Arc<View> {
        self.reconciler.view()
    }

    /// Follows what the reconciler publishes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<View>> {
        self.reconciler.subscribe()
    }

    pub fn applied_epoch(&self) -> u64 {
        self.view().epoch
    }

    /// Records what a controller of the group answered: its plan epoch, Raft term and members.
    pub fn saw_group(&self, epoch: u64, term: u64, members: Vec<u64>) {
        self.known.saw(epoch, term);
        if !members.is_empty() {
            let mut known = self.members.write().unwrap_or_else(|p| p.into_inner());
            if *known != members {
                info!(?members, "the controller group's members");
                *known = members;
            }
        }
    }

    /// Takes what the controllers say of this node's draining; logged when it changes.
    pub fn saw_draining(&self, draining: bool) {
        if self.draining.swap(draining, Ordering::Relaxed) == draining {
            return;
        }
        if draining {
            info!(node = %self.cfg.node, "the controllers drain this node: it reports itself not ready");
        } else {
            info!(node = %self.cfg.node, "this node no longer drains: it reports itself ready when it serves");
        }
    }

    /// Whether the node drains: not ready for new traffic (health "", `/readyz`, V2 ServerReady).
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
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
        self.view().term
    }

    pub fn task(&self, name: &str) -> Option<TaskSpec> {
        self.view().tasks.get(name).cloned()
    }

    /// The tasks of the applied plan, by name.
    pub fn task_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.view().tasks.keys().cloned().collect();
        names.sort();
        names
    }

    /// Whether a request of `task` can be served through this agent now: every stage has a
    /// ready worker here or a reachable agent elsewhere.
    pub fn task_ready(&self, task: &str) -> bool {
        self.task(task)
            .is_some_and(|t| t.stages.iter().all(|s| self.router.stage_ready(&StageKey::new(&t.name, &s.name))))
    }

    /// Applies a plan to this node (see [`crate::reconciler`]): all of it or, if it is
    /// malformed, stale or a new worker's cgroup cannot be made, none of it. A task whose model
    /// file is missing here is held at what runs for it and named in the result. Plans are
    /// ordered by (epoch, term): one older than the applied plan comes from a deposed leader
    /// (or a delayed push) and is refused.
    pub async fn apply_plan(&self, incoming: Incoming) -> Result<Applied, ApplyError> {
        self.reconciler.apply(incoming).await
    }

    /// The variant's model file, fetched from the controllers (by the reconciler, which owns
    /// the cache) when the node lacks it.
    pub async fn model_file(&self, variant: &tidal_proto::v1::VariantSpec) -> Result<std::path::PathBuf, String> {
        self.reconciler.fetch(variant.clone()).await
    }

    /// One line per worker for telemetry and status: sizes, queue, CPU use and throttling.
    /// How many workers run here, and whether every one of them serves.
    pub fn workers_serving(&self) -> (usize, bool) {
        let view = self.view();
        (view.workers.len(), view.workers.iter().all(|w| w.is_ready()))
    }

    /// [`Self::worker_telemetry`] with the batches each worker served since the last report
    /// (taken: a report carries each batch once).
    pub fn worker_report(&self) -> Vec<WorkerTelemetry> {
        let mut out = self.worker_telemetry();
        for w in &self.view().workers {
            if let Some(t) = out.iter_mut().find(|t| t.id == w.spec.id) {
                t.served = w.take_served();
            }
        }
        out
    }

    pub fn worker_telemetry(&self) -> Vec<WorkerTelemetry> {
        let view = self.view();
        let now = Instant::now();
        let mut seen = self.cpu_seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for w in &view.workers {
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
                threads: w.threads(),
                cgroup: w.cgroup.cpu_dir().map(|d| d.display().to_string()).unwrap_or_default(),
                served: Vec::new(),
                memory_bytes: w.memory_bytes(),
                oom_kills: w.cgroup.oom_kills(),
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        self.metrics.set_workers(&out);
        out
    }

    /// The first replica of (task, variant), for tests and the profiler's reports.
    pub fn worker(&self, task: &str, variant: &str) -> Option<Arc<Worker>> {
        let view = self.view();
        view.workers
            .iter()
            .find(|w| w.spec.task == task && w.spec.variant.name == variant && w.spec.replica == 0)
            .cloned()
    }

    /// Stops every worker (draining briefly) and removes the cgroups.
    pub async fn shutdown(&self) {
        self.reconciler.shutdown().await;
        let cgroups = self.cgroups.clone();
        let swept = tokio::task::spawn_blocking(move || cgroups.sweep()).await.unwrap_or(0);
        if swept > 0 {
            info!(swept, "removed cgroups left by interrupted operations");
        }
        self.cgroups.remove();
    }
}
