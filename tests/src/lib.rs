//! Helpers for Tidal's cross-process tests: start controllers and agents as real processes on
//! loopback ports, generate small models, send inference requests. Every process is killed
//! when its handle drops, so a failing test leaves nothing running.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tidal_proto::v1::agent_client::AgentClient;
use tidal_proto::v1::controller_client::ControllerClient;
use tidal_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;

pub mod group;
pub mod netns;
pub mod onnx_models;
pub mod reference;
pub mod tls;
pub mod vm;

pub use tls::{as_admin, as_daemon};

/// target/<profile>/, where cargo put the binaries next to the test executable's deps/.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(path.is_file(), "{} is missing: build the binaries first (`make test` does)", path.display());
    path
}

/// The ONNX Runtime library, from TIDAL_ORT_LIB (set by the Makefile) or the setup's default.
pub fn ort_lib() -> PathBuf {
    let path = std::env::var_os("TIDAL_ORT_LIB")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tidal/lib/libonnxruntime.so"));
    assert!(path.is_file(), "ONNX Runtime library {} is missing: run `make setup`", path.display());
    path
}

/// The file whose tests run now, and how many of them.
static TURN: Mutex<(Option<&'static str>, usize)> = Mutex::new((None, 0));
static TURN_ENDED: Condvar = Condvar::new();

/// A test's turn on the machine, held for its whole run: tests of one file (`module`, given as
/// `module_path!()`) run beside each other, as many as cargo's test threads, but never beside
/// another file's. Their timing assertions allow for a sibling from their own file, which is
/// how they were written, not for any test at all (a VM booting beside a cold-start
/// measurement on two cores). Tests start in name order, so a file's tests come together and
/// the wait is for the file before to finish.
pub fn file_turn(module: &'static str) -> FileTurn {
    let mut turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
    while turn.0.is_some_and(|now| now != module) {
        turn = TURN_ENDED.wait(turn).unwrap_or_else(PoisonError::into_inner);
    }
    *turn = (Some(module), turn.1 + 1);
    FileTurn
}

/// Ends its test's turn when dropped (also when the test panics).
#[must_use = "the turn ends when this is dropped"]
pub struct FileTurn;

impl Drop for FileTurn {
    fn drop(&mut self) {
        let mut turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
        turn.1 -= 1;
        if turn.1 == 0 {
            turn.0 = None;
            TURN_ENDED.notify_all();
        }
    }
}

/// A loopback port nothing listens on, for tests of an address that refuses connections and
/// for the Raft peer addresses a group's replicas must know of each other before they start.
/// Daemons a test starts alone listen on port 0 and report the port they bound (see
/// [`read_ready_file`]); these are the cases that cannot.
///
/// A port the kernel hands out (binding port 0) and the test releases can be taken, before the
/// daemon binds it, by any process's outbound connection: the kernel picks their source ports
/// from the same ephemeral range (a fresh-clone run failed so, "did not start listening").
/// Ports below `ip_local_port_range` are never picked for outbound connections. Each test
/// process walks them from its own offset, one port per call, and keeps only a port it can
/// bind now.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()))
        .unwrap_or(32768);
    const FIRST: u32 = 10_000;
    let span = low.saturating_sub(FIRST).max(1000);
    let offset = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let port = FIRST + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + span)
}

/// Waits (up to 60 s) for the ready file a daemon writes once it has bound its ports
/// (`--ready-file`) and returns the addresses it names; fails at once, with the daemon's log,
/// if the daemon exits first.
pub fn read_ready_file(path: &Path, proc: &mut Proc, log: &Path) -> std::collections::HashMap<String, String> {
    try_read_ready_file(path, proc, log).unwrap_or_else(|e| panic!("{e}"))
}

