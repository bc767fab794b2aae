//! `tidal-agent`: the node daemon (`serve`), and the worker process it starts (`worker`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tidal_agent::cgroup::{CgroupDriverChoice, CpuCgroups};
use tidal_agent::control::ControlService;
use tidal_agent::fronts::token::{TokenFirst, V2_READS};
use tidal_agent::fronts::{tidal::TidalApi, v2_grpc::V2Grpc, InferencePort};
use tidal_agent::link::Link;
use tidal_agent::node::{AgentConfig, Node};
use tidal_agent::worker::ProcessConfig;
use tidal_auth::tls::ClientAuth;
use tidal_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use tidal_proto::v1::agent_server::AgentServer;
use tidal_proto::v1::inference_server::InferenceServer;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tracing::{info, warn};

#[derive(Parser)]
#[command(
    name = "tidal-agent",
    version,
    about = "Tidal node agent: serves ONNX models in cgroup-limited worker processes and applies the controller's plans"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Serve(Box<ServeArgs>),
    /// Run one worker process (started by the agent itself; not for direct use).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, env = "TIDAL_ORT_LIB")]
        ort_lib: PathBuf,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// This node's name, unique in the cluster.
    #[arg(long, env = "TIDAL_NODE", default_value = "node-1")]
    node: String,
    /// Address of the inference port (the Inference service: clients and other agents).
    #[arg(long, env = "TIDAL_LISTEN", default_value = "127.0.0.1:7100")]
    listen: SocketAddr,
    /// Address of the control port (the Agent service: plans and profiling, for the
    /// controller; status).
    #[arg(long, env = "TIDAL_CONTROL_LISTEN", default_value = "127.0.0.1:7101")]
    control_listen: SocketAddr,
    #[command(flatten)]
    tls: tidal_auth::TlsArgs,
    #[command(flatten)]
    log: tidal_daemon::logging::LogArgs,
    #[command(flatten)]
    edge: tidal_daemon::edge::EdgeLimits,
    /// Most requests one HTTP/2 connection may have open at once.
    #[arg(long, env = "TIDAL_MAX_STREAMS", default_value_t = 256)]
    max_streams: u32,
    /// Address clients and other agents reach the inference port at (default: --listen).
    #[arg(long, env = "TIDAL_ADVERTISE")]
    advertise: Option<String>,
    /// Address the controller reaches the control port at (default: --control-listen).
    #[arg(long, env = "TIDAL_ADVERTISE_CONTROL")]
    advertise_control: Option<String>,
    /// Controller replicas' addresses (host:port), comma-separated; the agent moves to the next
    /// when one fails. Without any, the agent only serves plans pushed to it.
    #[arg(long, env = "TIDAL_CONTROLLER", value_delimiter = ',')]
    controller: Vec<String>,
    /// Directory holding the variants' ONNX files. A file it lacks is fetched from the
    /// controllers (those started with --model-dir) into --model-cache, when its task was
    /// registered with the file's SHA-256 (tidalctl records it).
    #[arg(long, env = "TIDAL_MODEL_DIR", default_value = "models")]
    model_dir: PathBuf,
    /// Where model files fetched from the controllers are kept, each checked against the
    /// SHA-256 recorded at registration (default: .fetched in --model-dir).
    #[arg(long, env = "TIDAL_MODEL_CACHE")]
    model_cache: Option<PathBuf>,
    /// Most bytes of fetched model files kept (20G, 512M…): beyond it the least recently used
    /// go, never one the plan needs; a file that cannot fit is not fetched.
    #[arg(long, env = "TIDAL_MODEL_CACHE_BYTES", default_value = "20G", value_parser = tidal_common::memory::parse_size)]
    model_cache_bytes: u64,
    /// The ONNX Runtime shared library (libonnxruntime.so) that workers load.
    #[arg(long, env = "TIDAL_ORT_LIB")]
    ort_lib: PathBuf,
    /// Cores this node offers to workers (default: all online cores).
    #[arg(long, env = "TIDAL_CORES")]
    cores: Option<u32>,
    /// Memory this node offers to workers: a size (512M, 24G) or a share of the machine's
    /// memory (90%). The controller plans workers' memory within it, by their profiles; 0
    /// declares none (only cores are planned here).
    #[arg(long, env = "TIDAL_MEMORY", default_value = "90%")]
    memory: String,
    /// Let make before break hold a leaving worker and its successor both while the successor
    /// loads, even past --memory. By default transitions keep within --memory too: a worker
    /// starts only when the memory holds it beside the workers that run (those leaving
    /// included), and a switch that cannot be made before it breaks breaks first (its task goes
    /// without a worker while the successor loads).
    #[arg(long, env = "TIDAL_OVERLAP_TRANSITIONS")]
    overlap_transitions: bool,
    /// ONNX Runtime intra-op threads per worker, fixed whatever its CPU limit (default: its
    /// limit's cores, rounded up; they follow it when the worker is resized in place).
    #[arg(long, env = "TIDAL_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// cgroup hierarchy for workers' CPU limits.
    #[arg(long, env = "TIDAL_CGROUP_DRIVER", value_enum, default_value = "auto")]
    cgroup_driver: CgroupDriverChoice,
    /// The agent's cgroup subtree (v1: under the cpu hierarchy's root; v2: under the agent's own cgroup).
    #[arg(long, env = "TIDAL_CGROUP_SUBTREE")]
    cgroup_subtree: Option<String>,
    /// Most requests waiting in one worker's queue before new ones are refused.
    #[arg(long, env = "TIDAL_QUEUE_CAPACITY", default_value_t = 1024)]
    queue_capacity: usize,
    /// Largest inference request accepted, in bytes (larger: RESOURCE_EXHAUSTED).
    #[arg(long, env = "TIDAL_MAX_REQUEST_BYTES", default_value_t = 16 << 20)]
    max_request_bytes: usize,
    /// Most bytes of requests held at once, queued or being served (each request counts its
    /// size until it is answered); beyond it a request gets RESOURCE_EXHAUSTED at once. At
    /// least --max-request-bytes.
    #[arg(long, env = "TIDAL_MAX_INFLIGHT_BYTES", default_value_t = 1 << 30)]
    max_inflight_bytes: usize,
    /// Seconds a request for a task that has no worker (`--min-workers 0`, unloaded while
    /// idle) waits while the controller plans it one and it loads; then UNAVAILABLE. Its
    /// latency budget counts from when a worker is ready. 1–600.
    #[arg(long, env = "TIDAL_COLD_START_WAIT_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    cold_start_wait_s: u64,
    /// Seconds between telemetry reports to the controller.
    #[arg(long, env = "TIDAL_REPORT_INTERVAL_S", default_value_t = 1.0)]
    report_interval_s: f64,
    /// Address to serve Prometheus metrics on (`GET /metrics`); none when not given.
    #[arg(long, env = "TIDAL_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Once every port is bound, write the addresses bound here, as JSON (`inference`,
    /// `control`, `metrics`): with port 0 in a listen address, how whoever started the agent
    /// learns the port the system picked.
    #[arg(long, env = "TIDAL_READY_FILE")]
    ready_file: Option<PathBuf>,
    /// Seconds a worker may take to load its model.
    #[arg(long, env = "TIDAL_LOAD_TIMEOUT_S", default_value_t = 120)]
    load_timeout_s: u64,
    /// Run the workers as this unprivileged user (and its primary group) instead of the
    /// agent's own; the model directory and ONNX Runtime must be readable by it. Needs an
    /// agent that may switch users (root).
    #[arg(long, env = "TIDAL_WORKER_USER")]
    worker_user: Option<String>,
    /// A file holding a token that every inference request must carry as `authorization:
    /// Bearer <token>` (other agents, identified by their certificates, need none). Without
    /// it the inference port is open to anyone who reaches it.
    #[arg(long, env = "TIDAL_INFERENCE_TOKEN_FILE")]
    inference_token_file: Option<PathBuf>,
    /// With --inference-token-file: answer the V2 calls that only read (server and model
    /// health, metadata, configuration, statistics) without the token; only inference needs
    /// it. Triton's perf_analyzer and clients read a model's metadata without the headers
    /// they send with inference requests.
    #[arg(long, env = "TIDAL_PUBLIC_METADATA", value_parser = clap::builder::BoolishValueParser::new())]
    public_metadata: bool,
}

