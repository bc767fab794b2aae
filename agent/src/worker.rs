//! A worker as the agent sees it: the child process that runs the model, its cgroup, its
//! deadline-ordered queue and the batcher that feeds one from the other.
//!
//! The queue and the batcher live in the agent, so that the batch size and the batcher timeout
//! change without touching the process, and the queue survives a worker's crash: the batcher
//! restarts the process (with back-off) and carries on with the requests still waiting.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt, StreamExt};
use prost::Message;
use tidal_common::onnx_signature::ElementType;
use tidal_common::profile_correction::IDLE_GAP;
use tidal_common::tensor::{Declared, NamedTensor, StageIo, POSITIONAL_OUTPUT};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::watch;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::cgroup::{CgroupError, CpuCgroups, WorkerCgroup};
use crate::error::ServeError;
use crate::queue::{DeadlineQueue, Pending, Served};
use crate::worker_protocol::{Batch, BatchResult, FrameTensor, Ready, MAX_FRAME};

/// How the agent starts worker processes.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// The agent's own binary, which runs a worker when started as `<exe> worker`.
    pub exe: PathBuf,
    pub ort_lib: PathBuf,
    /// ONNX Runtime intra-op threads per worker, fixed whatever its quota; None: its quota's
    /// cores, followed as it is resized ([`threads_for`]).
    pub fixed_threads: Option<usize>,
    /// How long a worker may take to load its model.
    pub load_timeout: Duration,
    /// The (uid, gid) workers run as: an unprivileged user, so that a model or a request that
    /// takes over a worker gets nothing of the agent's rights. None: the agent's own.
    pub run_as: Option<(u32, u32)>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("starting the worker process: {0}")]
    Spawn(std::io::Error),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("the worker did not load its model within {0:?}")]
    LoadTimeout(Duration),
    #[error("the worker could not load its model: {0}")]
    Load(String),
    #[error("the worker process went away: {0}")]
    Gone(String),
}

/// What a worker needs of its machine: a cgroup, and a process that runs its model in it. The
/// agent's is [`Processes`]; tests give a fake, so that the node's control path runs with no
/// root, no ONNX Runtime and faults on demand.
pub trait Spawner: Send + Sync + 'static {
    /// The worker's cgroup, made before anything of a plan is started (a plan whose cgroups
    /// cannot all be made changes nothing).
    fn cgroup(&self, id: &str) -> Result<WorkerCgroup, CgroupError>;
    /// Starts the process for `model` in `cgroup` at `millicores`, and waits until it serves.
    fn spawn<'a>(
        &'a self,
        model: &'a Path,
        cgroup: &'a WorkerCgroup,
        millicores: u32,
    ) -> BoxFuture<'a, Result<Box<dyn ModelProcess>, WorkerError>>;
    /// How long a worker may take to load its model: how long a retirement waits for its
    /// successors at most.
    fn load_timeout(&self) -> Duration;
}

/// The intra-op threads for a quota of `millicores`: its cores, a part counting whole (1.5
/// cores run 2 threads, each held to its share by the quota), one at least. More threads than
/// cores only take turns on them (measured: agent/examples/threads_under_quota.rs).
pub fn threads_for(millicores: u32) -> usize {
    millicores.div_ceil(1000).max(1) as usize
}

/// A running model process, as the batcher drives it.
pub trait ModelProcess: Send {
    /// Runs one batch: each input's samples stacked (see [`crate::worker_protocol::Batch`]),
    /// under a quota of `millicores`, which the process's threads follow. No inputs: only
    /// tells the process its quota, so that it prepares its threads before the next batch.
    fn run(&mut self, inputs: Vec<FrameTensor>, millicores: u32) -> BoxFuture<'_, Result<BatchResult, WorkerError>>;
    /// Resolves when the process ends by itself, with how.
    fn exited(&mut self) -> BoxFuture<'_, String>;
    /// Stops the process, killing it if it has not ended within `grace`.
    fn stop(self: Box<Self>, grace: Duration) -> BoxFuture<'static, ()>;
    fn pid(&self) -> Option<u32>;
}

/// The agent's spawner: worker processes of its own binary, in cgroups of its subtree.
pub struct Processes {
    pub cgroups: CpuCgroups,
    pub config: ProcessConfig,
}

impl Spawner for Processes {
    fn cgroup(&self, id: &str) -> Result<WorkerCgroup, CgroupError> {
        self.cgroups.create(id)
    }

    fn spawn<'a>(
        &'a self,
        model: &'a Path,
        cgroup: &'a WorkerCgroup,
        millicores: u32,
    ) -> BoxFuture<'a, Result<Box<dyn ModelProcess>, WorkerError>> {
        async move {
            let p = WorkerProcess::spawn(&self.config, model, cgroup, millicores).await?;
            Ok(Box::new(p) as Box<dyn ModelProcess>)
        }
        .boxed()
    }

    fn load_timeout(&self) -> Duration {
        self.config.load_timeout
    }
}

impl ModelProcess for WorkerProcess {
    fn run(&mut self, inputs: Vec<FrameTensor>, millicores: u32) -> BoxFuture<'_, Result<BatchResult, WorkerError>> {
        WorkerProcess::run(self, inputs, millicores).boxed()
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        async move { format!("exited: {:?}", self.child.wait().await) }.boxed()
    }

    fn stop(self: Box<Self>, grace: Duration) -> BoxFuture<'static, ()> {
        WorkerProcess::stop(*self, grace).boxed()
    }

    fn pid(&self) -> Option<u32> {
        WorkerProcess::pid(self)
    }
}