/// [`read_ready_file`], with the daemon's early exit (and its log) as an error rather than a
/// panic, for a caller that can start it again.
pub fn try_read_ready_file(
    path: &Path,
    proc: &mut Proc,
    log: &Path,
) -> Result<std::collections::HashMap<String, String>, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return serde_json::from_str(&text).map_err(|e| format!("{}: {e}: {text:?}", path.display()));
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!("{} exited ({status}) before it listened; its log:\n{tail}", proc.name));
        }
        if Instant::now() >= deadline {
            return Err(format!("{} wrote no {} within 60 s", proc.name, path.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What `extra` gives for `flag`, if it names it.
fn flag_value<'a>(extra: &[&'a str], flag: &str) -> Option<&'a str> {
    extra.iter().position(|a| *a == flag).and_then(|i| extra.get(i + 1).copied())
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
    /// Where its output goes; its tail is printed when a failing test drops it.
    pub log: PathBuf,
}

/// How much of a daemon's log a failing test prints (its last lines say why it failed).
const LOG_TAIL_LINES: usize = 60;

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test's daemons say why in their logs, which go with its directory.
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
            eprintln!("--- the last lines of {} ({}) ---\n{tail}\n---", self.name, self.log.display());
        }
        // SIGTERM first so the agent removes its cgroups, then make sure.
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(name: &str, mut cmd: Command, log: &Path) -> Proc {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
    let err = file.try_clone().expect("log file");
    cmd.stdout(Stdio::from(file)).stderr(Stdio::from(err));
    let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
    Proc { child, name: name.to_string(), log: log.to_path_buf() }
}

/// Generates ResNet variants at a resolution into `dir` with tidalctl.
pub fn generate_models(dir: &Path, variants: &str, resolution: u32) {
    let status = Command::new(bin("tidalctl"))
        .args(["models", "generate", "--out"])
        .arg(dir)
        .args(["--resolution", &resolution.to_string(), "--variants", variants])
        .status()
        .expect("running tidalctl");
    assert!(status.success(), "tidalctl models generate failed");
}

static AGENTS: AtomicU32 = AtomicU32::new(0);

pub struct AgentOpts<'a> {
    pub model_dir: &'a Path,
    pub controller: Option<&'a str>,
    pub extra: &'a [&'a str],
}

pub struct Agent {
    pub proc: Proc,
    /// The inference port.
    pub addr: String,
    /// The control port (plans, profiling, status).
    pub control_addr: String,
    /// The metrics port, when `--metrics-listen` was given (port 0 is reported here).
    pub metrics_addr: Option<String>,
    pub node: String,
}

/// A node name unique to this test process.
pub fn unique_node() -> String {
    format!("test-{}-{}", std::process::id(), AGENTS.fetch_add(1, Ordering::Relaxed))
}

/// Starts an agent with 2 cores (unless `extra` says `--cores`), reporting every 0.5 s.
pub fn start_agent(work: &Path, opts: AgentOpts) -> Agent {
    start_agent_named(work, &unique_node(), opts)
}

/// The cgroup subtree of an agent `node` started in `work`: the same for an agent started again
/// there (a restart finds what it left), apart from every other test's. An agent sweeps its
/// subtree when it starts and stops (killing what runs there), so two tests' agents of one
/// name, run side by side, must not share one: they did, and one's exit killed the other's
/// workers ("the worker died while running the batch").
pub fn cgroup_subtree(work: &Path, node: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    work.hash(&mut hasher);
    format!("tidal-test/{:016x}-{node}", hasher.finish())
}

/// Starts an agent as `node` (its cgroups live under `tidal-test/<work dir's hash>-<node>`).
pub fn start_agent_named(work: &Path, node: &str, opts: AgentOpts) -> Agent {
    start_agent_with_env(work, node, opts, &[])
}

/// [`start_agent_named`] with extra environment variables. The agent listens on port 0 and
/// reports the ports it bound in a ready file.
pub fn start_agent_with_env(work: &Path, node: &str, opts: AgentOpts, env: &[(&str, &str)]) -> Agent {
    start_agent_binary(&bin("tidal-agent"), work, node, opts, env)
}