/// The (uid, gid) of `name`, checked to be a user this agent can start processes as.
fn worker_identity(name: &str) -> anyhow::Result<(u32, u32)> {
    let user = nix::unistd::User::from_name(name)
        .with_context(|| format!("looking up the user {name:?}"))?
        .with_context(|| format!("--worker-user: there is no user {name:?}"))?;
    let me = nix::unistd::geteuid();
    if !me.is_root() && me != user.uid {
        anyhow::bail!("--worker-user {name}: switching users needs an agent running as root");
    }
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Worker { model, ort_lib, threads } => tidal_agent::worker_process::serve(&ort_lib, &model, threads),
        Command::Serve(args) => {
            let log = tidal_daemon::logging::init(&args.log, "info")?;
            tokio::runtime::Runtime::new()?.block_on(async move {
                log.spawn_on_sighup();
                serve(*args).await
            })
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if !args.ort_lib.is_file() {
        anyhow::bail!(
            "ONNX Runtime library {} does not exist (set --ort-lib or TIDAL_ORT_LIB; `make setup` installs one)",
            args.ort_lib.display()
        );
    }
    let security = tidal_auth::Security::from_args(&args.tls)?;
    if let Some(role) = security.role().filter(|r| **r != tidal_auth::Role::Agent(args.node.clone())) {
        anyhow::bail!("--tls-cert is {role}'s certificate; node {} needs agent/{}'s", args.node, args.node);
    }
    if let Some(path) = &args.ready_file {
        tidal_daemon::ready_file::clear(path).with_context(|| format!("removing the old {}", path.display()))?;
    }
    // Bound first: a port in use fails the start, and port 0's pick is known before the
    // agent advertises its addresses.
    args.edge.validate().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(args.max_streams > 0, "--max-streams must be positive");
    let inference_listener = listen(args.listen, args.edge, "inference")?;
    let control_listener = listen(args.control_listen, args.edge, "control")?;
    let listen_addr = inference_listener.local_addr()?;
    let control_addr = control_listener.local_addr()?;
    let online = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let cores = args.cores.unwrap_or(online).max(1);
    let memory_total_bytes = machine_memory().context("reading the machine's memory from /proc/meminfo")?;
    let memory_bytes = node_memory(&args.memory, memory_total_bytes).map_err(anyhow::Error::msg)?;
    let subtree = args.cgroup_subtree.clone().unwrap_or_else(|| format!("tidal/{}", args.node));
    let cgroups = CpuCgroups::setup(args.cgroup_driver, &subtree).context("setting up the workers' cgroups")?;
    let swept = cgroups.sweep();
    info!(driver = cgroups.driver_name(), subtree = %subtree, cores, memory_mib = memory_bytes >> 20, limits_memory = cgroups.limits_memory(), swept, "cgroups ready");
    if memory_bytes > 0 && !cgroups.limits_memory() {
        warn!(
            driver = cgroups.driver_name(),
            "no memory controller for the workers' cgroups: their memory is planned but not limited, and an \
             over-large worker is not caught until the machine runs short"
        );
    }

    anyhow::ensure!(
        args.max_inflight_bytes >= args.max_request_bytes,
        "--max-inflight-bytes ({}) must be at least --max-request-bytes ({}): a request of the largest size could \
         never be admitted",
        args.max_inflight_bytes,
        args.max_request_bytes
    );
    // The cache is made now, so that a directory given but unusable stops the agent here;
    // the default one, inside the model directory, may be read-only (then nothing is fetched).
    let model_cache = match &args.model_cache {
        // Fetched from the controllers: none to fetch from.
        _ if args.controller.is_empty() => None,
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating --model-cache {}", dir.display()))?;
            Some((dir.clone(), args.model_cache_bytes))
        }
        None => {
            let dir = args.model_dir.join(".fetched");
            match std::fs::create_dir_all(&dir) {
                Ok(()) => Some((dir, args.model_cache_bytes)),
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "no model cache (give --model-cache): files missing from --model-dir are not fetched");
                    None
                }
            }
        }
    };
    let cfg = AgentConfig {
        node: args.node.clone(),
        model_dir: args.model_dir.clone(),
        model_cache,
        controllers: args.controller.clone(),
        millicores: cores * 1000,
        memory_bytes,
        memory_total_bytes,
        overlap_transitions: args.overlap_transitions,
        queue_capacity: args.queue_capacity,
        max_request_bytes: args.max_request_bytes,
        max_inflight_bytes: args.max_inflight_bytes,
        process: ProcessConfig {
            exe: std::env::current_exe().context("locating the agent binary")?,
            ort_lib: args.ort_lib.canonicalize()?,
            fixed_threads: args.worker_threads,
            load_timeout: Duration::from_secs(args.load_timeout_s),
            run_as: args.worker_user.as_deref().map(worker_identity).transpose()?,
        },
        drain: Duration::from_secs(5),
        cold_start_wait: Duration::from_secs(args.cold_start_wait_s),
    };
    let mut registry = prometheus_client::registry::Registry::default();
    tidal_daemon::metrics_http::register_standard(&mut registry, "agent");
    let metrics = tidal_agent::metrics::AgentMetrics::new(&mut registry);
    // What /readyz answers: set with systemd's readiness, cleared when the agent stops.
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let token = args
        .inference_token_file
        .as_deref()
        .map(tidal_auth::Token::from_file)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let spawner =
        std::sync::Arc::new(tidal_agent::worker::Processes { cgroups: cgroups.clone(), config: cfg.process.clone() });
    let node = Node::new(cfg, cgroups, spawner, metrics, security.clone(), token);
    // Every task the agent starts, stopped by `stop` and awaited before the workers stop.
    let stop = CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    let mut bound = vec![("inference", listen_addr), ("control", control_addr)];
    if let Some(addr) = args.metrics_listen {
        let ready = ready.clone();
        let metrics_addr = tidal_daemon::metrics_http::spawn(
            addr,
            args.edge,
            registry,
            // A draining node is not ready: load balancers stop sending it requests.
            std::sync::Arc::new({
                let node = node.clone();
                move || ready.load(Ordering::Relaxed) && !node.draining()
            }),
        )
        .await
        .with_context(|| format!("listening for metrics on {addr}"))?;
        bound.push(("metrics", metrics_addr));
        // Keep the per-worker gauges fresh between scrapes.
        let node = node.clone();
        tasks.spawn(stop.clone().run_until_cancelled_owned(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                node.worker_telemetry();
            }
        }));
    }
    if !args.controller.is_empty() {
        let link = Link {
            controllers: args.controller.clone(),
            advertise: args.advertise.clone().unwrap_or_else(|| listen_addr.to_string()),
            advertise_control: args.advertise_control.clone().unwrap_or_else(|| control_addr.to_string()),
            interval: Duration::from_secs_f64(args.report_interval_s.max(0.1)),
        };
        tasks.spawn(link.run(node.clone(), stop.clone()));
    }
    let guard = tidal_auth::Guard::new(&security).with_revocations(node.revoked.clone());
    let port = InferencePort::new(node.clone(), guard.clone(), args.public_metadata);
    let control_service = ControlService { node: node.clone(), guard };
    info!(listen = %listen_addr, control_listen = %control_addr, node = %args.node, "agent serving");
    // The service checks --max-request-bytes itself, to answer RESOURCE_EXHAUSTED. gRPC's own
    // limit (tonic reads a message's length first and refuses it, OUT_OF_RANGE, before reading
    // it) is that plus room for the envelope: what an unauthenticated caller can make the agent
    // buffer per request. V2 REST carries tensors as JSON text, several times their bytes.
    let grpc_limit = args.max_request_bytes.saturating_add(1 << 20);
    let rest_limit = args.max_request_bytes.saturating_mul(4).max(64 << 20);
    let (statuses, health) = tidal_daemon::grpc_std::health();
    tasks.spawn(stop.clone().run_until_cancelled_owned(tidal_daemon::grpc_std::follow(
        statuses,
        HEALTH_EVERY,
        health_statuses(node.clone(), ready.clone()),
    )));
    let descriptors = [tidal_proto::TIDAL_DESCRIPTOR_SET, tidal_proto::KSERVE_V2_DESCRIPTOR_SET];
    // Messages may come gzip- or deflate-compressed (tritonclient's `compression_algorithm`),
    // and answers are compressed when the client accepts it (`grpc-accept-encoding`); the
    // message limit holds for the message as decompressed.
    macro_rules! compressed {
        ($server:expr) => {
            $server
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Deflate)
                .send_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Deflate)
        };
    }
    // One port for gRPC (HTTP/2) and V2's REST form (HTTP/1.1 or HTTP/2).
    let rest = tidal_agent::fronts::v2_rest::router(port.clone(), rest_limit);
    // The token is checked from the headers, before the message is read.
    // TLS is this port's own (below): tonic's offers HTTP/2 only by ALPN, which HTTP/1.1
    // clients of the REST form refuse at the handshake.
    let inference = bounded(tonic::transport::Server::builder(), args.max_streams)
        .accept_http1(true)
        .add_routes(rest.into())
        .add_service(TokenFirst::new(
            compressed!(InferenceServer::new(TidalApi(port.clone())).max_decoding_message_size(grpc_limit)),
            port.clone(),
            &[],
        ))
        .add_service(TokenFirst::new(
            compressed!(GrpcInferenceServiceServer::new(V2Grpc(port.clone())).max_decoding_message_size(grpc_limit)),
            port.clone(),
            V2_READS,
        ));
    let inference_services = [
        <InferenceServer<TidalApi> as tonic::server::NamedService>::NAME,
        <GrpcInferenceServiceServer<V2Grpc> as tonic::server::NamedService>::NAME,
    ];
    let inference = tidal_daemon::grpc_std::add_standard(inference, &health, &inference_services, &descriptors)?;
    let until = stop.clone().cancelled_owned();
    let inference =
        match security.tls_acceptor(ClientAuth::Optional)? {
            Some(tls) => tokio::spawn(inference.serve_with_incoming_shutdown(
                inference_listener.incoming_tls(tls, tidal_auth::tls::TLS_HANDSHAKE),
                until,
            )),
            None => tokio::spawn(inference.serve_with_incoming_shutdown(inference_listener.incoming(), until)),
        };
    let control = bounded(security.server_builder(ClientAuth::Required)?, args.max_streams)
        .add_service(AgentServer::new(control_service).max_decoding_message_size(grpc_limit));
    let control_services = [<AgentServer<ControlService> as tonic::server::NamedService>::NAME];
    let control = tidal_daemon::grpc_std::add_standard(control, &health, &control_services, &descriptors)?
        .serve_with_incoming_shutdown(control_listener.incoming(), stop.clone().cancelled_owned());
    let (mut inference, mut control) = (inference, tokio::spawn(control));
    if let Some(path) = &args.ready_file {
        tidal_daemon::ready_file::write(path, &bound).with_context(|| format!("writing {}", path.display()))?;
    }
    tasks.spawn(stop.clone().run_until_cancelled_owned(announce_ready(
        node.clone(),
        !args.controller.is_empty(),
        ready.clone(),
    )));
    tidal_daemon::systemd::spawn_watchdog(|| true);
    let served = tokio::select! {
        _ = tidal_daemon::systemd::shutdown_signal() => Ok(()),
        r = &mut inference => r.map_err(anyhow::Error::from).and_then(|r| r.with_context(|| format!("serving inference on {listen_addr}"))),
        r = &mut control => r.map_err(anyhow::Error::from).and_then(|r| r.with_context(|| format!("serving control on {control_addr}"))),
    };
    tidal_daemon::systemd::stopping();
    ready.store(false, Ordering::Relaxed);
    stop.cancel();
    // The servers finish their calls and the agent's tasks end before the workers stop.
    tidal_daemon::stopping::wait_for([inference, control], &tasks).await;
    info!("stopping workers");
    node.shutdown().await;
    served
}