/// What a worker tells its owner: that it serves (its process loaded the model) or that its
/// process died (the batcher restarts it).
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerEvent {
    Ready { id: String },
    Died { id: String, error: String },
}

/// Where a worker's events go: its owner's input queue, held weakly, so that the queue closes
/// when its owner's handles are gone, whatever workers still run.
#[derive(Clone)]
pub struct EventSink(Arc<dyn Fn(WorkerEvent) -> BoxFuture<'static, ()> + Send + Sync>);

impl EventSink {
    pub fn to<T: From<WorkerEvent> + Send + 'static>(queue: &tokio::sync::mpsc::Sender<T>) -> Self {
        let weak = queue.downgrade();
        Self(Arc::new(move |event| {
            let weak = weak.clone();
            async move {
                if let Some(queue) = weak.upgrade() {
                    // Fails only once the owner stopped reading: then nobody waits for it.
                    let _ = queue.send(event.into()).await;
                }
            }
            .boxed()
        }))
    }

    /// Events nobody waits for.
    pub fn none() -> Self {
        Self(Arc::new(|_| async {}.boxed()))
    }

    async fn send(&self, event: WorkerEvent) {
        (self.0)(event).await
    }
}

/// A running worker process and the pipes to it.
pub struct WorkerProcess {
    child: Child,
    tx: FramedWrite<ChildStdin, LengthDelimitedCodec>,
    rx: FramedRead<ChildStdout, LengthDelimitedCodec>,
    next_id: u64,
    /// `ProcessConfig::fixed_threads`.
    fixed_threads: Option<usize>,
    /// Its cgroup's memory limit file (None: no memory controller).
    memory_limit_file: Option<PathBuf>,
    /// The threads the process last ran a batch with, and the memory limit last read: the
    /// limit is read again for every batch while the process has not reached the threads
    /// wanted, which is when it may build a session.
    ran: (u32, u64),
}

/// Pipe buffer to and from a worker: the default most processes may ask for. With the default
/// 64 KiB, a batch of 16 64×64 images (786 KB) crossed in a dozen turns between the two
/// processes.
const PIPE_BYTES: i32 = 1 << 20;

/// Enlarges a pipe to [`PIPE_BYTES`]; where the system refuses, the pipe works as it is.
fn grow_pipe(pipe: &impl std::os::fd::AsRawFd) {
    if let Err(e) = nix::fcntl::fcntl(pipe.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES)) {
        tracing::debug!(error = %e, "keeping the default pipe size to the worker");
    }
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME).new_codec()
}

impl WorkerProcess {
    /// Starts a worker for `model`, moves it into `cgroup` at `millicores`, and waits until its
    /// session is ready.
    pub async fn spawn(
        cfg: &ProcessConfig,
        model: &Path,
        cgroup: &WorkerCgroup,
        millicores: u32,
    ) -> Result<Self, WorkerError> {
        let mut command = Command::new(&cfg.exe);
        command
            .arg("worker")
            .arg("--model")
            .arg(model)
            .arg("--ort-lib")
            .arg(&cfg.ort_lib)
            .arg("--threads")
            .arg(cfg.fixed_threads.unwrap_or_else(|| threads_for(millicores)).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some((uid, gid)) = cfg.run_as {
            // Supplementary groups are dropped too (std does so when root sets a uid).
            command.uid(uid).gid(gid);
        }
        let mut child = command.spawn().map_err(WorkerError::Spawn)?;
        let pid = child.id().ok_or_else(|| WorkerError::Gone("exited at once".into()))?;
        cgroup.set_millicores(millicores)?;
        cgroup.add_process(pid)?;
        let stdin = child.stdin.take().ok_or_else(|| WorkerError::Gone("no stdin".into()))?;
        let stdout = child.stdout.take().ok_or_else(|| WorkerError::Gone("no stdout".into()))?;
        grow_pipe(&stdin);
        grow_pipe(&stdout);
        let mut p = Self {
            child,
            tx: FramedWrite::new(stdin, codec()),
            rx: FramedRead::new(stdout, codec()),
            next_id: 0,
            fixed_threads: cfg.fixed_threads,
            memory_limit_file: cgroup.memory_limit_file(),
            ran: (0, 0),
        };
        let ready: Ready = match tokio::time::timeout(cfg.load_timeout, p.recv()).await {
            Err(_) => return Err(WorkerError::LoadTimeout(cfg.load_timeout)),
            Ok(r) => r?,
        };
        if !ready.error.is_empty() {
            return Err(WorkerError::Load(ready.error));
        }
        Ok(p)
    }

    async fn recv<M: Message + Default>(&mut self) -> Result<M, WorkerError> {
        match self.rx.next().await {
            Some(Ok(bytes)) => M::decode(bytes).map_err(|e| WorkerError::Gone(format!("bad frame: {e}"))),
            Some(Err(e)) => Err(WorkerError::Gone(e.to_string())),
            None => Err(WorkerError::Gone("closed its output".into())),
        }
    }

    /// Runs one batch: each input's samples stacked; every output comes back. The process
    /// runs with the threads of `millicores` (see [`ModelProcess::run`]).
    pub async fn run(&mut self, inputs: Vec<FrameTensor>, millicores: u32) -> Result<BatchResult, WorkerError> {
        self.next_id += 1;
        let threads = self.fixed_threads.unwrap_or_else(|| threads_for(millicores)) as u32;
        if threads != self.ran.0 {
            self.ran.1 = self.memory_limit_file.as_deref().map_or(0, crate::cgroup::memory_limit_in);
        }
        let batch = Batch { id: self.next_id, inputs, outputs: Vec::new(), threads, memory_limit: self.ran.1 };
        let frame = bytes::Bytes::from(batch.encode_to_vec());
        SinkExt::<bytes::Bytes>::send(&mut self.tx, frame)
            .await
            .map_err(|e: std::io::Error| WorkerError::Gone(e.to_string()))?;
        let result: BatchResult = self.recv().await?;
        if result.id != batch.id {
            return Err(WorkerError::Gone(format!("answered batch {} for {}", result.id, batch.id)));
        }
        self.ran.0 = result.threads;
        Ok(result)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The process's peak resident memory (`VmHWM`), bytes: since it started, or since the last
    /// [`WorkerProcess::reset_peak_memory`]. `None` when it cannot be read.
    pub fn peak_memory(&self) -> Option<u64> {
        crate::worker_process::process_memory(&self.pid()?.to_string()).map(|m| m.peak)
    }

    /// Starts the peak over from the memory resident now (`/proc/PID/clear_refs`, "5"), so that
    /// the next [`WorkerProcess::peak_memory`] is what ran since. Where that is refused the
    /// peak stays the process's since its start: larger, never smaller.
    pub fn reset_peak_memory(&self) {
        if let Some(pid) = self.pid() {
            if let Err(e) = std::fs::write(format!("/proc/{pid}/clear_refs"), "5") {
                tracing::debug!(error = %e, pid, "the worker's peak memory is not reset");
            }
        }
    }

    /// Closes the worker's input so it exits, and kills it if it has not within `grace`.
    pub async fn stop(mut self, grace: Duration) {
        let _ = SinkExt::<bytes::Bytes>::close(&mut self.tx).await;
        if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// What the batcher may change at any time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchSettings {
    pub max_batch: u32,
    pub max_delay: Duration,
}

/// Served batches kept between two telemetry reports: a report a second carries at most this
/// many per worker (enough for a median; a fast worker's older batches say nothing newer).
pub const MAX_SERVED_KEPT: usize = 64;

/// The batches a worker served since its last report, written by its batcher and taken by the
/// telemetry report (a lock held for a push or a swap, never across anything else).
#[derive(Default)]
struct ServedBatches(std::sync::Mutex<std::collections::VecDeque<tidal_proto::v1::ServedBatch>>);

impl ServedBatches {
    fn push(&self, b: tidal_proto::v1::ServedBatch) {
        let mut kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() == MAX_SERVED_KEPT {
            kept.pop_front();
        }
        kept.push_back(b);
    }

    fn take(&self) -> Vec<tidal_proto::v1::ServedBatch> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner())).into()
    }
}

