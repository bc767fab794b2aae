//! The node reconciler: the one task that owns this node's workers.
//!
//! Everything that changes which workers run goes through its input queue: a plan to apply
//! (with a reply), a worker that became ready or died, shutdown. It alone holds the workers,
//! the workers being retired, the applied plan and the weights it routed with; it checks a
//! plan (stale, too far ahead, malformed) before it reads any model file, stages the diff and
//! executes it through the executor contract it shares with the simulator
//! (`tidal_common::executor`). What it decided, it publishes: the routing table (to the
//! [`Router`], whose only state of its own is where each stage's round-robin stands) and an
//! immutable [`View`] of the applied plan's tasks and workers, which the request path,
//! telemetry and health read. Nothing reads state back from them.
//!
//! Make before break without polls: a shrink or a retirement waiting for new workers is a
//! pending action, released when a worker's ready event makes its successors all serve, or
//! when the load timeout passes. Retired workers drain in tasks the reconciler owns and
//! awaits at shutdown.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use thiserror::Error;
use tidal_auth::Security;
use tidal_common::executor::{execute, stage, Executor};
use tidal_common::plan::{validate_for_node, Capacity, PlanError};
use tidal_common::reconcile::{desired_on, DesiredWorker, RunningWorker, WorkerKey, WorkerShape};
use tidal_common::tensor::StageIo;
use tidal_proto::v1::inference_client::InferenceClient;
use tidal_proto::v1::{Plan, PlanDelta, Routing, TaskSpec, Transition, VariantSpec};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::cgroup::{CgroupError, WorkerCgroup};
use crate::fetch::Fetcher;
use crate::models::{ModelDir, Unusable};
use crate::router::{Remote, Router, StageKey};
use crate::worker::{BatchSettings, EventSink, Spawner, Worker, WorkerEvent, WorkerSpec};

/// How far ahead of what this agent knows (its applied plan, the controller's epoch at the
/// last registration or report) a plan's epoch may be: a plan beyond it would make every
/// later plan look stale. About two months of rounds every 5 s.
pub const MAX_EPOCH_STEP: u64 = 1 << 20;
/// The most a plan's Raft term may pass the highest term this agent knows of (from the plans
/// it applied and its controllers' answers): an election raises it by one, a partitioned
/// replica's failed elections by a few more, and a far higher term would make every later
/// plan of the real leader look deposed.
pub const MAX_TERM_STEP: u64 = 64;
/// The reconciler's input queue. Plans come one at a time from each controller's pusher and
/// wait for their answer; a worker sends at most two events per process start. A full queue
/// makes its senders wait, never drops an input.
pub const INPUT_QUEUE: usize = 64;
/// How long after a failed model fetch the plan's missing files are fetched again, doubling
/// after each failure in a row up to the most.
const REFETCH_AFTER: Duration = Duration::from_secs(2);
const REFETCH_AFTER_MOST: Duration = Duration::from_secs(60);

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
    #[error("the agent is stopping; the plan was not applied")]
    Stopping,
    #[error("task {task}, stage {stage}: {why}")]
    Signature { task: String, stage: String, why: String },
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

/// What the controllers of the group last said of themselves (registration, telemetry acks):
/// their plan epoch and Raft term, the bounds of how far ahead a plan may be.
#[derive(Debug, Default)]
pub struct KnownGroup {
    epoch: AtomicU64,
    term: AtomicU64,
}

impl KnownGroup {
    pub fn saw(&self, epoch: u64, term: u64) {
        self.epoch.fetch_max(epoch, Ordering::Relaxed);
        self.term.fetch_max(term, Ordering::Relaxed);
    }
}

/// What the reconciler publishes after every change; readers hold an `Arc` of one version.
#[derive(Default)]
pub struct View {
    /// The applied plan's (epoch, term); (0, 0) before the first.
    pub epoch: u64,
    pub term: u64,
    /// The applied plan's tasks, by name.
    pub tasks: HashMap<String, TaskSpec>,
    /// The workers of the applied plan (not those being retired), by id.
    pub workers: Vec<Arc<Worker>>,
    /// Workers that left the plan, still serving while their successors load.
    pub retiring: Vec<Arc<Worker>>,
}