/// Tells systemd the agent is ready once it serves: with a controller, once a plan is applied
/// and every worker it asks of this node is ready (a restarted agent is not ready before it
/// can serve its share); without one, at once.
async fn announce_ready(node: std::sync::Arc<Node>, has_controller: bool, ready: std::sync::Arc<AtomicBool>) {
    loop {
        let (workers, serving) = node.workers_serving();
        let applied = node.applied_epoch();
        if !has_controller || (applied > 0 && serving) {
            let status = format!("node {}: plan {applied} applied, {workers} workers ready", node.cfg.node);
            tidal_daemon::systemd::ready(&status);
            ready.store(true, Ordering::Relaxed);
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How often the health service looks at the node.
const HEALTH_EVERY: Duration = Duration::from_millis(250);

/// What `grpc.health.v1` answers on both ports: the agent ("" and its inference services)
/// serves once it is ready (as systemd and `/readyz` are told) until it stops, and not while
/// its node drains; each task of the applied plan, by its name, serves while a request of it
/// can be served here.
fn health_statuses(
    node: std::sync::Arc<Node>,
    ready: std::sync::Arc<AtomicBool>,
) -> impl FnMut() -> std::collections::BTreeMap<String, bool> + Send {
    move || {
        let ready = ready.load(Ordering::Relaxed) && !node.draining();
        let services = ["", "tidal.v1.Inference", "inference.GRPCInferenceService"];
        let mut statuses: std::collections::BTreeMap<String, bool> =
            services.iter().map(|s| (s.to_string(), ready)).collect();
        statuses.extend(node.task_names().into_iter().map(|t| {
            let serving = ready && node.task_ready(&t);
            (t, serving)
        }));
        statuses
    }
}

fn listen(
    addr: SocketAddr,
    limits: tidal_daemon::edge::EdgeLimits,
    what: &'static str,
) -> anyhow::Result<tidal_daemon::edge::EdgeListener> {
    tidal_daemon::edge::EdgeListener::bind(addr, limits, what)
        .with_context(|| format!("listening for {what} on {addr}"))
}

/// A server's HTTP/2 bounds: streams per connection, and pings that keep a live client's
/// connection from looking silent (see `tidal_daemon::edge`).
fn bounded(server: tonic::transport::Server, max_streams: u32) -> tonic::transport::Server {
    server
        .max_concurrent_streams(max_streams)
        .http2_keepalive_interval(Some(tidal_daemon::edge::HTTP2_KEEPALIVE))
        .http2_keepalive_timeout(Some(tidal_daemon::edge::HTTP2_KEEPALIVE))
}

/// The machine's memory (`MemTotal` of /proc/meminfo), bytes.
fn machine_memory() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no MemTotal line")?;
    Ok(kib.saturating_mul(1024))
}

/// `--memory` as bytes: a size, or a percentage of `total`.
fn node_memory(text: &str, total: u64) -> Result<u64, String> {
    let bytes = match text.trim().strip_suffix('%') {
        Some(percent) => {
            let p: f64 = percent.trim().parse().map_err(|_| format!("--memory {text:?}: not a percentage"))?;
            if !(0.0..=100.0).contains(&p) {
                return Err(format!("--memory {text:?}: a share of the machine's memory is 0–100 %"));
            }
            (total as f64 * p / 100.0) as u64
        }
        None => tidal_common::memory::parse_size(text).map_err(|e| format!("--memory: {e}"))?,
    };
    if total > 0 && bytes > total {
        return Err(format!("--memory {text}: more than the machine's {}", tidal_common::memory::human(total)));
    }
    Ok(bytes)
}
