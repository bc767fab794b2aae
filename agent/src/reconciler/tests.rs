//! The reconciler with a fake spawner: no root, no ONNX Runtime, faults on demand.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicUsize;

use futures::future::BoxFuture;
use futures::FutureExt;
use prost::Message;
use tidal_proto::onnx::{
    tensor_shape_proto::dimension, tensor_shape_proto::Dimension, type_proto, GraphProto, ModelProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
};
use tidal_proto::v1::{Assignment, VariantSpec};
use tokio::sync::{Notify, Semaphore};

use super::*;
use crate::cgroup::{CgroupDriverChoice, CpuCgroups};
use crate::error::ServeError;
use crate::router::Target;
use crate::worker::{ModelProcess, WorkerError};
use crate::worker_protocol::BatchResult;

const NODE: &str = "n1";
const TASK: &str = "t";
/// Long enough never to be what releases a test's pending action.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// The fake machine's state, by model file.
#[derive(Default)]
struct Machine {
    /// Loads of a model wait for a permit (no entry: they load at once).
    gates: HashMap<String, Arc<Semaphore>>,
    /// How many of a model's next loads fail (at once, before any gate).
    failures: HashMap<String, usize>,
    /// The cgroup (counted from 0) whose creation fails.
    cgroup_fails_at: Option<usize>,
    cgroups_made: usize,
    /// Every load attempt, by model file, in order.
    loads: Vec<String>,
    /// What kills each live process of a model.
    live: HashMap<String, Vec<Arc<Notify>>>,
}

struct FakeSpawner {
    machine: Mutex<Machine>,
    none: CpuCgroups,
    /// How many processes were stopped.
    stopped: Arc<AtomicUsize>,
}

impl FakeSpawner {
    fn new() -> Arc<Self> {
        let none = CpuCgroups::setup(CgroupDriverChoice::None, "fake").unwrap();
        Arc::new(Self { machine: Mutex::default(), none, stopped: Arc::default() })
    }

    fn with<R>(&self, f: impl FnOnce(&mut Machine) -> R) -> R {
        f(&mut self.machine.lock().unwrap())
    }

    /// Holds the loads of `model` until [`Self::open`].
    fn gate(&self, model: &str) {
        self.with(|m| m.gates.insert(model.into(), Arc::new(Semaphore::new(0))));
    }

    fn open(&self, model: &str) {
        self.with(|m| m.gates.get(model).unwrap().add_permits(1000));
    }

    fn loads_of(&self, model: &str) -> usize {
        self.with(|m| m.loads.iter().filter(|l| *l == model).count())
    }

    /// Kills the live processes of `model` (their batchers restart them).
    fn kill(&self, model: &str) {
        let live = self.with(|m| m.live.remove(model).unwrap_or_default());
        assert!(!live.is_empty(), "no live process of {model}");
        for k in live {
            k.notify_one();
        }
    }
}

impl Spawner for FakeSpawner {
    fn cgroup(&self, id: &str) -> Result<WorkerCgroup, CgroupError> {
        let fail = self.with(|m| {
            let n = m.cgroups_made;
            m.cgroups_made += 1;
            m.cgroup_fails_at == Some(n)
        });
        if fail {
            let source = std::io::Error::other("injected");
            return Err(CgroupError::Io { action: "create", path: id.into(), source });
        }
        self.none.create(id)
    }