/// [`start_agent_with_env`] from another build of the agent (an A/B of two versions).
pub fn start_agent_binary(binary: &Path, work: &Path, node: &str, opts: AgentOpts, env: &[(&str, &str)]) -> Agent {
    let n = STARTS.fetch_add(1, Ordering::Relaxed);
    let ready = work.join(format!("{node}-{n}.ready.json"));
    let log = work.join(format!("{node}-{n}.log"));
    let _ = std::fs::remove_file(&ready);
    let node = node.to_string();
    let mut cmd = Command::new(binary);
    cmd.arg("serve")
        .args(["--node", &node, "--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0"])
        .args(["--report-interval-s", "0.5"])
        .arg("--ready-file")
        .arg(&ready)
        .arg("--model-dir")
        .arg(opts.model_dir)
        .arg("--ort-lib")
        .arg(ort_lib())
        .args(["--cgroup-subtree", &cgroup_subtree(work, &node)])
        .args(opts.extra);
    if !opts.extra.contains(&"--cores") {
        cmd.args(["--cores", "2"]);
    }
    if let Some(c) = opts.controller {
        cmd.args(["--controller", c]);
    }
    as_daemon(&mut cmd, &tidal_auth::Role::Agent(node.clone()), "");
    cmd.envs(env.iter().copied());
    let mut proc = spawn("agent", cmd, &log);
    let mut ports = read_ready_file(&ready, &mut proc, &log);
    let addr = ports.remove("inference").expect("the agent's inference port");
    let control_addr = ports.remove("control").expect("the agent's control port");
    let metrics_addr = ports.remove("metrics");
    Agent { proc, addr, control_addr, metrics_addr, node }
}

/// Daemons started by this test process, numbering their ready files and logs apart.
static STARTS: AtomicU32 = AtomicU32::new(0);

/// A controller replica started alone.
pub struct Controller {
    pub proc: Proc,
    /// The API port.
    pub addr: String,
    /// The Raft peer port.
    pub peer: String,
    /// The metrics port, when `--metrics-listen` was given (port 0 is reported here).
    pub metrics: Option<String>,
}

/// Starts a controller with a short adaptation interval; returns the process and its address.
pub fn start_controller(work: &Path, interval_s: f64, extra: &[&str]) -> (Proc, String) {
    let c = start_controller_ready(work, interval_s, extra);
    (c.proc, c.addr)
}

/// [`start_controller`], also returning its Raft peer address.
pub fn start_controller_with_peer_port(work: &Path, interval_s: f64, extra: &[&str]) -> (Proc, String, String) {
    let c = start_controller_ready(work, interval_s, extra);
    (c.proc, c.addr, c.peer)
}

