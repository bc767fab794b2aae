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
use crate::worker_protocol::{BatchResult, FrameTensor};
use tidal_common::tensor::NamedTensor;

const NODE: &str = "n1";
const TASK: &str = "t";
/// Long enough never to be what releases a test's pending action.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// The fake machine's state, by model file.
#[derive(Default)]
struct Machine {
    /// Loads of a model wait for a permit (no entry: they load at once).
    gates: HashMap<String, Arc<Semaphore>>,
    /// How long a model's loads take (tokio time; none: no time).
    load_times: HashMap<String, Duration>,
    /// How many of a model's next loads fail (at once, before any gate).
    failures: HashMap<String, usize>,
    /// The cgroup (counted from 0) whose creation fails.
    cgroup_fails_at: Option<usize>,
    cgroups_made: usize,
    /// Every load attempt, by model file, in order.
    loads: Vec<String>,
    /// Each load attempt's model file and how many processes had stopped when it began.
    stopped_at_load: Vec<(String, usize)>,
    /// What kills each live process of a model.
    live: HashMap<String, Vec<Arc<Notify>>>,
}

struct FakeSpawner {
    machine: Mutex<Machine>,
    none: CpuCgroups,
    /// How many processes were stopped.
    stopped: Arc<AtomicUsize>,
    /// What every process was sent, in order: (whether the frame had inputs, its quota).
    told: Arc<Mutex<Vec<(bool, u32)>>>,
}

impl FakeSpawner {
    fn new() -> Arc<Self> {
        let none = CpuCgroups::setup(CgroupDriverChoice::None, "fake").unwrap();
        Arc::new(Self { machine: Mutex::default(), none, stopped: Arc::default(), told: Arc::default() })
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
            let (gate, fail, load_time) = self.with(|m| {
                m.loads.push(name.clone());
                m.stopped_at_load.push((name.clone(), self.stopped.load(Ordering::Relaxed)));
                let fail = m.failures.get_mut(&name).filter(|n| **n > 0).map(|n| *n -= 1).is_some();
                (m.gates.get(&name).cloned(), fail, m.load_times.get(&name).copied())
            });
            if let Some(load_time) = load_time {
                tokio::time::sleep(load_time).await;
            }
            if fail {
                return Err(WorkerError::Load("injected load failure".into()));
            }
            if let Some(gate) = gate {
                gate.acquire().await.unwrap().forget();
            }
            let kill = Arc::new(Notify::new());
            self.with(|m| m.live.entry(name).or_default().push(kill.clone()));
            let process = FakeProcess { kill, stopped: self.stopped.clone(), told: self.told.clone() };
            Ok(Box::new(process) as Box<dyn ModelProcess>)
        }
        .boxed()
    }

    fn load_timeout(&self) -> Duration {
        LOAD_TIMEOUT
    }
}

/// Echoes each batch back, with the threads its quota gives.
struct FakeProcess {
    kill: Arc<Notify>,
    stopped: Arc<AtomicUsize>,
    told: Arc<Mutex<Vec<(bool, u32)>>>,
}

impl ModelProcess for FakeProcess {
    /// Answers a batch with its inputs.
    fn run(&mut self, inputs: Vec<FrameTensor>, millicores: u32) -> BoxFuture<'_, Result<BatchResult, WorkerError>> {
        self.told.lock().unwrap().push((!inputs.is_empty(), millicores));
        let threads = crate::worker::threads_for(millicores) as u32;
        async move { Ok(BatchResult { id: 0, outputs: inputs, error: String::new(), run_us: 1, threads, setup_us: 0 }) }
            .boxed()
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

/// A model that takes `[batch, 3]` and gives as much.
fn model_file() -> Vec<u8> {
    let dim = |value| Dimension { value: Some(value) };
    let tensor = |name: &str| ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: 1,
                shape: Some(TensorShapeProto {
                    dim: vec![dim(dimension::Value::DimParam("N".into())), dim(dimension::Value::DimValue(3))],
                }),
            })),
        }),
    };
    let graph = GraphProto { input: vec![tensor("input")], output: vec![tensor("output")], ..Default::default() };
    ModelProto { graph: Some(graph), ..Default::default() }.encode_to_vec()
}