    fn spawn<'a>(
        &'a self,
        model: &'a Path,
        _: &'a WorkerCgroup,
        _: u32,
    ) -> BoxFuture<'a, Result<Box<dyn ModelProcess>, WorkerError>> {
        async move {
            let name = model.file_name().unwrap().to_string_lossy().to_string();
            let (gate, fail) = self.with(|m| {
                m.loads.push(name.clone());
                let fail = m.failures.get_mut(&name).filter(|n| **n > 0).map(|n| *n -= 1).is_some();
                (m.gates.get(&name).cloned(), fail)
            });
            if fail {
                return Err(WorkerError::Load("injected load failure".into()));
            }
            if let Some(gate) = gate {
                gate.acquire().await.unwrap().forget();
            }
            let kill = Arc::new(Notify::new());
            self.with(|m| m.live.entry(name).or_default().push(kill.clone()));
            Ok(Box::new(FakeProcess { kill, stopped: self.stopped.clone() }) as Box<dyn ModelProcess>)
        }
        .boxed()
    }

    fn load_timeout(&self) -> Duration {
        LOAD_TIMEOUT
    }
}

/// Echoes each batch back.
struct FakeProcess {
    kill: Arc<Notify>,
    stopped: Arc<AtomicUsize>,
}

impl ModelProcess for FakeProcess {
    fn run(&mut self, shape: Vec<i64>, data: Vec<u8>) -> BoxFuture<'_, Result<BatchResult, WorkerError>> {
        async move { Ok(BatchResult { id: 0, shape, data, error: String::new(), run_us: 1 }) }.boxed()
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        async move {
            self.kill.notified().await;
            "killed".to_string()
        }
        .boxed()
    }

    fn stop(self: Box<Self>, _: Duration) -> BoxFuture<'static, ()> {
        self.stopped.fetch_add(1, Ordering::Relaxed);
        async {}.boxed()
    }

    fn pid(&self) -> Option<u32> {
        None
    }
}

/// A model that takes `[batch, 3]`.
fn model_file() -> Vec<u8> {
    let dim = |value| Dimension { value: Some(value) };
    let input = ValueInfoProto {
        name: "input".into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: 1,
                shape: Some(TensorShapeProto {
                    dim: vec![dim(dimension::Value::DimParam("N".into())), dim(dimension::Value::DimValue(3))],
                }),
            })),
        }),
    };
    let graph = GraphProto { input: vec![input], ..Default::default() };
    ModelProto { graph: Some(graph), ..Default::default() }.encode_to_vec()
}

fn variant(name: &str) -> VariantSpec {
    VariantSpec { name: name.into(), model_file: format!("{name}.onnx"), accuracy: 70.0, input_shape: vec![3] }
}