/// What the reconciler works with, given once.
pub struct Parts {
    pub node: String,
    /// CPU and memory this node offers to workers.
    pub capacity: Capacity,
    /// Let make before break hold a leaving worker and its successor both for the load, past the
    /// node's memory. Off (the default): a worker starts only when the memory holds it beside
    /// the workers that run, and a switch that cannot be made before it breaks breaks first
    /// (`tidal_common::executor`).
    pub overlap_transitions: bool,
    pub models: Arc<ModelDir>,
    /// Fetches model files the node lacks from the controllers (none: every file must be in
    /// the model directory).
    pub fetcher: Option<Arc<Fetcher>>,
    pub queue_capacity: usize,
    /// How long a retired worker may take to serve what it has queued.
    pub drain: Duration,
    /// Sizes the clients of other agents (forwarded stages): a few requests' worth.
    pub max_request_bytes: usize,
    pub spawner: Arc<dyn Spawner>,
    pub router: Arc<Router>,
    pub known: Arc<KnownGroup>,
    pub security: Security,
    pub revoked: Arc<tidal_auth::RevocationList>,
    pub plan_epoch: Gauge,
    pub resizes: Counter,
}

pub enum Input {
    /// Boxed: a plan is large, the other inputs small.
    Apply {
        incoming: Box<Incoming>,
        reply: oneshot::Sender<Result<Applied, ApplyError>>,
    },
    Worker(WorkerEvent),
    /// Fetch a variant's model file from the controllers for another part of the agent (the
    /// profiler), unless it is here: its path, or why not. One fetch per file, whoever asks.
    Fetch {
        variant: Box<VariantSpec>,
        reply: oneshot::Sender<Result<PathBuf, String>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

impl From<WorkerEvent> for Input {
    fn from(e: WorkerEvent) -> Self {
        Input::Worker(e)
    }
}

/// The handle the rest of the agent holds: sends inputs, reads the published view.
pub struct Reconciler {
    inputs: mpsc::Sender<Input>,
    view: watch::Receiver<Arc<View>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Reconciler {
    /// Starts the reconciler's task (on the current runtime).
    pub fn start(parts: Parts) -> Self {
        let (inputs, rx) = mpsc::channel(INPUT_QUEUE);
        let (view_tx, view) = watch::channel(Arc::new(View::default()));
        let owner = Owner {
            events: EventSink::to(&inputs),
            p: parts,
            workers: HashMap::new(),
            retiring: Vec::new(),
            pending: Vec::new(),
            weights: HashMap::new(),
            applied: None,
            remotes: HashMap::new(),
            next_worker: 1,
            draining: JoinSet::new(),
            stopping: Vec::new(),
            fetching: JoinSet::new(),
            fetches: HashMap::new(),
            fetch_waiters: HashMap::new(),
            refetch_at: None,
            refetch_after: REFETCH_AFTER,
            view: view_tx,
        };
        let task = tokio::spawn(owner.run(rx));
        Self { inputs, view, task: Mutex::new(Some(task)) }
    }

    /// Applies `incoming`: all of it, or (malformed, stale, a cgroup that cannot be made) none.
    pub async fn apply(&self, incoming: Incoming) -> Result<Applied, ApplyError> {
        let (reply, answer) = oneshot::channel();
        self.inputs
            .send(Input::Apply { incoming: Box::new(incoming), reply })
            .await
            .map_err(|_| ApplyError::Stopping)?;
        answer.await.unwrap_or(Err(ApplyError::Stopping))
    }

    /// The variant's model file, fetched from the controllers if the node lacks it (see
    /// [`Input::Fetch`]).
    pub async fn fetch(&self, variant: VariantSpec) -> Result<PathBuf, String> {
        let (reply, answer) = oneshot::channel();
        let stopping = || "the agent is stopping".to_string();
        self.inputs.send(Input::Fetch { variant: Box::new(variant), reply }).await.map_err(|_| stopping())?;
        answer.await.unwrap_or_else(|_| Err(stopping()))
    }

    /// The latest published view.
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// Follows the published views (each change wakes the receiver).
    pub fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.view.clone()
    }

    /// Stops every worker (draining briefly) and waits for the reconciler's task to end.
    pub async fn shutdown(&self) {
        let (reply, done) = oneshot::channel();
        if self.inputs.send(Input::Shutdown { reply }).await.is_ok() {
            let _ = done.await;
        }
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            if let Err(e) = task.await {
                warn!(error = %e, "the reconciler's task ended abnormally");
            }
        }
    }
}

/// A shrink or a retirement waiting for new workers to serve.
struct Pending {
    after: Vec<Arc<Worker>>,
    /// When it goes ahead even if they do not serve (the load timeout).
    deadline: Instant,
    action: Deferred,
}

enum Deferred {
    Retire(Arc<Worker>),
    /// A resize of the plan `epoch`; a newer plan decides the size itself.
    Resize {
        worker: Arc<Worker>,
        millicores: u32,
        epoch: u64,
    },
}

/// The reconciler's task and everything it owns.
struct Owner {
    p: Parts,
    events: EventSink,
    workers: HashMap<WorkerKey, Arc<Worker>>,
    /// Workers that left the plan: they serve with the weight they had until released.
    retiring: Vec<Arc<Worker>>,
    pending: Vec<Pending>,
    /// The weight each local worker was last routed with, by stage and worker id.
    weights: HashMap<StageKey, HashMap<String, f64>>,
    /// The plan applied (cut for this node), the base of the next delta.
    applied: Option<Plan>,
    /// Clients of the other agents this one routes to, by (node, address).
    remotes: HashMap<(String, String), Arc<Remote>>,
    next_worker: u64,
    /// Retired workers draining their queues.
    draining: JoinSet<()>,
    /// The workers draining, until they have stopped: they hold their memory until then.
    stopping: Vec<Arc<Worker>>,
    /// Model files being fetched (each file's digest by its task), at most one per digest.
    fetching: JoinSet<Result<PathBuf, String>>,
    fetches: HashMap<tokio::task::Id, String>,
    /// Who else waits for a fetch, by digest (the profiler: one at a time).
    fetch_waiters: HashMap<String, Vec<oneshot::Sender<Result<PathBuf, String>>>>,
    /// When the plan's missing model files are fetched again after a failure, and the wait
    /// after the next failure.
    refetch_at: Option<Instant>,
    refetch_after: Duration,
    view: watch::Sender<Arc<View>>,
}

impl Owner {
    async fn run(mut self, mut inputs: mpsc::Receiver<Input>) {
        loop {
            let due = self.pending.iter().map(|p| p.deadline).min();
            // A far deadline when nothing waits (the branch is then disabled anyway).
            let wake = due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                input = inputs.recv() => match input {
                    Some(Input::Apply { incoming, reply }) => {
                        let result = self.apply(*incoming).await;
                        let _ = reply.send(result);
                    }
                    Some(Input::Worker(event)) => self.on_worker(event),
                    Some(Input::Fetch { variant, reply }) => self.fetch_for(*variant, reply).await,
                    Some(Input::Shutdown { reply }) => {
                        inputs.close();
                        self.stop_all().await;
                        let _ = reply.send(());
                        return;
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(wake), if due.is_some() => self.release(),
                Some(_) = self.draining.join_next(), if !self.draining.is_empty() => self.stopping.retain(|w| !w.is_gone()),
                Some(done) = self.fetching.join_next_with_id(), if !self.fetching.is_empty() => self.on_fetched(done).await,
                _ = tokio::time::sleep_until(self.refetch_at.unwrap_or(wake)), if self.refetch_at.is_some() => {
                    self.refetch_at = None;
                    self.apply_again().await;
                }
            }
        }
        // Every handle is gone: stop what runs.
        inputs.close();
        self.stop_all().await;
    }

    fn on_worker(&mut self, event: WorkerEvent) {
        match &event {
            WorkerEvent::Ready { id } => debug!(worker = %id, "worker serves"),
            WorkerEvent::Died { id, error } => debug!(worker = %id, %error, "worker died"),
        }
        self.release();
        self.publish();
    }

    /// A model fetch ended: the applied plan is applied again (it starts the workers it
    /// held for the file), or, after a failure, the plan's missing files are fetched again
    /// a while later.
    async fn on_fetched(&mut self, done: Result<(tokio::task::Id, Result<PathBuf, String>), tokio::task::JoinError>) {
        let (id, outcome) = match done {
            Ok((id, outcome)) => (id, outcome),
            Err(e) => (e.id(), Err(format!("the fetch ended abnormally: {e}"))),
        };
        let digest = self.fetches.remove(&id).unwrap_or_default();
        for waiter in self.fetch_waiters.remove(&digest).unwrap_or_default() {
            let _ = waiter.send(outcome.clone());
        }
        match outcome {
            Ok(path) => {
                debug!(%digest, path = %path.display(), "model file fetched");
                self.refetch_after = REFETCH_AFTER;
                self.apply_again().await;
            }
            Err(why) => {
                warn!(%digest, after = ?self.refetch_after, "no controller sent the model file whole and right ({why}); fetching it again later");
                let at = Instant::now() + self.refetch_after;
                self.refetch_at = Some(self.refetch_at.map_or(at, |t| t.min(at)));
                self.refetch_after = (self.refetch_after * 2).min(REFETCH_AFTER_MOST);
            }
        }
    }

    /// Applies the applied plan again (after a model file arrived, or to fetch again).
    async fn apply_again(&mut self) {
        let Some(plan) = self.applied.clone() else { return };
        match self.apply(Incoming::Plan(plan)).await {
            Ok(applied) if applied.held.is_empty() => {
                info!(epoch = applied.epoch, "plan applied whole, its model files fetched")
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "applying the plan again after a model fetch failed"),
        }
    }

    /// Answers with the variant's model file: at once when the node has it (or cannot use it),
    /// else once a fetch (this one, or the plan's under way) ends.
    async fn fetch_for(&mut self, variant: VariantSpec, reply: oneshot::Sender<Result<PathBuf, String>>) {
        let name = variant.name.clone();
        let located = self.p.models.locate_all(vec![variant.clone()]).await.remove(&name);
        let why = match located {
            Some(Ok(path)) => return drop(reply.send(Ok(path))),
            Some(Err(Unusable::Fetch(why))) => why,
            Some(Err(Unusable::Refused(why))) => return drop(reply.send(Err(why))),
            None => return drop(reply.send(Err("the model file could not be checked".into()))),
        };
        let Some(fetcher) = self.p.fetcher.clone() else { return drop(reply.send(Err(why))) };
        let digest = variant.model_sha256.clone();
        self.fetch_waiters.entry(digest.clone()).or_default().push(reply);
        if self.fetches.values().any(|f| *f == digest) {
            return;
        }
        let (keep, files) = (self.kept_digests(&[]), vec![variant.model_file.clone()]);
        info!(model_files = ?files, %digest, "fetching a model file from the controllers (asked by the profiler)");
        let task = self.fetching.spawn(async move { fetcher.fetch(&files, &digest, &keep).await });
        self.fetches.insert(task.id(), variant.model_sha256);
    }

    /// The digests that stay in the cache while files are fetched: those of `desired`, of the
    /// applied plan and of the running workers.
    fn kept_digests(&self, desired: &[DesiredWorker]) -> HashSet<String> {
        let planned = self.applied.iter().flat_map(|p| p.assignments.iter()).filter_map(|a| a.variant.as_ref());
        desired
            .iter()
            .map(|d| &d.variant)
            .chain(planned)
            .chain(self.workers.values().map(|w| &w.spec.variant))
            .map(|v| v.model_sha256.clone())
            .filter(|d| !d.is_empty())
            .collect()
    }

    /// Starts a fetch of each model file the plan's new workers need and the node lacks,
    /// unless one is under way.
    fn fetch_missing(&mut self, desired: &[DesiredWorker], located: &HashMap<String, Result<PathBuf, Unusable>>) {
        let Some(fetcher) = self.p.fetcher.clone() else { return };
        // What the plan and the running workers use stays in the cache.
        let keep = self.kept_digests(desired);
        // The files are kept by digest: variants of one digest (the same model under other
        // names) are one fetch, which may take it under any of their names.
        let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for d in desired {
            if let Some(Err(Unusable::Fetch(_))) = located.get(&d.variant.name) {
                let names = wanted.entry(d.variant.model_sha256.clone()).or_default();
                if !names.contains(&d.variant.model_file) {
                    names.push(d.variant.model_file.clone());
                }
            }
        }
        for (digest, files) in wanted {
            if self.fetches.values().any(|f| *f == digest) {
                continue;
            }
            let (fetcher, keep, sha) = (fetcher.clone(), keep.clone(), digest.clone());
            info!(model_files = ?files, %digest, "fetching a model file from the controllers");
            let task = self.fetching.spawn(async move { fetcher.fetch(&files, &sha, &keep).await });
            self.fetches.insert(task.id(), digest);
        }
    }

    fn applied_at(&self) -> (u64, u64) {
        self.applied.as_ref().map_or((0, 0), |p| (p.epoch, p.term))
    }

    /// Applies a plan: checks it whole before touching anything (nothing else changes the
    /// applied plan meanwhile: this task owns it), then reads the model files it starts, then
    /// executes the staged diff.
    async fn apply(&mut self, incoming: Incoming) -> Result<Applied, ApplyError> {
        let applied = self.applied_at();
        let mut plan = match incoming {
            Incoming::Plan(plan) => plan,
            Incoming::Delta { delta, base } => {
                if self.applied.is_none() || applied != base {
                    return Err(ApplyError::NotTheBase { base, applied });
                }
                tidal_common::plan::delta::apply(self.applied.as_ref(), &delta).map_err(ApplyError::InvalidDelta)?
            }
        };
        tidal_common::plan::normalise(&mut plan);
        // A whole plan (from a controller before plans were cut, or a test) is cut here: the
        // routes below are read from the cut form only.
        if plan.for_node.is_empty() {
            plan = tidal_common::plan::cut(&plan, &self.p.node);
        }
        validate_for_node(&plan, &self.p.node, self.p.capacity)?;
        if (plan.epoch, plan.term) < applied {
            return Err(ApplyError::Stale { got: (plan.epoch, plan.term), applied });
        }
        let known = applied.0.max(self.p.known.epoch.load(Ordering::Relaxed));
        if plan.epoch > known.saturating_add(MAX_EPOCH_STEP) {
            return Err(ApplyError::TooFarAhead { got: plan.epoch, known });
        }
        let known_term = applied.1.max(self.p.known.term.load(Ordering::Relaxed));
        if plan.term > known_term.saturating_add(MAX_TERM_STEP) {
            return Err(ApplyError::TermTooFarAhead { got: plan.term, known: known_term });
        }
        let desired = desired_on(&plan, &self.p.node);
        // Only the models of workers to start are checked (a file read, off the runtime); a
        // plan that resizes or rebatches running workers touches no file.
        let to_load: Vec<tidal_proto::v1::VariantSpec> = desired
            .iter()
            .filter(|d| {
                self.workers.get(&d.key).is_none_or(|w| {
                    (&w.spec.variant.model_file, &w.spec.variant.model_sha256)
                        != (&d.variant.model_file, &d.variant.model_sha256)
                })
            })
            .map(|d| d.variant.clone())
            .collect();
        let models = if to_load.is_empty() { HashMap::new() } else { self.p.models.locate_all(to_load).await };
        self.fetch_missing(&desired, &models);
        if desired.is_empty() && !self.workers.is_empty() {
            warn!(
                epoch = plan.epoch,
                term = plan.term,
                workers = self.workers.len(),
                "this plan stops every worker of this node"
            );
        }
        let running: Vec<RunningWorker> = self
            .workers
            .iter()
            .map(|(key, w)| RunningWorker {
                key: key.clone(),
                model_file: w.spec.variant.model_file.clone(),
                model_sha256: w.spec.variant.model_sha256.clone(),
                shape: shape_of(w),
            })
            .collect();
        let transition = Transition::try_from(plan.transition).unwrap_or(Transition::InPlace);
        let staged = stage(&desired, &running, transition, |v| match models.get(&v.name) {
            Some(Err(why)) => Err(why.to_string()),
            _ => Ok(()),
        });
        if !staged.actions.is_empty() {
            info!(epoch = plan.epoch, actions = staged.actions.len(), ?transition, "applying plan");
        }
        let held: Vec<String> = staged.held.iter().map(|(task, why)| format!("{task}: {why}")).collect();
        for why in &held {
            warn!(epoch = plan.epoch, "task held at what runs: {why}");
        }
        let mut ios = HashMap::new();
        for task in &plan.tasks {
            for (stage, v) in tidal_common::task::variants(task) {
                let served = tidal_common::task::as_served(stage, v);
                let io = StageIo::of(&served).map_err(|why| ApplyError::Signature {
                    task: task.name.clone(),
                    stage: stage.name.clone(),
                    why,
                })?;
                let key = (StageKey::new(&task.name, &stage.name), v.name.clone());
                ios.insert(key, (Arc::new(io), served.text.clone()));
            }
        }
        let paths = models.into_iter().filter_map(|(name, at)| Some((name, at.ok()?))).collect();
        execute(&mut NodeExecutor { owner: self, epoch: plan.epoch, ios, paths }, staged.actions)?;
        self.update_routes(&plan, &staged.held);
        self.p.plan_epoch.set(plan.epoch as i64);
        let epoch = plan.epoch;
        self.applied = Some(plan);
        self.release();
        self.publish();
        Ok(Applied { epoch, held })
    }

    /// Publishes the view of what is applied and runs.
    fn publish(&self) {
        let (epoch, term) = self.applied_at();
        let mut workers: Vec<Arc<Worker>> = self.workers.values().cloned().collect();
        workers.sort_by(|a, b| a.spec.id.cmp(&b.spec.id));
        let tasks = self
            .applied
            .as_ref()
            .map_or_else(HashMap::new, |p| p.tasks.iter().map(|t| (t.name.clone(), t.clone())).collect());
        let retiring = self.retiring.clone();
        self.view.send_replace(Arc::new(View { epoch, term, tasks, workers, retiring }));
    }

    /// Carries out the pending actions whose workers all serve, or whose time is up.
    fn release(&mut self) {
        let now = Instant::now();
        let (due, waiting): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.deadline <= now || p.after.iter().all(|w| w.is_ready()));
        self.pending = waiting;
        let mut retired = false;
        for p in due {
            match p.action {
                Deferred::Retire(w) => {
                    retired = true;
                    self.retiring.retain(|r| !Arc::ptr_eq(r, &w));
                    let stage = StageKey::new(&w.spec.task, &w.spec.stage);
                    if let Some(weights) = self.weights.get_mut(&stage) {
                        weights.remove(&w.spec.id);
                    }
                    self.route_stage(&stage);
                    let drain = self.p.drain;
                    self.stopping.retain(|w| !w.is_gone());
                    self.stopping.push(w.clone());
                    self.draining.spawn(async move {
                        w.shutdown(drain).await;
                        info!(worker = %w.spec.id, "worker stopped");
                    });
                }
                Deferred::Resize { worker, millicores, epoch } => {
                    if self.applied_at().0 == epoch {
                        self.resize_now(&worker, millicores);
                    }
                }
            }
        }
        if retired {
            self.publish();
        }
    }