/// What identifies a worker's model.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub id: String,
    pub task: String,
    pub stage: String,
    /// Which replica of (task, variant) on this node.
    pub replica: u32,
    pub variant: tidal_proto::v1::VariantSpec,
    pub model_path: PathBuf,
    /// What the stage's model takes and gives.
    pub io: Arc<StageIo>,
    /// Text around the model (a tokenizer, decoded outputs), when its stage has any.
    pub text: Option<Arc<tidal_common::text::StageText>>,
}

impl WorkerSpec {
    /// Its identity in the plan.
    pub fn key(&self) -> tidal_common::reconcile::WorkerKey {
        tidal_common::reconcile::WorkerKey {
            task: self.task.clone(),
            stage: self.stage.clone(),
            variant: self.variant.name.clone(),
            replica: self.replica,
        }
    }
}

/// The agent's handle on one worker.
pub struct Worker {
    pub spec: WorkerSpec,
    pub queue: Arc<DeadlineQueue>,
    pub cgroup: Arc<WorkerCgroup>,
    settings: watch::Sender<BatchSettings>,
    /// The quota, which the batcher follows (a restart starts at it; the process's threads
    /// follow it).
    millicores: watch::Sender<u32>,
    /// The intra-op threads its process last ran a batch with (0: none yet).
    threads: Arc<AtomicU32>,
    served: Arc<ServedBatches>,
    ready: Arc<AtomicBool>,
    /// Milliseconds its process took from spawn to serving, the last time it started.
    load_ms: Arc<AtomicU32>,
    restarts: Arc<AtomicU32>,
    /// The memory the plan gives it, bytes (0: not planned); its cgroup's limit follows
    /// ([`tidal_common::memory::cgroup_limit`]).
    memory_bytes: AtomicU64,
    /// The memory its plan gives it, limited or not: what it holds for the node's count
    /// (raised with its limit).
    planned_memory_bytes: AtomicU64,
    stop: CancellationToken,
    /// Cancelled once it has stopped: its process ended, its cgroup removed.
    gone: CancellationToken,
    batcher: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Worker {
    /// Queues one request (its inputs checked against the stage, one sample each) for a
    /// batch of requests it can share one with.
    pub fn submit(
        &self,
        deadline: Instant,
        inputs: Vec<NamedTensor>,
        reply: crate::queue::Reply,
    ) -> Result<(), (ServeError, crate::queue::Reply)> {
        let key = self.spec.io.batch_key(&inputs);
        self.queue.push(deadline, key, inputs, reply)
    }

    /// Creates the worker and starts its batcher, which starts the process once `gate` is
    /// done (the room it needs made: other workers stopped), at once without one; `cgroup`
    /// already limited to what `memory_bytes` allows, `planned_memory_bytes` what the plan
    /// gives it.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        spec: WorkerSpec,
        cgroup: WorkerCgroup,
        millicores: u32,
        memory_bytes: u64,
        planned_memory_bytes: u64,
        gate: Option<futures::future::BoxFuture<'static, ()>>,
        settings: BatchSettings,
        queue_capacity: usize,
        spawner: Arc<dyn Spawner>,
        events: EventSink,
    ) -> Arc<Self> {
        let (settings_tx, settings_rx) = watch::channel(settings);
        let (millicores_tx, millicores_rx) = watch::channel(millicores);
        let worker = Arc::new(Self {
            spec,
            queue: Arc::new(DeadlineQueue::new(queue_capacity)),
            cgroup: Arc::new(cgroup),
            settings: settings_tx,
            millicores: millicores_tx,
            threads: Arc::new(AtomicU32::new(0)),
            served: Arc::new(ServedBatches::default()),
            ready: Arc::new(AtomicBool::new(false)),
            load_ms: Arc::new(AtomicU32::new(0)),
            restarts: Arc::new(AtomicU32::new(0)),
            memory_bytes: AtomicU64::new(memory_bytes),
            planned_memory_bytes: AtomicU64::new(planned_memory_bytes),
            stop: CancellationToken::new(),
            gone: CancellationToken::new(),
            batcher: tokio::sync::Mutex::new(None),
        });
        let ctx = BatcherCtx {
            spec: worker.spec.clone(),
            queue: worker.queue.clone(),
            cgroup: worker.cgroup.clone(),
            settings: settings_rx,
            millicores: millicores_rx,
            threads: worker.threads.clone(),
            served: worker.served.clone(),
            ready: worker.ready.clone(),
            load_ms: worker.load_ms.clone(),
            restarts: worker.restarts.clone(),
            stop: worker.stop.clone(),
            spawner,
            events,
        };
        let span = info_span!("worker", id = %worker.spec.id, variant = %worker.spec.variant.name);
        let handle = tokio::spawn(ctx.run(gate).instrument(span));
        if let Ok(mut slot) = worker.batcher.try_lock() {
            *slot = Some(handle);
        }
        worker
    }