/// Starts a controller (data in `work/controller-data`, so a second start on the same `work`
/// is a restart) on port 0 unless `extra` gives `--listen`/`--peer-listen`, and reads the ports
/// it bound from its ready file.
pub fn start_controller_ready(work: &Path, interval_s: f64, extra: &[&str]) -> Controller {
    let n = STARTS.fetch_add(1, Ordering::Relaxed);
    let ready = work.join(format!("controller-{n}.ready.json"));
    let log = work.join("controller.log");
    let _ = std::fs::remove_file(&ready);
    let mut cmd = Command::new(bin("tidal-controller"));
    if flag_value(extra, "--listen").is_none() {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    if flag_value(extra, "--peer-listen").is_none() {
        cmd.args(["--peer-listen", "127.0.0.1:0"]);
    }
    cmd.args(["--interval-s", &interval_s.to_string()])
        .arg("--data-dir")
        .arg(work.join("controller-data"))
        .arg("--ready-file")
        .arg(&ready)
        .args(extra);
    as_daemon(&mut cmd, &tidal_auth::Role::Controller(1), "");
    let mut proc = spawn("controller", cmd, &log);
    let mut ports = read_ready_file(&ready, &mut proc, &log);
    let addr = ports.remove("api").expect("the controller's API port");
    let peer = ports.remove("peer").expect("the controller's peer port");
    Controller { proc, addr, peer, metrics: ports.remove("metrics") }
}

/// Connects to a gRPC server as the tests' admin, retrying until it listens (up to 20 s).
pub async fn channel(addr: &str) -> Channel {
    channel_as(addr, tls::Client::Admin).await
}

/// Connects to a gRPC server as `client`, retrying until it listens (up to 20 s).
pub async fn channel_as(addr: &str, client: tls::Client) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tls::endpoint(addr, client).connect().await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("{addr} did not start listening: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

pub async fn agent_client(addr: &str) -> AgentClient<Channel> {
    AgentClient::new(channel_as(addr, tls::Client::Controller).await)
}

pub async fn inference_client(addr: &str) -> InferenceClient<Channel> {
    InferenceClient::new(channel(addr).await).max_decoding_message_size(64 << 20)
}

pub async fn controller_client(addr: &str) -> ControllerClient<Channel> {
    ControllerClient::new(channel(addr).await)
}

/// Waits until the controller `ctl` has a report from `node` less than 2 s old.
pub async fn wait_reporting(ctl: &ControllerClient<Channel>, node: &str, what: &str) {
    eventually(Duration::from_secs(20), what, || {
        let mut ctl = ctl.clone();
        async move {
            let s = ctl.status(tidal_proto::v1::ClusterStatusRequest {}).await.ok()?.into_inner();
            s.nodes.iter().find(|n| n.node == node && n.seconds_since_report < 2.0).map(|_| ())
        }
    })
    .await;
}

/// The cluster's status from the controller at `addr`, as the tests' admin (`None` while it
/// does not answer).
pub async fn cluster_status(addr: &str) -> Option<tidal_proto::v1::ClusterStatus> {
    let request = tidal_proto::v1::ClusterStatusRequest {};
    Some(controller_client(addr).await.status(request).await.ok()?.into_inner())
}

/// The `p` quantile (0..=1) of `values` by nearest rank, sorting them; NaN when empty.
pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    if values.is_empty() {
        return f64::NAN;
    }
    values[((values.len() - 1) as f64 * p).round() as usize]
}

/// Polls `f` every 100 ms until it returns Some, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Registers the task file `file` with `tidalctl task register` as an admin: whether it
/// succeeded, and what it printed.
pub fn register_task_file(controller: &str, file: &Path, models: &Path) -> (bool, String) {
    let out = as_admin(&mut Command::new(bin("tidalctl")))
        .args(["--controller", controller, "task", "register", "--file"])
        .arg(file)
        .arg("--model-dir")
        .arg(models)
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Waits until V2 ModelReady says `name` is ready (a worker serves every stage), or panics.
pub async fn wait_model_ready(
    v2: &tidal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<Channel>,
    name: &str,
    timeout: Duration,
) {
    eventually(timeout, &format!("{name} to be ready"), || {
        let mut v2 = v2.clone();
        async move {
            let request = tidal_proto::inference::ModelReadyRequest { name: name.into(), version: String::new() };
            v2.model_ready(request).await.ok()?.into_inner().ready.then_some(())
        }
    })
    .await;
}

/// A stored (not measured) profile of `variant` of `task`: batch 1 on 1 and 2 cores at
/// `per_core` req/s a core, for tests whose plans the stored figures decide.
pub fn stored_profile(task: &str, variant: &str, per_core: f64) -> tidal_proto::v1::VariantProfile {
    let points = [1u32, 2]
        .iter()
        .map(|&c| tidal_proto::v1::ProfilePoint {
            cores: c,
            batch: 1,
            latency_p50_ms: 1000.0 / (per_core * c as f64),
            latency_p99_ms: 1200.0 / (per_core * c as f64),
            throughput_rps: per_core * c as f64,
            size: 0,
            output_tokens: 0,
            resident_bytes: 0,
        })
        .collect();
    tidal_proto::v1::VariantProfile { task: task.into(), variant: variant.into(), points, ..Default::default() }
}

/// The CPU limit in force for a cgroup directory, in millicores, read from the kernel's
/// files (v2 `cpu.max` or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`); None when unlimited.
pub fn cgroup_millicores(dir: &Path) -> Option<u32> {
    let (quota, period): (i64, i64) = match std::fs::read_to_string(dir.join("cpu.max")) {
        Ok(text) => {
            let mut parts = text.split_whitespace();
            (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?)
        }
        Err(_) => (
            std::fs::read_to_string(dir.join("cpu.cfs_quota_us")).ok()?.trim().parse().ok()?,
            std::fs::read_to_string(dir.join("cpu.cfs_period_us")).ok()?.trim().parse().ok()?,
        ),
    };
    (quota > 0).then(|| (quota * 1000 / period) as u32)
}

/// A one-task plan for `node`: each (variant config, millicores, batch) becomes a worker with
/// an equal share of the traffic.
pub fn plan_for(
    epoch: u64,
    node: &str,
    task: &str,
    slo_ms: u32,
    workers: &[(&tidal_common::variant::VariantConfig, u32, u32)],
) -> tidal_proto::v1::Plan {
    use tidal_proto::v1::{Assignment, Plan};
    let mut variants: Vec<_> = workers.iter().map(|(v, _, _)| v.spec()).collect();
    variants.dedup();
    let assignments = workers
        .iter()
        .map(|(v, millicores, batch)| Assignment {
            task: task.into(),
            stage: task.into(),
            variant: Some(v.spec()),
            node: node.into(),
            millicores: *millicores,
            max_batch: *batch,
            max_delay_ms: if *batch > 1 { 5 } else { 0 },
            weight: 1.0 / workers.len() as f64,
            replica: 0,
            memory_bytes: 0,
        })
        .collect();
    Plan {
        epoch,
        term: 1,
        tasks: vec![tidal_common::task::single_stage(task, slo_ms, variants)],
        assignments,
        notes: vec![],
        ..Default::default()
    }
}

/// Latencies (µs) of `n` sequential requests of task `task` through `client`.
pub async fn sequential_latencies(
    client: &mut InferenceClient<Channel>,
    task: &str,
    shape: &[i64],
    n: usize,
) -> hdrhistogram::Histogram<u64> {
    let mut h = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    for _ in 0..n {
        let req = tidal_proto::v1::InferRequest {
            task: task.into(),
            input: Some(sample(shape)),
            budget_ms: 0,
            ..Default::default()
        };
        let started = Instant::now();
        client.infer(req).await.expect("served");
        h.record(started.elapsed().as_micros() as u64).unwrap_or_default();
    }
    h
}

/// One float32 sample of `shape` (no batch dimension), batch dimension of 1 added.
pub fn sample(shape: &[i64]) -> tidal_proto::v1::Tensor {
    let n: i64 = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|i| (i % 255) as f32 / 255.0).collect();
    let mut full = vec![1];
    full.extend_from_slice(shape);
    tidal_common::tensor::f32_tensor(full, &values)
}

/// An agent (no controller) serving from freshly generated resnet18 and resnet50 models.
pub struct Setup {
    /// Dropped first: the agent stops before its directory goes.
    pub agent: Agent,
    pub r18: tidal_common::variant::VariantConfig,
    pub r50: tidal_common::variant::VariantConfig,
    pub work: tempfile::TempDir,
}

pub fn setup(extra: &[&str]) -> Setup {
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "resnet18,resnet50", 64);
    let agent = start_agent(work.path(), AgentOpts { model_dir: &models, controller: None, extra });
    let r18 = tidal_common::variant::VariantConfig::load(&models, "resnet18").unwrap();
    let r50 = tidal_common::variant::VariantConfig::load(&models, "resnet50").unwrap();
    Setup { agent, r18, r50, work }
}