    fn resize_now(&self, w: &Worker, millicores: u32) {
        let from = w.millicores();
        match w.resize(millicores) {
            Ok(()) => {
                self.p.resizes.inc();
                info!(worker = %w.spec.id, from, to = millicores, "resized worker in place");
            }
            Err(e) => warn!(worker = %w.spec.id, error = %e, "resizing the worker failed; the next plan retries"),
        }
    }

    /// Keeps `w` serving with the weight it had until every one of `successors` serves (or
    /// the load timeout passes), then drains and stops it.
    fn retire(&mut self, w: Arc<Worker>, successors: Vec<Arc<Worker>>) {
        info!(worker = %w.spec.id, variant = %w.spec.variant.name, successors = successors.len(), "retiring worker");
        self.retiring.push(w.clone());
        let deadline = Instant::now() + self.p.spawner.load_timeout();
        self.pending.push(Pending { after: successors, deadline, action: Deferred::Retire(w) });
    }

    /// Routes each stage of each task by the plan's weights; a held task keeps the routes it
    /// had, a retiring worker the weight it had.
    fn update_routes(&mut self, plan: &Plan, held: &BTreeMap<String, String>) {
        self.p.router.set_routing(Routing::try_from(plan.routing).unwrap_or(Routing::ByWeight));
        let mut planned = Vec::new();
        for task in &plan.tasks {
            for stage in &task.stages {
                let key = StageKey::new(&task.name, &stage.name);
                planned.push(key.clone());
                if held.contains_key(&task.name) {
                    continue;
                }
                let previous = self.weights.remove(&key).unwrap_or_default();
                let mut weights: HashMap<String, f64> = self
                    .workers
                    .values()
                    .filter(|w| w.spec.task == task.name && w.spec.stage == stage.name)
                    .map(|w| {
                        let weight = plan
                            .assignments
                            .iter()
                            .find(|a| {
                                a.node == self.p.node
                                    && a.task == task.name
                                    && a.stage == stage.name
                                    && a.replica == w.spec.replica
                                    && a.variant.as_ref().is_some_and(|v| v.name == w.spec.variant.name)
                            })
                            .map_or(0.0, |a| a.weight);
                        (w.spec.id.clone(), weight)
                    })
                    .collect();
                for w in self.retiring.iter().filter(|w| w.spec.task == task.name && w.spec.stage == stage.name) {
                    weights.insert(w.spec.id.clone(), previous.get(&w.spec.id).copied().unwrap_or(0.0));
                }
                self.weights.insert(key.clone(), weights);
                self.route_stage(&key);
                let remote = self.remote_routes(plan, &key);
                self.p.router.set_remote_routes(&key, remote);
            }
        }
        self.weights.retain(|k, _| planned.contains(k));
        self.p.router.retain(&planned);
    }