    pub fn millicores(&self) -> u32 {
        *self.millicores.borrow()
    }

    /// The intra-op threads its process last ran a batch with (0: none yet).
    pub fn threads(&self) -> u32 {
        self.threads.load(Ordering::Relaxed)
    }

    /// The batches it served since the last call (the latest [`MAX_SERVED_KEPT`]).
    pub fn take_served(&self) -> Vec<tidal_proto::v1::ServedBatch> {
        self.served.take()
    }

    pub fn settings(&self) -> BatchSettings {
        *self.settings.borrow()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::Relaxed)
    }

    pub fn load_ms(&self) -> u32 {
        self.load_ms.load(Ordering::Relaxed)
    }

    /// The memory its cgroup is limited for (0: not planned, or not limited).
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes.load(Ordering::Relaxed)
    }

    /// The memory its plan gives it (0: not planned), limited or not.
    pub fn planned_memory_bytes(&self) -> u64 {
        self.planned_memory_bytes.load(Ordering::Relaxed)
    }

    /// Whether it has stopped (its process ended, its cgroup removed).
    pub fn is_gone(&self) -> bool {
        self.gone.is_cancelled()
    }

    /// Done once it has stopped.
    pub fn gone(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.gone.clone().cancelled_owned()
    }

    /// Limits its cgroup to what `memory_bytes` planned allows, in place. The plan's figure
    /// is what it counts for from now on, whether or not the limit could be set.
    pub fn limit_memory(&self, memory_bytes: u64) -> Result<(), CgroupError> {
        self.planned_memory_bytes.store(memory_bytes, Ordering::Relaxed);
        let limit = tidal_common::memory::cgroup_limit(memory_bytes);
        // A limit under what the process holds would have the kernel reclaim, then kill it
        // with its queue (v2), or refuse (v1 EBUSY): refused here, alike on both.
        match self.cgroup.memory_usage() {
            Some(holds) if limit > 0 && holds > limit => return Err(CgroupError::UnderUsage { holds, limit }),
            _ => {}
        }
        self.cgroup.set_memory_limit(limit)?;
        self.memory_bytes.store(memory_bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Resizes the worker in place: one write to its cgroup, no restart.
    pub fn resize(&self, millicores: u32) -> Result<(), CgroupError> {
        self.cgroup.set_millicores(millicores)?;
        self.millicores.send_replace(millicores);
        self.queue.forget_estimate();
        Ok(())
    }

    pub fn set_batching(&self, settings: BatchSettings) {
        self.settings.send_replace(settings);
    }

    /// Stops taking requests, serves those already queued (for at most `drain`), then stops
    /// the process and removes the cgroup.
    pub async fn shutdown(&self, drain: Duration) {
        self.queue.seal();
        let started = Instant::now();
        while !self.queue.is_empty() && started.elapsed() < drain && self.is_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.queue.close("the worker was stopped");
        self.stop.cancel();
        if let Some(handle) = self.batcher.lock().await.take() {
            let _ = handle.await;
        }
        self.cgroup.remove();
        self.gone.cancel();
    }
}

struct BatcherCtx {
    spec: WorkerSpec,
    queue: Arc<DeadlineQueue>,
    cgroup: Arc<WorkerCgroup>,
    settings: watch::Receiver<BatchSettings>,
    millicores: watch::Receiver<u32>,
    threads: Arc<AtomicU32>,
    served: Arc<ServedBatches>,
    ready: Arc<AtomicBool>,
    load_ms: Arc<AtomicU32>,
    restarts: Arc<AtomicU32>,
    stop: CancellationToken,
    spawner: Arc<dyn Spawner>,
    events: EventSink,
}

enum Exit {
    Stopped,
    Died(WorkerError),
}

impl BatcherCtx {
    async fn run(self, gate: Option<futures::future::BoxFuture<'static, ()>>) {
        if let Some(gate) = gate {
            info!("the worker waits for the memory of workers that stop to make room");
            tokio::select! {
                _ = gate => {}
                _ = self.stop.cancelled() => return,
            }
        }
        let mut backoff = Duration::from_millis(200);
        let mut oom_kills = self.cgroup.oom_kills();
        while !self.stop.is_cancelled() {
            let spawning = Instant::now();
            // A worker stopped while it loads stops at once (the process is killed).
            let spawned = tokio::select! {
                spawned = self.spawner.spawn(&self.spec.model_path, &self.cgroup, *self.millicores.borrow()) => spawned,
                _ = self.stop.cancelled() => break,
            };
            let mut proc = match spawned {
                Ok(p) => p,
                Err(e) => {
                    self.say_if_oom_killed(&mut oom_kills);
                    warn!(error = %e, retry_in = ?backoff, "worker failed to start");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.stop.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            let load_ms = spawning.elapsed().as_millis().min(u32::MAX as u128) as u32;
            self.load_ms.store(load_ms, Ordering::Relaxed);
            info!(pid = ?proc.pid(), millicores = *self.millicores.borrow(), load_ms, "worker ready");
            self.ready.store(true, Ordering::Relaxed);
            self.events.send(WorkerEvent::Ready { id: self.spec.id.clone() }).await;
            backoff = Duration::from_millis(200);
            let exit = self.serve(proc.as_mut()).await;
            self.ready.store(false, Ordering::Relaxed);
            match exit {
                Exit::Stopped => {
                    proc.stop(Duration::from_secs(5)).await;
                    break;
                }
                Exit::Died(e) => {
                    self.restarts.fetch_add(1, Ordering::Relaxed);
                    self.say_if_oom_killed(&mut oom_kills);
                    warn!(error = %e, "worker died; restarting it");
                    proc.stop(Duration::from_millis(100)).await;
                    self.events.send(WorkerEvent::Died { id: self.spec.id.clone(), error: e.to_string() }).await;
                }
            }
        }
    }

    /// Says so when the kernel's OOM killer killed a process of the worker since `seen` (its
    /// cgroup's count), which it then updates.
    fn say_if_oom_killed(&self, seen: &mut u64) {
        let now = self.cgroup.oom_kills();
        if now > *seen {
            warn!(
                oom_kills = now,
                "the worker was killed by the kernel's OOM killer: it went over its memory limit (its variant's memory \
                 profile is raised by the controller)"
            );
            *seen = now;
        }
    }

    /// Waits for requests, forms batches, runs them, until stopped or the process dies.
    async fn serve(&self, proc: &mut dyn ModelProcess) -> Exit {
        let generate = self.spec.text.as_ref().and_then(|t| t.spec.generate.as_ref());
        let mut token_cost = tidal_common::generation::TokenCost::default();
        // A resize while idle is passed on at once, so the process has its threads for the
        // quota before the next batch (a batch passes it on too).
        let mut quota = self.millicores.clone();
        quota.mark_unchanged();
        // When the last batch ended: a batch that starts more than `IDLE_GAP` later runs from
        // idle (threads parked, caches taken by others), which profiles (batches back to back)
        // never measure; it is reported as such and not compared with the profile.
        let mut last_done: Option<Instant> = None;
        loop {
            while self.queue.is_empty() {
                tokio::select! {
                    _ = self.queue.notify.notified() => {}
                    Ok(()) = quota.changed() => {
                        let millicores = *quota.borrow_and_update();
                        if let Err(e) = proc.run(Vec::new(), millicores).await {
                            return Exit::Died(e);
                        }
                    }
                    _ = self.stop.cancelled() => return Exit::Stopped,
                    how = proc.exited() => return Exit::Died(WorkerError::Gone(how)),
                }
            }
            let mut settings = *self.settings.borrow();
            if !self.spec.io.batched {
                // A model without a batch dimension runs one request at a time.
                settings.max_batch = 1;
            }
            self.wait_for_batch(settings).await;
            let mut batch = self.queue.pop_batch(settings.max_batch as usize, Instant::now());
            if batch.is_empty() {
                continue;
            }
            if let Some(g) = generate {
                crate::generation::fill_budgets(&self.spec.io, g, &mut batch, Instant::now(), &token_cost);
            }
            let size = batch.len();
            let sample_size = batch
                .iter()
                .filter_map(|p| p.inputs.first().and_then(|t| tidal_common::tensor::element_count(&t.shape)))
                .max()
                .unwrap_or(0) as u64;
            let names = &self.spec.variant.tensor_names;
            let inputs = match stack(&self.spec.io, &batch) {
                Ok(inputs) => renamed(inputs, |stage| names.get(stage)),
                Err(why) => {
                    for p in batch {
                        let _ = p.reply.send(Err(ServeError::Model(why.clone())));
                    }
                    continue;
                }
            };
            let started = Instant::now();
            let millicores = *quota.borrow_and_update();
            match proc.run(inputs, millicores).await {
                Ok(mut result) if result.error.is_empty() => {
                    self.threads.store(result.threads, Ordering::Relaxed);
                    let done = Instant::now();
                    // A session swapped or rebuilt in place before the batch held its
                    // requests, but is not what the model takes: neither the queue's estimate
                    // nor the profile's.
                    let mut took =
                        done.saturating_duration_since(started).saturating_sub(Duration::from_micros(result.setup_us));
                    self.served.push(tidal_proto::v1::ServedBatch {
                        batch: size as u32,
                        millicores,
                        run_ms: took.as_secs_f64() * 1e3,
                        size: sample_size,
                        after_idle: last_done.is_none_or(|d| started.saturating_duration_since(d) > IDLE_GAP),
                    });
                    last_done = Some(done);
                    if let Some(g) = generate {
                        let model_name = names.get(&g.output).map_or(g.output.as_str(), String::as_str);
                        let steps = crate::generation::steps_taken(&result.outputs, [&g.output, model_name]);
                        token_cost.observe(steps, Duration::from_micros(result.run_us));
                        took = token_cost.shedding_time(took, g.refuse_unfinished);
                    }
                    self.queue.record_batch(size, took, done);
                    // Answered under the stage's names.
                    let outputs = std::mem::take(&mut result.outputs);
                    result.outputs = renamed(outputs, |model| names.iter().find(|(_, m)| *m == model).map(|(s, _)| s));
                    reply_batch(&self.spec.io, batch, result, started)
                }
                Ok(result) => {
                    for p in batch {
                        let _ = p.reply.send(Err(ServeError::Model(result.error.clone())));
                    }
                }
                Err(e) => {
                    for p in batch {
                        let _ = p
                            .reply
                            .send(Err(ServeError::Unavailable("the worker died while running the batch".into())));
                    }
                    return Exit::Died(e);
                }
            }
        }
    }

    /// Lets a batch fill: until it is full or the oldest request has waited `max_delay`.
    async fn wait_for_batch(&self, settings: BatchSettings) {
        if settings.max_batch <= 1 || settings.max_delay.is_zero() {
            return;
        }
        let Some(oldest) = self.queue.oldest_arrival() else {
            return;
        };
        let until = tokio::time::Instant::from_std(oldest + settings.max_delay);
        while self.queue.len() < settings.max_batch as usize && tokio::time::Instant::now() < until {
            tokio::select! {
                _ = self.queue.notify.notified() => {}
                _ = tokio::time::sleep_until(until) => break,
                _ = self.stop.cancelled() => break,
            }
        }
    }
}

/// The batch's inputs: each input's samples stacked along a leading batch dimension (one
/// sample as it is, for a model without one). A stage without a signature feeds the model's
/// first input, whatever its name. A request whose tensors are not the ones this worker's model
/// takes (checked against a task registered anew since the worker started) fails the batch
/// with the reason, never the batcher.
fn stack(io: &StageIo, batch: &[Pending]) -> Result<Vec<FrameTensor>, String> {
    let mut inputs = Vec::with_capacity(io.inputs.len());
    for (i, declared) in io.inputs.iter().enumerate() {
        fn tensor<'a>(p: &'a Pending, i: usize, declared: &Declared) -> Result<&'a NamedTensor, String> {
            p.inputs.get(i).filter(|t| t.name == declared.name && t.element == declared.element).ok_or_else(|| {
                format!("the request does not carry input {:?} as this worker's model takes it", declared.name)
            })
        }
        let first = tensor(&batch[0], i, declared)?;
        // One sample's shape in the batch: every request's, or along a padded dimension the
        // longest request's (the batch key let only such requests in).
        let mut sample = first.shape.clone();
        let padded = io.pad.iter().find(|p| p.input == i);
        if let Some(p) = padded {
            for r in batch {
                let t = tensor(r, i, declared)?;
                if t.shape.len() != sample.len() || p.axis >= sample.len() {
                    return Err(format!("input {:?} has shape {:?} beside {:?}", declared.name, t.shape, sample));
                }
                sample[p.axis] = sample[p.axis].max(t.shape[p.axis]);
            }
        }
        let mut shape = Vec::with_capacity(sample.len() + 1);
        if io.batched {
            shape.push(batch.len() as i64);
        }
        shape.extend_from_slice(&sample);
        let mut data = Vec::with_capacity(first.data.len() * batch.len());
        for r in batch {
            let t = tensor(r, i, declared)?;
            match padded {
                Some(p) if t.shape[p.axis] < sample[p.axis] => {
                    let size = declared.element.size().unwrap_or(1);
                    data.extend(tidal_common::padding::pad(&t.data, &t.shape, size, p.axis, sample[p.axis], &p.fill));
                }
                _ => data.extend_from_slice(&t.data),
            }
        }
        let name = if io.positional { String::new() } else { declared.name.clone() };
        inputs.push(FrameTensor { name, datatype: declared.element.v2_name().into(), shape, data });
    }
    if let Some(p) = batch.iter().find(|p| p.inputs.len() != io.inputs.len()) {
        return Err(format!(
            "the request carries {} inputs; this worker's model takes {}",
            p.inputs.len(),
            io.inputs.len()
        ));
    }
    Ok(inputs)
}

/// Splits a batch's outputs among its requests: row `i` of every output to request `i` (a
/// model without a batch dimension answers its one request whole). A stage without a
/// signature answers with the model's first output.
fn reply_batch(io: &StageIo, batch: Vec<Pending>, result: BatchResult, started: Instant) {
    let n = batch.len();
    let mut outputs = result.outputs;
    if io.positional {
        outputs.truncate(1);
        if let Some(o) = outputs.first_mut() {
            o.name = POSITIONAL_OUTPUT.into();
        }
    }
    let rows = match split_rows(io.batched, n, outputs) {
        Ok(rows) => rows,
        Err(why) => {
            for p in batch {
                let _ = p.reply.send(Err(ServeError::Model(why.clone())));
            }
            return;
        }
    };
    for (p, mut outputs) in batch.into_iter().zip(rows) {
        trim(io, &p, &mut outputs);
        let served = Served {
            outputs,
            batch_size: n as u32,
            // Waiting for a session swapped or rebuilt in place is waiting too.
            queue_us: (started.saturating_duration_since(p.enqueued).as_micros() as u64)
                .saturating_add(result.setup_us),
            run_us: result.run_us,
        };
        let _ = p.reply.send(Ok(served));
    }
}

/// Tensors given the names `map` gives their names (the variant's model's names for the
/// stage's, or back); the others as they are.
fn renamed<'a>(mut tensors: Vec<FrameTensor>, map: impl Fn(&str) -> Option<&'a String>) -> Vec<FrameTensor> {
    for t in &mut tensors {
        if let Some(name) = map(&t.name) {
            t.name = name.clone();
        }
    }
    tensors
}