/// Waits until the agent runs `workers` ready workers; their telemetry.
pub async fn wait_ready(addr: &str, workers: usize) -> Vec<tidal_proto::v1::WorkerTelemetry> {
    wait_ready_through(agent_client(addr).await, workers).await
}

/// [`wait_ready`] through a given client (e.g. one holding another role's certificate).
pub async fn wait_ready_through(
    mut client: AgentClient<Channel>,
    workers: usize,
) -> Vec<tidal_proto::v1::WorkerTelemetry> {
    eventually(Duration::from_secs(60), "workers to be ready", || {
        let mut client = client.clone();
        async move {
            let status = client.status(tidal_proto::v1::AgentStatusRequest {}).await.ok()?.into_inner();
            (status.workers.len() == workers && status.workers.iter().all(|w| w.ready)).then_some(status.workers)
        }
    })
    .await;
    client.status(tidal_proto::v1::AgentStatusRequest {}).await.unwrap().into_inner().workers
}

impl Setup {
    /// Applies a one-task ("classify") plan of `workers` and waits until they are ready.
    pub async fn serve(
        &self,
        epoch: u64,
        slo_ms: u32,
        workers: &[(&tidal_common::variant::VariantConfig, u32, u32)],
    ) -> Vec<tidal_proto::v1::WorkerTelemetry> {
        let mut agent = agent_client(&self.agent.control_addr).await;
        let plan = plan_for(epoch, &self.agent.node, "classify", slo_ms, workers);
        agent
            .apply_plan(tidal_proto::v1::ApplyPlanRequest { plan: Some(plan), ..Default::default() })
            .await
            .expect("the plan is applied");
        wait_ready(&self.agent.control_addr, workers.len()).await
    }
}