/// A plan of task `t` running `workers` (variant, millicores) on this node.
fn plan(epoch: u64, workers: &[(&str, u32)]) -> Plan {
    let variants = ["a", "b", "c"].map(variant).to_vec();
    Plan {
        epoch,
        term: 1,
        tasks: vec![tidal_common::task::single_stage(TASK, 10_000, variants)],
        assignments: workers
            .iter()
            .map(|(v, millicores)| Assignment {
                node: NODE.into(),
                task: TASK.into(),
                stage: TASK.into(),
                variant: Some(variant(v)),
                millicores: *millicores,
                max_batch: 1,
                weight: 1.0 / workers.len() as f64,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

struct Harness {
    spawner: Arc<FakeSpawner>,
    router: Arc<Router>,
    reconciler: Reconciler,
    _models: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        let models = tempfile::tempdir().unwrap();
        for v in ["a", "b", "c"] {
            std::fs::write(models.path().join(format!("{v}.onnx")), model_file()).unwrap();
        }
        let spawner = FakeSpawner::new();
        let router = Arc::new(Router::default());
        let reconciler = Reconciler::start(Parts {
            node: NODE.into(),
            millicores: 8000,
            models: ModelDir::new(models.path().into()),
            queue_capacity: 16,
            drain: Duration::from_millis(200),
            max_request_bytes: 1 << 20,
            spawner: spawner.clone(),
            router: router.clone(),
            known: Arc::default(),
            security: Security::plaintext(),
            revoked: Arc::default(),
            plan_epoch: Gauge::default(),
            resizes: Counter::default(),
        });
        Self { spawner, router, reconciler, _models: models }
    }

    async fn apply(&self, plan: Plan) -> Result<Applied, ApplyError> {
        self.reconciler.apply(Incoming::Plan(plan)).await
    }

    /// Waits (by the views the reconciler publishes, no polling) until `until` holds.
    async fn until(&self, what: &str, until: impl Fn(&View) -> bool) {
        let mut views = self.reconciler.subscribe();
        let waited = tokio::time::timeout(Duration::from_secs(10), views.wait_for(|v| until(v))).await;
        assert!(matches!(waited, Ok(Ok(_))), "timed out waiting until {what}");
    }

    async fn all_serve(&self) {
        self.until("every worker serves", |v| !v.workers.is_empty() && v.workers.iter().all(|w| w.is_ready())).await;
    }

    /// Serves one request of the task through the router; the variant that served it.
    async fn serve(&self) -> String {
        let Some(Target::Local(w)) = self.router.pick(&StageKey::new(TASK, TASK)) else {
            panic!("no local route for the task")
        };
        let (reply, served) = oneshot::channel();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        w.queue.push(deadline, vec![1.0, 2.0, 3.0], reply).map_err(|(e, _)| e).unwrap();
        let served: Result<_, ServeError> = served.await.unwrap();
        assert_eq!(served.unwrap().output, vec![1.0, 2.0, 3.0]);
        w.spec.variant.name.clone()
    }

    fn variants(&self) -> Vec<String> {
        self.reconciler.view().workers.iter().map(|w| w.spec.variant.name.clone()).collect()
    }
}

#[tokio::test]
async fn a_replaced_worker_serves_until_its_successor_does() {
    let h = Harness::new();
    h.apply(plan(1, &[("a", 1000)])).await.unwrap();
    h.all_serve().await;
    assert_eq!(h.serve().await, "a");

    h.spawner.gate("b.onnx");
    let applied = h.apply(plan(2, &[("b", 1000)])).await.unwrap();
    assert_eq!(applied, Applied { epoch: 2, held: vec![] });
    assert_eq!(h.variants(), ["b"], "the plan's workers are the new ones");
    assert_eq!(h.reconciler.view().retiring, 1, "a is retiring, not stopped");
    for _ in 0..5 {
        assert_eq!(h.serve().await, "a", "b does not serve yet: a keeps its share");
    }

    h.spawner.open("b.onnx");
    h.until("a is retired", |v| v.retiring == 0).await;
    assert_eq!(h.serve().await, "b");
    h.reconciler.shutdown().await;
    assert_eq!(h.spawner.stopped.load(Ordering::Relaxed), 2, "a and b stopped, each once");
}

#[tokio::test]
async fn workers_that_die_during_make_before_break_keep_the_task_served() {
    let h = Harness::new();
    h.apply(plan(1, &[("a", 1000)])).await.unwrap();
    h.all_serve().await;
    let a = h.reconciler.view().workers[0].clone();

    // b's first load fails; its second waits at the gate.
    h.spawner.with(|m| m.failures.insert("b.onnx".into(), 1));
    h.spawner.gate("b.onnx");
    h.apply(plan(2, &[("b", 1000)])).await.unwrap();
    let b_died_once = async {
        while h.spawner.loads_of("b.onnx") < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), b_died_once).await.expect("b was never loaded again");
    assert_eq!(h.reconciler.view().retiring, 1, "a failed load of b does not retire a");
    assert_eq!(h.serve().await, "a");

    // Now a dies too: its batcher restarts it, and it still holds the share.
    h.spawner.kill("a.onnx");
    h.until("a serves again", |_| a.restarts() == 1 && a.is_ready()).await;
    assert_eq!(h.serve().await, "a");
    let weights = h.router.weights(&StageKey::new(TASK, TASK));
    assert!(weights.iter().any(|(id, w)| *id == a.spec.id && *w > 0.0), "a keeps its weight: {weights:?}");
    assert_eq!(h.spawner.loads_of("a.onnx"), 2, "a was restarted once");
    assert_eq!(h.reconciler.view().retiring, 1);

    h.spawner.open("b.onnx");
    h.until("a is retired", |v| v.retiring == 0).await;
    assert_eq!(h.serve().await, "b");
    h.reconciler.shutdown().await;
}

#[tokio::test]
async fn a_plan_that_fails_halfway_changes_nothing() {
    let h = Harness::new();
    h.apply(plan(1, &[("a", 1000)])).await.unwrap();
    h.all_serve().await;

    // The plan starts b and c and stops a; c's cgroup (the third made) cannot be made.
    h.spawner.with(|m| m.cgroup_fails_at = Some(2));
    let failed = h.apply(plan(2, &[("b", 1000), ("c", 1000)])).await;
    assert!(matches!(failed, Err(ApplyError::Cgroup(_))), "{failed:?}");
    let view = h.reconciler.view();
    assert_eq!((view.epoch, view.retiring), (1, 0), "the plan was not applied");
    assert_eq!(h.variants(), ["a"]);
    assert_eq!(h.spawner.loads_of("b.onnx"), 0, "nothing of the plan was started");
    assert_eq!(h.serve().await, "a");

    // The same change, planned again, goes through.
    h.apply(plan(3, &[("b", 1000), ("c", 1000)])).await.unwrap();
    h.until("a is retired", |v| v.retiring == 0 && v.workers.iter().all(|w| w.is_ready())).await;
    let mut variants = h.variants();
    variants.sort();
    assert_eq!(variants, ["b", "c"]);
    h.reconciler.shutdown().await;
}

#[tokio::test]
async fn a_shrink_waits_for_the_tasks_new_workers() {
    let h = Harness::new();
    h.apply(plan(1, &[("a", 2000)])).await.unwrap();
    h.all_serve().await;

    h.spawner.gate("b.onnx");
    h.apply(plan(2, &[("a", 1000), ("b", 1000)])).await.unwrap();
    let a = h.reconciler.view().workers.iter().find(|w| w.spec.variant.name == "a").cloned().unwrap();
    assert_eq!(a.millicores(), 2000, "a keeps its cores while b loads");

    h.spawner.open("b.onnx");
    // b's ready event releases the shrink; the view published after it shows it done.
    h.until("a shrank once b served", |_| a.millicores() == 1000).await;
    assert!(h.reconciler.view().workers.iter().all(|w| w.is_ready()));
    h.reconciler.shutdown().await;
}

#[tokio::test]
async fn stale_plans_are_refused_before_any_file_is_read() {
    let h = Harness::new();
    h.apply(plan(5, &[("a", 1000)])).await.unwrap();
    let mut old = plan(4, &[("a", 1000)]);
    old.tasks[0].stages[0].variants[0].model_file = "missing.onnx".into();
    old.assignments[0].variant.as_mut().unwrap().model_file = "missing.onnx".into();
    let refused = h.apply(old).await;
    assert!(matches!(refused, Err(ApplyError::Stale { got: (4, 1), applied: (5, 1) })), "{refused:?}");
    h.reconciler.shutdown().await;
}

#[tokio::test]
async fn shutdown_stops_every_worker_and_refuses_later_plans() {
    let h = Harness::new();
    h.spawner.gate("b.onnx");
    h.apply(plan(1, &[("a", 1000)])).await.unwrap();
    h.all_serve().await;
    h.apply(plan(2, &[("b", 1000)])).await.unwrap();
    assert_eq!(h.reconciler.view().retiring, 1);

    h.reconciler.shutdown().await;
    let view = h.reconciler.view();
    assert!(view.workers.is_empty() && view.retiring == 0, "every worker stopped");
    assert_eq!(h.spawner.stopped.load(Ordering::Relaxed), 1, "a's process stopped; b never loaded");
    let refused = h.apply(plan(3, &[("a", 1000)])).await;
    assert!(matches!(refused, Err(ApplyError::Stopping)), "{refused:?}");
}