/// Cuts the outputs that follow the padded length back to the request's own length.
fn trim(io: &StageIo, request: &Pending, outputs: &mut [NamedTensor]) {
    let Some(len) = io.padded_length(&request.inputs) else { return };
    for t in &io.trim {
        // By name: another variant of the stage may give its outputs in another order.
        let Some(o) = outputs.iter_mut().find(|o| o.name == io.outputs[t.output].name) else { continue };
        // A row: [1, sample…].
        let axis = t.axis + 1;
        let (Some(&have), Some(size)) = (o.shape.get(axis), o.element.size()) else { continue };
        // Only an output whose data is as long as its shape says (the model's, not checked).
        if tidal_common::tensor::element_count(&o.shape).and_then(|n| n.checked_mul(size)) != Some(o.data.len()) {
            continue;
        }
        if len < have {
            o.data = tidal_common::padding::cut(&o.data, &o.shape[1..], size, t.axis, len);
            o.shape[axis] = len;
        }
    }
}

/// Each of `n` requests' outputs: row `i` of each output (with a leading dimension of 1) when
/// `batched`, else the outputs whole (then `n` is 1).
fn split_rows(batched: bool, n: usize, outputs: Vec<FrameTensor>) -> Result<Vec<Vec<NamedTensor>>, String> {
    let mut rows: Vec<Vec<NamedTensor>> = (0..n).map(|_| Vec::with_capacity(outputs.len())).collect();
    for o in outputs {
        let element = ElementType::from_v2_name(&o.datatype)
            .ok_or_else(|| format!("output {:?} has the unknown type {:?}", o.name, o.datatype))?;
        if !batched {
            rows[0].push(NamedTensor { name: o.name, element, shape: o.shape, data: o.data });
            continue;
        }
        if o.shape.first() != Some(&(n as i64)) || o.data.len() % n != 0 {
            return Err(format!("output {:?} has shape {:?} for a batch of {n}", o.name, o.shape));
        }
        let row_bytes = o.data.len() / n;
        let shape: Vec<i64> = std::iter::once(1).chain(o.shape[1..].iter().copied()).collect();
        for (i, row) in rows.iter_mut().enumerate() {
            let data = o.data[i * row_bytes..(i + 1) * row_bytes].to_vec();
            row.push(NamedTensor { name: o.name.clone(), element, shape: shape.clone(), data });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: &str, shape: &[i64], values: &[f32]) -> FrameTensor {
        let data = bytemuck::cast_slice(values).to_vec();
        FrameTensor { name: name.into(), datatype: "FP32".into(), shape: shape.to_vec(), data }
    }

    #[test]
    fn each_request_gets_its_row_of_every_output() {
        let outputs = vec![frame("a", &[2, 2], &[1.0, 2.0, 3.0, 4.0]), frame("b", &[2], &[5.0, 6.0])];
        let rows = split_rows(true, 2, outputs).unwrap();
        assert_eq!(rows[1][0].shape, vec![1, 2]);
        assert_eq!(rows[1][0].f32_values().unwrap(), vec![3.0, 4.0]);
        assert_eq!((rows[1][1].name.as_str(), rows[1][1].f32_values().unwrap()), ("b", vec![6.0]));
        assert!(split_rows(true, 3, vec![frame("a", &[2, 2], &[1.0, 2.0, 3.0, 4.0])]).is_err());
        let whole = split_rows(false, 1, vec![frame("s", &[2, 2], &[1.0, 2.0, 3.0, 4.0])]).unwrap();
        assert_eq!(whole[0][0].shape, vec![2, 2]);
    }

    #[test]
    fn requests_that_do_not_fit_the_worker_s_model_fail_their_batch_not_the_batcher() {
        let sig = |name: &str, datatype: &str, shape: &[i64]| tidal_proto::v1::TensorSignature {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            max_shape: vec![],
            min_shape: vec![],
        };
        let io = StageIo::of(&tidal_proto::v1::StageSpec {
            inputs: vec![sig("a", "FP32", &[-1, 2]), sig("b", "INT64", &[-1])],
            outputs: vec![sig("y", "FP32", &[-1, 2])],
            ..Default::default()
        })
        .unwrap();
        let a = NamedTensor::f32("a", vec![2], &[1.0, 2.0]);
        let b = NamedTensor {
            name: "b".into(),
            element: ElementType::Int64,
            shape: vec![],
            data: 7i64.to_le_bytes().to_vec(),
        };
        // The callers stay (a request whose caller is gone is never batched).
        let mut callers = Vec::new();
        let mut batch_of = |inputs: Vec<Vec<NamedTensor>>| {
            let q = crate::queue::DeadlineQueue::new(8);
            let deadline = Instant::now() + Duration::from_secs(10);
            for tensors in inputs {
                let (tx, rx) = tokio::sync::oneshot::channel();
                callers.push(rx);
                q.push(deadline, io.batch_key(&tensors), tensors, tx).map_err(|(e, _)| e).unwrap();
            }
            q.pop_batch(8, Instant::now())
        };
        let good = stack(&io, &batch_of(vec![vec![a.clone(), b.clone()], vec![a.clone(), b.clone()]])).unwrap();
        assert_eq!((good[0].shape.clone(), good[1].shape.clone()), (vec![2, 2], vec![2]));
        assert_eq!(good[1].data.len(), 16);
        // As a task registered anew with other inputs would send them: an error, not a panic.
        assert!(stack(&io, &batch_of(vec![vec![a.clone()]])).is_err());
        assert!(stack(&io, &batch_of(vec![vec![b.clone(), a.clone()]])).is_err());
        assert!(stack(&io, &batch_of(vec![vec![a.clone(), b.clone(), b]])).is_err());
    }

    #[test]
    fn requests_of_different_lengths_share_a_padded_batch_and_get_their_own_lengths_back() {
        use tidal_proto::v1::{Padding, TensorSignature, Trim};
        let sig = |name: &str, datatype: &str, shape: &[i64]| TensorSignature {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            max_shape: vec![],
            min_shape: vec![],
        };
        let io = StageIo::of(&tidal_proto::v1::StageSpec {
            name: "encode".into(),
            inputs: vec![sig("ids", "INT64", &[-1, -1]), sig("scale", "FP32", &[-1, 2])],
            outputs: vec![sig("hidden", "FP32", &[-1, -1, 2]), sig("pooled", "FP32", &[-1, 2])],
            pad: vec![Padding { input: "ids".into(), axis: 1, value: -7.0 }],
            trim: vec![Trim { output: "hidden".into(), axis: 1 }],
            ..Default::default()
        })
        .unwrap();
        let ids = |values: &[i64]| NamedTensor {
            name: "ids".into(),
            element: ElementType::Int64,
            shape: vec![values.len() as i64],
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let scale = NamedTensor::f32("scale", vec![2], &[1.0, 2.0]);
        let q = crate::queue::DeadlineQueue::new(8);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut callers = Vec::new();
        // Lengths 3 and 4 (both round up to 4) share a batch; 5 would not.
        for request in [
            vec![ids(&[1, 2, 3]), scale.clone()],
            vec![ids(&[4, 5, 6, 7]), scale.clone()],
            vec![ids(&[1, 2, 3, 4, 5]), scale.clone()],
        ] {
            let (tx, rx) = tokio::sync::oneshot::channel();
            callers.push(rx);
            q.push(deadline, io.batch_key(&request), request, tx).map_err(|(e, _)| e).unwrap();
        }
        // Different lengths, one key: one batch, padded to the longest.
        let batch = q.pop_batch(8, Instant::now());
        assert_eq!(batch.len(), 2);
        assert_eq!(q.len(), 1, "the request of length 5 waits for a batch of its own bucket");
        callers.pop();
        let stacked = stack(&io, &batch).unwrap();
        assert_eq!(stacked[0].shape, vec![2, 4]);
        let values: Vec<i64> =
            stacked[0].data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
        // In deadline order, then arrival: the request of length 3 first, padded with -7.
        assert_eq!(values, vec![1, 2, 3, -7, 4, 5, 6, 7]);
        assert_eq!(stacked[1].shape, vec![2, 2]);
        // The model answers [2, 4, 2] and [2, 2]; each request gets its own length of hidden.
        let hidden: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let result = BatchResult {
            id: 1,
            error: String::new(),
            run_us: 5,
            outputs: vec![frame("hidden", &[2, 4, 2], &hidden), frame("pooled", &[2, 2], &[9.0, 8.0, 7.0, 6.0])],
            threads: 1,
            setup_us: 0,
        };
        reply_batch(&io, batch, result, Instant::now());
        let answers: Vec<Served> = callers.into_iter().map(|mut rx| rx.try_recv().unwrap().unwrap()).collect();
        assert_eq!(answers[0].outputs[0].shape, vec![1, 3, 2]);
        assert_eq!(answers[0].outputs[0].f32_values().unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(answers[1].outputs[0].shape, vec![1, 4, 2]);
        assert_eq!(answers[1].outputs[0].f32_values().unwrap(), (8..16).map(|v| v as f32).collect::<Vec<_>>());
        assert_eq!(answers[1].outputs[1].f32_values().unwrap(), vec![7.0, 6.0]);
        // Padded inputs of one request must agree on their length.
        let two = StageIo::of(&tidal_proto::v1::StageSpec {
            name: "encode".into(),
            inputs: vec![sig("ids", "INT64", &[-1, -1]), sig("mask", "INT64", &[-1, -1])],
            outputs: vec![sig("pooled", "FP32", &[-1, 2])],
            pad: vec![
                Padding { input: "ids".into(), axis: 1, value: 0.0 },
                Padding { input: "mask".into(), axis: 1, value: 0.0 },
            ],
            ..Default::default()
        })
        .unwrap();
        let mut mask = ids(&[1, 1, 1]);
        mask.name = "mask".into();
        let err = two.sample(vec![ids(&[1, 2]), mask]).unwrap_err();
        assert!(err.to_string().contains("ids 2, mask 3"), "{err}");
    }
}