    /// Publishes a stage's local routes: its workers and its retiring workers, each with its
    /// weight.
    fn route_stage(&self, stage: &StageKey) {
        let weights = self.weights.get(stage);
        let weight = |w: &Arc<Worker>| weights.and_then(|ws| ws.get(&w.spec.id)).copied().unwrap_or(0.0);
        let serves = |w: &&Arc<Worker>| w.spec.task == stage.task && w.spec.stage == stage.stage;
        let routes =
            self.workers.values().chain(self.retiring.iter()).filter(serves).map(|w| (w.clone(), weight(w))).collect();
        self.p.router.set_routes(stage, routes);
    }

    /// The stage's shares on other agents (the cut plan's routes, one per node); nodes whose
    /// address the plan does not give are left out.
    fn remote_routes(&mut self, plan: &Plan, stage: &StageKey) -> Vec<(Arc<Remote>, f64)> {
        let (task, stage_name) = (stage.task.as_str(), stage.stage.as_str());
        let weights =
            plan.routes.iter().filter(|r| r.task == task && r.stage == stage_name).map(|r| (r.node.as_str(), r.weight));
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
            let remote = match self.remotes.get(&key) {
                Some(r) => r.clone(),
                // Only to the agent the plan names there: a holder of any other certificate of
                // the cluster at that address gets nothing forwarded.
                None => match self.p.security.endpoint_of(
                    address,
                    tidal_auth::Role::Agent(node.to_string()),
                    Some(self.p.revoked.clone()),
                ) {
                    Ok(endpoint) => {
                        let channel = endpoint.connect_timeout(Duration::from_secs(1)).connect_lazy();
                        let limit = 4 * self.p.max_request_bytes.max(1 << 20);
                        let client = InferenceClient::new(channel)
                            .max_decoding_message_size(limit)
                            .max_encoding_message_size(limit);
                        let r = Arc::new(Remote::new(node.to_string(), address.clone(), client));
                        self.remotes.insert(key, r.clone());
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

    /// Stops every worker, planned or retiring (draining briefly), and waits for the drains
    /// under way.
    async fn stop_all(&mut self) {
        self.pending.clear();
        let all: Vec<Arc<Worker>> = self.workers.drain().map(|(_, w)| w).chain(self.retiring.drain(..)).collect();
        futures::future::join_all(all.iter().map(|w| w.shutdown(Duration::from_secs(2)))).await;
        while self.draining.join_next().await.is_some() {}
        self.stopping.clear();
        self.fetching.shutdown().await;
        self.publish();
    }
}

fn shape_of(w: &Worker) -> WorkerShape {
    let settings = w.settings();
    WorkerShape {
        millicores: w.millicores(),
        max_batch: settings.max_batch,
        max_delay_ms: settings.max_delay.as_millis().min(u32::MAX as u128) as u32,
        memory_bytes: w.memory_bytes(),
    }
}

/// The node's executor of a plan: processes in cgroups, make before break.
struct NodeExecutor<'a> {
    owner: &'a mut Owner,
    epoch: u64,
    /// Each variant's model tensors and the text around its model, by stage and variant (a
    /// stage's variants may differ in them).
    ios: HashMap<(StageKey, String), (Arc<StageIo>, Option<tidal_proto::v1::TextIo>)>,
    /// Where each variant to start has its model file (the model directory or the cache).
    paths: HashMap<String, PathBuf>,
}

impl NodeExecutor<'_> {
    /// The workers running under `keys` (what a shrink or a retirement waits for).
    fn workers_of(&self, keys: &[WorkerKey]) -> Vec<Arc<Worker>> {
        keys.iter().filter_map(|k| self.owner.workers.get(k).cloned()).collect()
    }
}

impl Executor for NodeExecutor<'_> {
    type Prepared = (String, WorkerCgroup);
    type Error = ApplyError;

    fn prepare(&mut self, _: &DesiredWorker) -> Result<Self::Prepared, ApplyError> {
        let id = format!("worker-{}", self.owner.next_worker);
        self.owner.next_worker += 1;
        let cgroup = self.owner.p.spawner.cgroup(&id)?;
        Ok((id, cgroup))
    }

    fn abandon(&mut self, (_, cgroup): Self::Prepared) {
        cgroup.remove();
    }

    fn start(&mut self, d: DesiredWorker, (id, cgroup): Self::Prepared, after_gone: &[WorkerKey]) {
        let (io, stage_text) = match self.ios.get(&(StageKey::new(&d.key.task, &d.key.stage), d.variant.name.clone())) {
            Some((io, text)) => (Some(io.clone()), text.clone()),
            None => (None, None),
        };
        let models = self.owner.p.models.path().to_path_buf();
        let spec = WorkerSpec {
            id: id.clone(),
            task: d.key.task.clone(),
            stage: d.key.stage.clone(),
            replica: d.key.replica,
            model_path: self.paths.get(&d.variant.name).cloned().unwrap_or_else(|| {
                // Restarted with the file it runs (its shape changed, not its model).
                self.owner.workers.get(&d.key).map_or_else(
                    || self.owner.p.models.path().join(&d.variant.model_file),
                    |w| w.spec.model_path.clone(),
                )
            }),
            text: stage_text.map(|spec| {
                let tokenizer = (!d.variant.tokenizer_file.is_empty()).then(|| models.join(&d.variant.tokenizer_file));
                let text = tidal_common::text::StageText::load(&spec, tokenizer.as_deref());
                if let Some(why) = text.load_error() {
                    // Loaded once per worker: a file fixed later serves from the next worker
                    // (a new plan or an agent restart).
                    warn!(worker = %id, "{why}; its requests are refused while this worker runs");
                }
                Arc::new(text)
            }),
            io: io.unwrap_or_else(|| {
                // Not in the plan's tasks (a validated plan has them all): a stage of this
                // variant's sample shape.
                let stage = tidal_proto::v1::StageSpec { variants: vec![d.variant.clone()], ..Default::default() };
                Arc::new(StageIo::of(&stage).expect("a stage without a signature"))
            }),
            variant: d.variant.clone(),
        };
        info!(worker = %id, key = %d.key, millicores = d.shape.millicores, "starting worker");
        let settings = BatchSettings {
            max_batch: d.shape.max_batch,
            max_delay: Duration::from_millis(d.shape.max_delay_ms as u64),
        };
        // Limited before its process starts: a model's load is its first allocation.
        let limit = tidal_common::memory::cgroup_limit(d.shape.memory_bytes);
        let memory_bytes = match cgroup.set_memory_limit(limit) {
            Ok(()) => d.shape.memory_bytes,
            Err(e) => {
                // Reported as what it is: not limited (0).
                warn!(worker = %id, error = %e, "the worker's memory cannot be limited; it runs without a limit");
                0
            }
        };
        // The workers it waits for were stopped, by this plan or an earlier one: retiring, or
        // already draining.
        let gone: Vec<_> = after_gone
            .iter()
            .filter_map(|k| {
                let is = |w: &&Arc<Worker>| &w.spec.key() == k;
                self.owner.retiring.iter().rev().find(is).or_else(|| self.owner.stopping.iter().rev().find(is))
            })
            .map(|w| w.gone())
            .collect();
        let gate = (!gone.is_empty()).then(|| {
            info!(worker = %id, waits_for = gone.len(), "the worker starts once workers leaving make its memory's room");
            // Bounded: a worker that never stopped must not hold its successor for ever. One
            // leaving make before break may wait a load timeout for its own successor, then
            // drain, then have its process stopped (a grace of 5 s).
            let bound = self.owner.p.spawner.load_timeout() + self.owner.p.drain + Duration::from_secs(10);
            let all = futures::future::join_all(gone);
            Box::pin(async move {
                let _ = tokio::time::timeout(bound, all).await;
            }) as futures::future::BoxFuture<'static, ()>
        });
        let p = &self.owner.p;
        let w = Worker::start(
            spec,
            cgroup,
            d.shape.millicores,
            memory_bytes,
            d.shape.memory_bytes,
            gate,
            settings,
            p.queue_capacity,
            p.spawner.clone(),
            self.owner.events.clone(),
        );
        if let Some(old) = self.owner.workers.insert(d.key, w.clone()) {
            self.owner.retire(old, vec![w]);
        }
    }

    fn rebatch(&mut self, key: &WorkerKey, max_batch: u32, max_delay_ms: u32) {
        if let Some(w) = self.owner.workers.get(key) {
            w.set_batching(BatchSettings { max_batch, max_delay: Duration::from_millis(max_delay_ms as u64) });
        }
    }

    fn limit_memory(&mut self, key: &WorkerKey, memory_bytes: u64) {
        let Some(w) = self.owner.workers.get(key) else { return };
        match w.limit_memory(memory_bytes) {
            Ok(()) => {
                info!(worker = %w.spec.id, memory_mib = memory_bytes >> 20, "limited the worker's memory in place")
            }
            Err(e) => {
                warn!(worker = %w.spec.id, error = %e, "limiting the worker's memory failed; the next plan retries")
            }
        }
    }

    fn resize(&mut self, key: &WorkerKey, millicores: u32, after: &[WorkerKey]) {
        let Some(w) = self.owner.workers.get(key).cloned() else { return };
        if after.is_empty() {
            self.owner.resize_now(&w, millicores);
        } else {
            let after = self.workers_of(after);
            let deadline = Instant::now() + self.owner.p.spawner.load_timeout();
            let action = Deferred::Resize { worker: w, millicores, epoch: self.epoch };
            self.owner.pending.push(Pending { after, deadline, action });
        }
    }

    fn stop(&mut self, key: &WorkerKey, after: &[WorkerKey]) {
        let successors = self.workers_of(after);
        if let Some(w) = self.owner.workers.remove(key) {
            self.owner.retire(w, successors);
        }
    }

    fn millicores(&self, key: &WorkerKey) -> Option<u32> {
        self.owner.workers.get(key).map(|w| w.millicores())
    }

    fn starting(&self, task: &str) -> Vec<WorkerKey> {
        self.owner.workers.iter().filter(|(k, w)| k.task == task && !w.is_ready()).map(|(k, _)| k.clone()).collect()
    }

    fn memory_budget(&self) -> Option<u64> {
        let bytes = self.owner.p.capacity.memory_bytes;
        (!self.owner.p.overlap_transitions && bytes > 0).then_some(bytes)
    }

    fn memory_held(&self) -> u64 {
        let o = &self.owner;
        let draining = o.stopping.iter().filter(|w| !w.is_gone());
        o.workers.values().chain(&o.retiring).chain(draining).map(|w| w.planned_memory_bytes()).sum()
    }

    fn memory_of(&self, key: &WorkerKey) -> u64 {
        self.owner.workers.get(key).map_or(0, |w| w.planned_memory_bytes())
    }

    fn leaving(&self) -> Vec<(WorkerKey, u64)> {
        let o = &self.owner;
        let leaving = o.retiring.iter().chain(o.stopping.iter().filter(|w| !w.is_gone()));
        leaving.map(|w| (w.spec.key(), w.planned_memory_bytes())).collect()
    }
}

#[cfg(test)]
mod tests;