/// One plaintext HTTP/1.1 exchange on a fresh connection (V2's REST form): the status, the
/// headers (names in lower case) and the body.
pub async fn http_exchange(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, std::collections::HashMap<String, String>, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("the port takes connections");
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let end = response.windows(4).position(|w| w == b"\r\n\r\n").expect("a whole HTTP response");
    let head = String::from_utf8_lossy(&response[..end]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("a status line");
    let headers =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.to_lowercase(), v.trim().to_string())).collect();
    (status, headers, response[end + 4..].to_vec())
}

/// `.tidal/clients` (scripts/client-tools.sh), or why the outside-client tests cannot run.
pub fn client_tools() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join(".tidal/clients");
    let installed = ["bin/perf_analyzer", "py/.done-grpc-http", "kserve/.done-kserve"];
    if !installed.iter().all(|f| dir.join(f).exists()) {
        let status = Command::new(root.join("scripts/client-tools.sh")).status().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err("scripts/client-tools.sh could not install tritonclient, kserve and perf_analyzer".into());
        }
    }
    Ok(dir)
}

/// [`client_tools`] for a test that runs them against an agent, or why it cannot run here: they
/// cannot be installed, or `TIDAL_TEST_TLS=1` is set (they speak plaintext in the tests).
pub fn outside_clients() -> Result<PathBuf, String> {
    if tls::test_ca().is_some() {
        return Err("the outside clients speak plaintext here, and TIDAL_TEST_TLS=1 is set".into());
    }
    client_tools()
}

/// A V2 request of `inputs` as raw contents, asking for `outputs` (none: all).
pub fn v2_raw_request(
    task: &str,
    inputs: &[tidal_common::tensor::NamedTensor],
    outputs: &[&str],
) -> tidal_proto::inference::ModelInferRequest {
    tidal_proto::inference::ModelInferRequest {
        model_name: task.into(),
        inputs: inputs
            .iter()
            .map(|t| tidal_proto::inference::model_infer_request::InferInputTensor {
                name: t.name.clone(),
                datatype: t.element.v2_name().into(),
                shape: t.shape.clone(),
                ..Default::default()
            })
            .collect(),
        outputs: outputs
            .iter()
            .map(|o| tidal_proto::inference::model_infer_request::InferRequestedOutputTensor {
                name: o.to_string(),
                ..Default::default()
            })
            .collect(),
        raw_input_contents: inputs.iter().map(|t| t.data.clone()).collect(),
        ..Default::default()
    }
}

/// A V2 response's outputs, read from its raw contents.
pub fn v2_raw_outputs(r: tidal_proto::inference::ModelInferResponse) -> Vec<tidal_common::tensor::NamedTensor> {
    r.outputs
        .iter()
        .zip(r.raw_output_contents)
        .map(|(o, data)| tidal_common::tensor::NamedTensor {
            name: o.name.clone(),
            element: tidal_common::onnx_signature::ElementType::from_v2_name(&o.datatype).unwrap(),
            shape: o.shape.clone(),
            data,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::file_turn;

    #[test]
    fn a_files_tests_share_their_turn_and_another_file_waits_for_all_of_them() {
        let first = file_turn("a");
        let second = file_turn("a"); // same file: does not wait
        let (started, other_file) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _turn = file_turn("b");
            started.send(()).unwrap();
        });
        assert!(other_file.recv_timeout(Duration::from_millis(200)).is_err(), "b ran beside a");
        drop(first);
        assert!(other_file.recv_timeout(Duration::from_millis(200)).is_err(), "b ran beside a's second test");
        drop(second);
        other_file.recv_timeout(Duration::from_secs(5)).expect("b's turn after a's tests ended");
        waiter.join().unwrap();
    }
}