fn variant(name: &str) -> VariantSpec {
    VariantSpec {
        name: name.into(),
        model_file: format!("{name}.onnx"),
        accuracy: 70.0,
        input_shape: vec![3],
        tensor_names: Default::default(),
        tokenizer_file: String::new(),
        io: None,
        model_sha256: String::new(),
    }
}

/// A plan of task `t` running `workers` (variant, millicores) on this node.
fn plan(epoch: u64, workers: &[(&str, u32)]) -> Plan {
    plan_of(epoch, workers, Transition::InPlace)
}

fn plan_of(epoch: u64, workers: &[(&str, u32)], transition: Transition) -> Plan {
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
        transition: transition as i32,
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
        Self::with_capacity(8000.into())
    }

    fn with_capacity(capacity: Capacity) -> Self {
        let models = tempfile::tempdir().unwrap();
        for v in ["a", "b", "c"] {
            std::fs::write(models.path().join(format!("{v}.onnx")), model_file()).unwrap();
        }
        let spawner = FakeSpawner::new();
        let router = Arc::new(Router::default());
        let reconciler = Reconciler::start(Parts {
            node: NODE.into(),
            capacity,
            overlap_transitions: false,
            models: ModelDir::new(models.path().into(), None),
            fetcher: None,
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
        let input = NamedTensor::f32("input", vec![3], &[1.0, 2.0, 3.0]);
        w.submit(deadline, vec![input], reply).map_err(|(e, _)| e).unwrap();
        let served: Result<_, ServeError> = served.await.unwrap();
        let outputs = served.unwrap().outputs;
        assert_eq!((outputs[0].name.as_str(), outputs[0].f32_values().unwrap()), ("output", vec![1.0, 2.0, 3.0]));
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
    assert_eq!(h.reconciler.view().retiring.len(), 1, "a is retiring, not stopped");
    for _ in 0..5 {
        assert_eq!(h.serve().await, "a", "b does not serve yet: a keeps its share");
    }

    h.spawner.open("b.onnx");
    h.until("a is retired", |v| v.retiring.is_empty()).await;
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
    assert_eq!(h.reconciler.view().retiring.len(), 1, "a failed load of b does not retire a");
    assert_eq!(h.serve().await, "a");

    // Now a dies too: its batcher restarts it, and it still holds the share.
    h.spawner.kill("a.onnx");
    h.until("a serves again", |_| a.restarts() == 1 && a.is_ready()).await;
    assert_eq!(h.serve().await, "a");
    let weights = h.router.weights(&StageKey::new(TASK, TASK));
    assert!(weights.iter().any(|(id, w)| *id == a.spec.id && *w > 0.0), "a keeps its weight: {weights:?}");
    assert_eq!(h.spawner.loads_of("a.onnx"), 2, "a was restarted once");
    assert_eq!(h.reconciler.view().retiring.len(), 1);

    h.spawner.open("b.onnx");
    h.until("a is retired", |v| v.retiring.is_empty()).await;
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
    assert_eq!((view.epoch, view.retiring.len()), (1, 0), "the plan was not applied");
    assert_eq!(h.variants(), ["a"]);
    assert_eq!(h.spawner.loads_of("b.onnx"), 0, "nothing of the plan was started");
    assert_eq!(h.serve().await, "a");

    // The same change, planned again, goes through.
    h.apply(plan(3, &[("b", 1000), ("c", 1000)])).await.unwrap();
    h.until("a is retired", |v| v.retiring.is_empty() && v.workers.iter().all(|w| w.is_ready())).await;
    let mut variants = h.variants();
    variants.sort();
    assert_eq!(variants, ["b", "c"]);
    h.reconciler.shutdown().await;
}

/// `plan`, each worker given `memory_bytes`.
fn with_memory(mut plan: Plan, memory_bytes: u64) -> Plan {
    plan.assignments.iter_mut().for_each(|a| a.memory_bytes = memory_bytes);
    plan
}

#[tokio::test]
async fn a_switch_the_node_s_memory_cannot_hold_twice_breaks_before_it_makes() {
    const MIB: u64 = 1 << 20;
    // Room for one worker of 60 MiB, not two: b loads only once a has stopped.
    let h = Harness::with_capacity(Capacity { millicores: 8000, memory_bytes: 100 * MIB });
    h.apply(with_memory(plan(1, &[("a", 1000)]), 60 * MIB)).await.unwrap();
    h.all_serve().await;
    h.apply(with_memory(plan(2, &[("b", 1000)]), 60 * MIB)).await.unwrap();
    h.all_serve().await;
    assert_eq!(h.serve().await, "b");
    let loads = h.spawner.with(|m| m.stopped_at_load.clone());
    assert_eq!(loads, [("a.onnx".to_string(), 0), ("b.onnx".to_string(), 1)], "b loaded once a had stopped");
    h.reconciler.shutdown().await;

    // Room for both: a serves until b does (make before break), as without memory declared.
    let h = Harness::with_capacity(Capacity { millicores: 8000, memory_bytes: 200 * MIB });
    h.apply(with_memory(plan(1, &[("a", 1000)]), 60 * MIB)).await.unwrap();
    h.all_serve().await;
    h.spawner.gate("b.onnx");
    h.apply(with_memory(plan(2, &[("b", 1000)]), 60 * MIB)).await.unwrap();
    assert_eq!(h.reconciler.view().retiring.len(), 1, "a serves while b loads");
    assert_eq!(h.serve().await, "a");
    h.spawner.open("b.onnx");
    h.until("a is retired", |v| v.retiring.is_empty()).await;
    assert_eq!(h.spawner.with(|m| m.stopped_at_load.clone())[1], ("b.onnx".to_string(), 0));
    h.reconciler.shutdown().await;

    // A worker started before its memory was planned counts for what a later plan gives it.
    let h = Harness::with_capacity(Capacity { millicores: 8000, memory_bytes: 100 * MIB });
    h.apply(plan(1, &[("a", 1000)])).await.unwrap();
    h.all_serve().await;
    h.apply(with_memory(plan(2, &[("a", 1000)]), 60 * MIB)).await.unwrap();
    h.apply(with_memory(plan(3, &[("b", 1000)]), 60 * MIB)).await.unwrap();
    h.all_serve().await;
    let loads = h.spawner.with(|m| m.stopped_at_load.clone());
    assert_eq!(loads, [("a.onnx".to_string(), 0), ("b.onnx".to_string(), 1)], "b loaded once a had stopped");
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
async fn a_worker_resized_while_idle_tells_its_process_at_once_and_runs_the_quota_s_threads() {
    let h = Harness::new();
    h.apply(plan(1, &[("a", 1000)])).await.unwrap();
    h.all_serve().await;
    assert_eq!(h.serve().await, "a");
    let a = h.reconciler.view().workers[0].clone();
    assert_eq!(a.threads(), 1);
    assert_eq!(*h.spawner.told.lock().unwrap(), [(true, 1000)]);

    h.apply(plan(2, &[("a", 2500)])).await.unwrap();
    assert_eq!(a.millicores(), 2500, "resized in place");
    // Nothing publishes this: looked at until it happens.
    let told = async {
        while h.spawner.told.lock().unwrap().last() != Some(&(false, 2500)) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), told).await.expect("the idle process was told its new quota");
    assert_eq!(h.serve().await, "a");
    assert_eq!(a.threads(), 3, "2.5 cores run 3 threads");
    assert_eq!(h.spawner.told.lock().unwrap().last(), Some(&(true, 2500)));
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
    assert_eq!(h.reconciler.view().retiring.len(), 1);

    h.reconciler.shutdown().await;
    let view = h.reconciler.view();
    assert!(view.workers.is_empty() && view.retiring.is_empty(), "every worker stopped");
    assert_eq!(h.spawner.stopped.load(Ordering::Relaxed), 1, "a's process stopped; b never loaded");
    let refused = h.apply(plan(3, &[("a", 1000)])).await;
    assert!(matches!(refused, Err(ApplyError::Stopping)), "{refused:?}");
}

/// The agent's and the simulator's make before break, side by side: the same plans at the
/// same times, models loading in the same times (the agent's on tokio's paused clock), and
/// what serves, with how many cores, compared every 250 ms.
mod parity {
    use tidal_common::sim::{NodeTimeline, ServingWorker};

    use super::*;

    /// Seconds each variant's model takes to load.
    const LOAD_S: [(&str, f64); 3] = [("a", 2.0), ("b", 3.0), ("c", 4.0)];

    /// What serves on the agent now.
    fn serving(view: &View) -> Vec<ServingWorker> {
        let mut serving: Vec<ServingWorker> = view
            .workers
            .iter()
            .chain(&view.retiring)
            .filter(|w| w.is_ready())
            .map(|w| ServingWorker {
                task: w.spec.task.clone(),
                variant: w.spec.variant.name.clone(),
                replica: w.spec.replica,
                cores: w.millicores().div_ceil(1000),
            })
            .collect();
        serving.sort();
        serving
    }

    /// Runs `plans` ((second, plan)) on both until `end` and compares what serves.
    async fn compare(plans: Vec<(f64, Plan)>, end: f64) {
        let variants: Vec<(&str, VariantSpec, f64)> = LOAD_S.iter().map(|(v, s)| (TASK, variant(v), *s)).collect();
        let mut sim = NodeTimeline::new(NODE, &variants);

        let h = Harness::new();
        h.spawner.with(|m| {
            for (v, s) in LOAD_S {
                m.load_times.insert(format!("{v}.onnx"), Duration::from_secs_f64(s));
            }
        });
        let start = Instant::now();
        let at = |s: f64| start + Duration::from_secs_f64(s);
        // Plans at their times, and a look every 250 ms between them (off the whole seconds
        // at which plans come and loads end).
        enum Step {
            Apply(Box<Plan>),
            Look,
        }
        let looks = (0..).map(|i| 0.125 + 0.25 * i as f64).take_while(|t| *t < end).map(|t| (t, Step::Look));
        let mut steps: Vec<(f64, Step)> =
            plans.into_iter().map(|(t, p)| (t, Step::Apply(Box::new(p)))).chain(looks).collect();
        steps.sort_by(|x, y| x.0.total_cmp(&y.0));
        let mut mismatches = Vec::new();
        for (t, step) in steps {
            tokio::time::sleep_until(at(t)).await;
            match step {
                Step::Apply(p) => {
                    sim.apply(&p, t).unwrap();
                    h.apply(*p).await.unwrap();
                }
                Step::Look => {
                    let (agent, simulated) = (serving(&h.reconciler.view()), sim.serving(t));
                    if agent != simulated {
                        mismatches.push(format!("at {t:.3} s the agent serves {agent:?}, the simulator {simulated:?}"));
                    }
                }
            }
        }
        h.reconciler.shutdown().await;
        assert!(mismatches.is_empty(), "{} differences:\n{}", mismatches.len(), mismatches.join("\n"));
    }

    #[tokio::test(start_paused = true)]
    async fn shrinks_wait_for_new_variants_and_stops_for_their_successors() {
        let plans = vec![
            (0.0, plan(1, &[("a", 2000)])),
            (10.0, plan(2, &[("a", 1000), ("b", 1000)])),
            (20.0, plan(3, &[("b", 2000)])),
            (30.0, plan(4, &[("b", 1000), ("c", 1000)])),
        ];
        compare(plans, 40.0).await;
    }

    #[tokio::test(start_paused = true)]
    async fn blue_green_replaces_a_worker_once_its_successor_serves() {
        let plans = vec![
            (0.0, plan_of(1, &[("a", 1000)], Transition::BlueGreen)),
            (10.0, plan_of(2, &[("a", 2000)], Transition::BlueGreen)),
            (20.0, plan_of(3, &[("a", 1000), ("b", 1000)], Transition::BlueGreen)),
        ];
        compare(plans, 30.0).await;
    }

    #[tokio::test(start_paused = true)]
    async fn plans_that_come_while_workers_load() {
        let plans = vec![
            (0.0, plan(1, &[("a", 2000)])),
            // b loads until 13; a shrinks then.
            (10.0, plan(2, &[("a", 1000), ("b", 1000)])),
            // A newer plan cancels the waiting shrink: a keeps 2 cores past 13...
            (11.0, plan(3, &[("a", 2000), ("b", 1000)])),
            // ...until this one, which shrinks it at once (b serves).
            (15.0, plan(4, &[("a", 1000), ("b", 1000)])),
            // Replacements while the replacement loads: b until c serves; c stops unseen
            // once a, planned while c loads, serves too.
            (20.0, plan(5, &[("b", 1000)])),
            (20.5, plan(6, &[("c", 1000)])),
            (21.0, plan(7, &[("a", 1000)])),
        ];
        compare(plans, 32.0).await;
    }
}
