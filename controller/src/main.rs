//! `tidal-controller`: one replica of Tidal's controller.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tidal_auth::tls::ClientAuth;
use tidal_common::adapt::AdaptConfig;
use tidal_common::solver::PolicyKind;
use tidal_controller::consensus::{start, RaftConfig, RaftHandle};
use tidal_controller::controller::{Controller, ControllerConfig};
use tidal_controller::peer_service::RaftService;
use tidal_controller::service::ControllerService;
use tidal_controller::transport::AddressBook;
use tidal_proto::v1::controller_server::ControllerServer;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "tidal-controller",
    version,
    about = "Tidal controller replica: forecasts load, solves for a plan every interval, replicates it with Raft and pushes it to the agents"
)]
struct Args {
    /// This replica's Raft id (a positive integer, unique in the cluster).
    #[arg(long, env = "TIDAL_REPLICA_ID", default_value_t = 1)]
    id: u64,
    /// Address of the gRPC API for agents and tidalctl.
    #[arg(long, env = "TIDAL_LISTEN", default_value = "127.0.0.1:7000")]
    listen: SocketAddr,
    /// Address of the Raft peer port, for the other replicas only.
    #[arg(long, env = "TIDAL_PEER_LISTEN", default_value = "127.0.0.1:7001")]
    peer_listen: SocketAddr,
    #[command(flatten)]
    tls: tidal_auth::TlsArgs,
    #[command(flatten)]
    log: tidal_daemon::logging::LogArgs,
    #[command(flatten)]
    edge: tidal_daemon::edge::EdgeLimits,
    /// Most requests one HTTP/2 connection may have open at once.
    #[arg(long, env = "TIDAL_MAX_STREAMS", default_value_t = 256)]
    max_streams: u32,
    /// Directory of the sled store (Raft log, hard state); created if missing.
    #[arg(long, env = "TIDAL_DATA_DIR", default_value = "tidal-controller-data")]
    data_dir: PathBuf,
    /// Directory of model files this replica sends to agents whose own model directory lacks
    /// a variant's file (laid out as theirs: the variant's `model_file` relative to it). The
    /// agent checks each file against the SHA-256 recorded at registration. Without it,
    /// agents must hold every file they are planned.
    #[arg(long, env = "TIDAL_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// Seconds between adaptation rounds.
    #[arg(long, env = "TIDAL_INTERVAL_S", default_value_t = AdaptConfig::default().interval_s)]
    interval_s: f64,
    /// Planning policy: tidal (variant mix, vertical and horizontal scaling, batching) or one
    /// of the research systems and baselines it is compared with.
    #[arg(long, env = "TIDAL_POLICY", default_value = "tidal", value_parser = parse_policy)]
    policy: PolicyKind,
    #[command(flatten)]
    adapt: tidal_daemon::adapt_args::AdaptArgs,
    /// Seconds a new worker takes to serve, assumed where the agents have not measured a
    /// variant's load yet (Tidal weighs a plan change by the requests lost meanwhile).
    #[arg(long, env = "TIDAL_LOAD_TIME_S", default_value_t = AdaptConfig::default().load_time_s)]
    load_time_s: f64,
    /// Cores per node kept free of workers.
    #[arg(long, env = "TIDAL_RESERVE_CORES", default_value_t = 0)]
    reserve_cores: u32,
    /// Seconds without a telemetry report after which a node is planned around (its share
    /// moves to the other nodes) until it reports again.
    #[arg(long, env = "TIDAL_NODE_TIMEOUT_S", default_value_t = tidal_controller::observed::NODE_TIMEOUT.as_secs_f64())]
    node_timeout_s: f64,
    /// Address to serve Prometheus metrics on (`GET /metrics`); none when not given.
    #[arg(long, env = "TIDAL_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Once every port is bound, write the addresses bound here, as JSON (`api`, `peer`,
    /// `metrics`): with port 0 in a listen address, how whoever started the replica learns the
    /// port the system picked. (A replica of a group needs its peer address known to the others
    /// beforehand: give it a port, or --advertise-peer.)
    #[arg(long, env = "TIDAL_READY_FILE")]
    ready_file: Option<PathBuf>,
    /// The replicas of the group as ID=API_HOST:PORT/PEER_HOST:PORT,… (each one's API and
    /// Raft peer addresses). A fresh store is bootstrapped with these as voters unless --join
    /// is given; without --peers the replica forms a group of one.
    #[arg(long, env = "TIDAL_PEERS", value_delimiter = ',', value_parser = parse_peer)]
    peers: Vec<(u64, String)>,
    /// Start empty and wait to be added to an existing group (`tidalctl controller add`);
    /// --peers then names replicas already in it.
    #[arg(long, env = "TIDAL_JOIN")]
    join: bool,
    /// Address agents and tidalctl reach this replica's API at (default: --listen).
    #[arg(long, env = "TIDAL_ADVERTISE")]
    advertise: Option<SocketAddr>,
    /// Address the other replicas reach this replica's peer port at (default: --peer-listen).
    #[arg(long, env = "TIDAL_ADVERTISE_PEER")]
    advertise_peer: Option<SocketAddr>,
    /// Milliseconds per Raft tick.
    #[arg(long, env = "TIDAL_TICK_MS", default_value_t = 50)]
    tick_ms: u64,
    /// Ticks without hearing from a leader before a follower stands for election (raft-rs
    /// randomises the timeout between this and twice this).
    #[arg(long, env = "TIDAL_ELECTION_TICKS", default_value_t = 8)]
    election_ticks: usize,
    /// Ticks between the leader's heartbeats (less than --election-ticks).
    #[arg(long, env = "TIDAL_HEARTBEAT_TICKS", default_value_t = 2)]
    heartbeat_ticks: usize,
    /// Start on a store that holds Raft state but neither copy of its watermark, which cannot
    /// tell whether it lost acknowledged writes (refused otherwise). For a group of one with
    /// no other copy of its state; a replica of a group is rebuilt from its peers instead.
    #[arg(long, env = "TIDAL_ACCEPT_UNVERIFIED_STORE")]
    accept_unverified_store: bool,
    /// Applied log entries after which the state is snapshotted and the log compacted.
    #[arg(long, env = "TIDAL_SNAPSHOT_ENTRIES", default_value_t = 1000)]
    snapshot_entries: u64,
}

fn parse_peer(s: &str) -> Result<(u64, String), String> {
    let (id, addr) = s.split_once('=').ok_or_else(|| format!("{s:?} is not ID=API_HOST:PORT/PEER_HOST:PORT"))?;
    let id: u64 = id.trim().parse().map_err(|_| format!("{id:?} is not a replica id"))?;
    if id == 0 {
        return Err("replica ids must be positive".into());
    }
    Ok((id, tidal_controller::transport::parse_replica_address(addr.trim())?))
}

fn parse_policy(s: &str) -> Result<PolicyKind, String> {
    s.parse()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tidal_daemon::logging::init(&args.log, "info,raft=warn")?.spawn_on_sighup();
    if args.id == 0 {
        anyhow::bail!("--id must be positive");
    }
    // Checked before anything is opened or bound.
    let adapt =
        args.adapt.config(args.policy.clone(), args.interval_s, args.load_time_s).map_err(anyhow::Error::msg)?;
    if !(args.node_timeout_s.is_finite() && (0.5..=86_400.0).contains(&args.node_timeout_s)) {
        anyhow::bail!("--node-timeout-s must be within 0.5–86400 seconds");
    }
    if args.heartbeat_ticks == 0 || args.election_ticks <= args.heartbeat_ticks {
        anyhow::bail!("--heartbeat-ticks must be positive and less than --election-ticks");
    }
    let security = tidal_auth::Security::from_args(&args.tls)?;
    if let Some(role) = security.role().filter(|r| **r != tidal_auth::Role::Controller(args.id)) {
        anyhow::bail!("--tls-cert is {role}'s certificate; replica {} needs controller/{}'s", args.id, args.id);
    }
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    if let Some(path) = &args.ready_file {
        tidal_daemon::ready_file::clear(path).with_context(|| format!("removing the old {}", path.display()))?;
    }
    // Bound first: a port in use fails the start, and port 0's pick is known before the
    // replica advertises its addresses.
    args.edge.validate().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(args.max_streams > 0, "--max-streams must be positive");
    let peer_listener = listen(args.peer_listen, args.edge, "peer")?;
    let api_listener = listen(args.listen, args.edge, "api")?;
    let (peer_addr, api_addr) = (peer_listener.local_addr()?, api_listener.local_addr()?);
    let mut bound = vec![("api", api_addr), ("peer", peer_addr)];
    let advertise = args.advertise.unwrap_or(api_addr).to_string();
    let advertise_peer = args.advertise_peer.unwrap_or(peer_addr).to_string();
    let (voters, peers) = membership(&args, &format!("{advertise}/{advertise_peer}"))?;
    let raft_cfg = RaftConfig {
        id: args.id,
        voters,
        peers,
        security: security.clone(),
        tick: Duration::from_millis(args.tick_ms.max(5)),
        election_ticks: args.election_ticks,
        heartbeat_ticks: args.heartbeat_ticks,
        snapshot_entries: args.snapshot_entries.max(1),
        accept_unverified_store: args.accept_unverified_store,
    };
    let raft = start(raft_cfg, &args.data_dir)
        .with_context(|| format!("opening the Raft store in {}", args.data_dir.display()))?;
    let cfg = ControllerConfig {
        adapt: AdaptConfig { reserve_cores: args.reserve_cores, ..adapt },
        advertise,
        node_timeout: Duration::from_secs_f64(args.node_timeout_s),
    };
    let mut registry = prometheus_client::registry::Registry::default();
    tidal_daemon::metrics_http::register_standard(&mut registry, "controller");
    let metrics = tidal_controller::metrics::ControllerMetrics::new(&mut registry);
    // Every call on both ports also refuses the certificates the group has revoked.
    let revoked = std::sync::Arc::new(tidal_controller::state::StateRevocations(raft.state.clone()));
    let guard = tidal_auth::Guard::new(&security).with_revocations(revoked);
    let raft_service = RaftService::server(raft.clone(), guard.clone());
    let raft_handle = raft.clone();
    let ctl = Controller::new(raft, cfg, metrics, security.clone());
    let pushing = ctl.clone();
    // Every task the daemon starts, stopped by `stop` and awaited before it exits.
    let stop = CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    if let Some(addr) = args.metrics_listen {
        // Ready while the Raft driver runs and the replica knows a leader (it can serve).
        let raft = raft_handle.clone();
        let ready = move || raft.is_running() && raft.status().leader != 0;
        let metrics_addr = tidal_daemon::metrics_http::spawn(addr, args.edge, registry, std::sync::Arc::new(ready))
            .await
            .with_context(|| format!("listening for metrics on {addr}"))?;
        bound.push(("metrics", metrics_addr));
        let ctl = ctl.clone();
        tasks.spawn(stop.clone().run_until_cancelled_owned(async move {
            loop {
                ctl.refresh_gauges();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }
    tasks.spawn(ctl.clone().run_adaptation(stop.clone()));
    let peer_server = bounded(security.server_builder(ClientAuth::Required)?, args.max_streams)
        .add_service(raft_service)
        .serve_with_incoming_shutdown(peer_listener.incoming(), stop.clone().cancelled_owned());
    let (statuses, health) = tidal_daemon::grpc_std::health();
    tasks.spawn(stop.clone().run_until_cancelled_owned(tidal_daemon::grpc_std::follow(
        statuses,
        HEALTH_EVERY,
        health_statuses(raft_handle.clone()),
    )));
    let models =
        args.model_dir.clone().map(|dir| std::sync::Arc::new(tidal_controller::model_store::ModelStore::new(dir)));
    let api_server = bounded(security.server_builder(ClientAuth::Required)?, args.max_streams)
        .add_service(ControllerServer::new(ControllerService { ctl, guard, models }));
    let api_services = [<ControllerServer<ControllerService> as tonic::server::NamedService>::NAME];
    let api_server =
        tidal_daemon::grpc_std::add_standard(api_server, &health, &api_services, &[tidal_proto::TIDAL_DESCRIPTOR_SET])?
            .serve_with_incoming_shutdown(api_listener.incoming(), stop.clone().cancelled_owned());
    let mut peer = tokio::spawn(peer_server);
    let mut api = tokio::spawn(api_server);
    if let Some(path) = &args.ready_file {
        tidal_daemon::ready_file::write(path, &bound).with_context(|| format!("writing {}", path.display()))?;
    }
    info!(listen = %api_addr, peer_listen = %peer_addr, id = args.id, data_dir = %args.data_dir.display(), "controller serving");
    tidal_daemon::systemd::ready(&format!("replica {} serving on {} (peers on {})", args.id, api_addr, peer_addr));
    let watched = raft_handle.clone();
    tidal_daemon::systemd::spawn_watchdog(move || watched.is_running());
    tokio::select! {
        _ = tidal_daemon::systemd::shutdown_signal() => {}
        r = &mut peer => r?.with_context(|| format!("serving the peer port {peer_addr}"))?,
        r = &mut api => r?.with_context(|| format!("serving the API on {api_addr}"))?,
    }
    tidal_daemon::systemd::stopping();
    // A leader that stops hands over first: the group skips an election timeout.
    if let Some(to) = raft_handle.step_down(Duration::from_secs(3)).await {
        info!(to, "handed leadership over before stopping");
    }
    stop.cancel();
    pushing.shutdown().await;
    // The servers finish their calls, the daemon's tasks end, then the Raft driver.
    tidal_daemon::stopping::wait_for([peer, api], &tasks).await;
    raft_handle.stop().await;
    info!("controller stopped");
    Ok(())
}

/// How often the health service looks at the replica's Raft state.
const HEALTH_EVERY: Duration = Duration::from_millis(250);

/// What the API port's `grpc.health.v1` answers: the replica ("" and the Controller service)
/// serves while its Raft driver runs and it knows a leader (writes reach the leader through
/// it); `tidal.v1.Controller.leader` serves on the leader only, for a balancer that wants to
/// send changes straight there.
fn health_statuses(raft: RaftHandle) -> impl FnMut() -> std::collections::BTreeMap<String, bool> + Send {
    move || {
        let status = raft.status();
        let serving = raft.is_running() && status.leader != 0;
        std::collections::BTreeMap::from([
            (String::new(), serving),
            ("tidal.v1.Controller".to_string(), serving),
            ("tidal.v1.Controller.leader".to_string(), serving && status.is_leader),
        ])
    }
}

/// The voters a fresh store starts with, and the addresses known from the command line.
fn membership(args: &Args, advertise: &str) -> anyhow::Result<(Vec<u64>, AddressBook)> {
    let mut peers = args.peers.clone();
    match peers.iter().find(|(id, _)| *id == args.id) {
        Some((_, addr)) if addr != advertise => {
            anyhow::bail!("--peers names {addr} for replica {} but it is reached at {advertise}", args.id)
        }
        Some(_) => {}
        None if args.join || peers.is_empty() => peers.push((args.id, advertise.to_string())),
        None => anyhow::bail!("--peers must include this replica ({}) unless it --join's a group", args.id),
    }
    let mut ids: Vec<u64> = peers.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        anyhow::bail!("--peers names a replica id twice");
    }
    let voters = if args.join { Vec::new() } else { ids };
    Ok((voters, AddressBook::new(peers)))
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
