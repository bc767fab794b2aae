//! The control plane at scale: three controller replicas (separate processes, mutual TLS) and
//! many simulated agents in this process. Each agent speaks the real gRPC on its own TLS port
//! (bound on port 0): it registers, reports every task's arrivals every second, and takes the
//! plans the leader pushes (whole or as a change of the one it holds, rebuilt and validated as
//! the real agent does). Arrivals follow a slow wave per task, so plans keep changing.
//!
//! After a warm-up it measures, over the given minutes: the leader's round time and the time
//! from a plan's proposal to each agent's answer (its own histograms), what each agent received
//! per plan, the leader's CPU and memory (/proc), and at the end the Raft state on disk and the
//! last snapshot's size (the leader's log).
//!
//! `TIDAL_TEST_TLS=1 cargo run --release -p tidal-tests --example control_plane_scale -- \
//!     [agents=200] [tasks=50] [minutes=10] [interval_s=1]`

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use tidal_auth::tls::ClientAuth;
use tidal_auth::Role;
use tidal_proto::v1::agent_server::{Agent, AgentServer};
use tidal_proto::v1::controller_client::ControllerClient;
use tidal_proto::v1::{
    AgentStatus, AgentStatusRequest, ApplyPlanRequest, ApplyPlanResponse, Plan, ProfileRequest, ProfileResponse,
    RegisterNodeRequest, RegisterTaskRequest, StoreProfileRequest, TaskTelemetry, TelemetryReport, VariantProfile,
    VariantSpec,
};
use tidal_tests::group::Group;
use tidal_tests::*;
use tonic::{Request, Response, Status};

const CORES: u32 = 48;

/// What one simulated agent holds and saw.
struct FakeAgent {
    node: String,
    applied: Mutex<Option<Plan>>,
    /// (epoch, when, request bytes, as a delta).
    received: Mutex<Vec<(u64, Instant, usize, bool)>>,
}

#[derive(Clone)]
struct Service(Arc<FakeAgent>);

#[tonic::async_trait]
impl Agent for Service {
    async fn apply_plan(&self, request: Request<ApplyPlanRequest>) -> Result<Response<ApplyPlanResponse>, Status> {
        let arrived = Instant::now();
        let req = request.into_inner();
        let bytes = req.encoded_len();
        let mut applied = self.0.applied.lock().unwrap();
        let (plan, delta) = match (req.plan, req.delta) {
            (Some(p), None) => (tidal_common::plan::cut(&p, &self.0.node), false),
            (None, Some(d)) => {
                let base = applied
                    .as_ref()
                    .filter(|p| (p.epoch, p.term) == (req.base_epoch, req.base_term))
                    .ok_or_else(|| Status::failed_precondition("not the base this agent holds"))?;
                (tidal_common::plan::delta::apply(Some(base), &d).map_err(Status::invalid_argument)?, true)
            }
            _ => return Err(Status::invalid_argument("a plan or a delta")),
        };
        tidal_common::plan::validate_for_node(&plan, &self.0.node, CORES * 1000)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let epoch = plan.epoch;
        *applied = Some(plan);
        self.0.received.lock().unwrap().push((epoch, arrived, bytes, delta));
        Ok(Response::new(ApplyPlanResponse { applied_epoch: epoch, ..Default::default() }))
    }

    async fn profile(&self, _: Request<ProfileRequest>) -> Result<Response<ProfileResponse>, Status> {
        Err(Status::unimplemented("a simulated agent does not profile"))
    }

    async fn status(&self, _: Request<AgentStatusRequest>) -> Result<Response<AgentStatus>, Status> {
        Ok(Response::new(AgentStatus { node: self.0.node.clone(), ..Default::default() }))
    }
}

/// Task `t`'s arrival rate at second `s`: its own level between 20 and 400 req/s, on a wave of
/// ±25 % with a 5-minute period and its own phase.
fn rate(t: usize, s: u64) -> f64 {
    let level = 20.0 + ((t * 37) % 380) as f64;
    level * (1.0 + 0.25 * (std::f64::consts::TAU * s as f64 / 300.0 + t as f64).sin())
}

fn task_spec(t: usize) -> tidal_proto::v1::TaskSpec {
    let variants = (0..5)
        .map(|v| VariantSpec {
            name: format!("v{v}"),
            model_file: format!("v{v}.onnx"),
            accuracy: 70.0 + 2.0 * v as f64,
            input_shape: vec![3, 224, 224],
            tensor_names: Default::default(),
            tokenizer_file: String::new(),
            io: None,
            model_sha256: String::new(),
        })
        .collect();
    tidal_common::task::single_stage(&format!("task-{t}"), 500, variants)
}

/// The leader's /proc figures: CPU seconds used so far, resident and peak resident MiB.
fn proc_figures(pid: u32) -> (f64, f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line (11 and 12 after the command).
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (cpu, kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

/// One Prometheus histogram's cumulative buckets (le → count) and its sum, from a scrape.
fn histogram(text: &str, name: &str, labels: &str) -> (Vec<(f64, f64)>, f64) {
    let mut buckets = Vec::new();
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else { continue };
        let value: f64 = value.parse().unwrap_or(0.0);
        if key.starts_with(&format!("{name}_bucket{{")) && key.contains(labels) {
            let le = key.split("le=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("+Inf");
            buckets.push((if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) }, value));
        } else if key.starts_with(&format!("{name}_sum")) && key.contains(labels) {
            sum = value;
        }
    }
    (buckets, sum)
}

/// Of the observations between two scrapes: count, mean, and the bucket bounds of the median
/// and the 99th percentile.
fn between(before: &str, after: &str, name: &str, labels: &str) -> String {
    let ((b0, s0), (b1, s1)) = (histogram(before, name, labels), histogram(after, name, labels));
    let counts: Vec<(f64, f64)> =
        b1.iter().map(|&(le, c)| (le, c - b0.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, c)| *c))).collect();
    let total = counts.last().map_or(0.0, |(_, c)| *c);
    if total == 0.0 {
        return "none".into();
    }
    let bound = |q: f64| counts.iter().find(|(_, c)| *c >= q * total).map_or(f64::INFINITY, |(le, _)| *le);
    format!("{total:.0}, mean {:.4} s, p50 ≤ {} s, p99 ≤ {} s", (s1 - s0) / total, bound(0.5), bound(0.99))
}

async fn scrape(addr: &str) -> String {
    let (_, _, body) = http_exchange(addr, "GET", "/metrics", &[], b"").await;
    String::from_utf8_lossy(&body).into_owned()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(|s| s.parse::<f64>().ok());
    let agents = args.next().flatten().unwrap_or(200.0) as usize;
    let tasks = args.next().flatten().unwrap_or(50.0) as usize;
    let minutes = args.next().flatten().unwrap_or(10.0);
    let interval = args.next().flatten().unwrap_or(1.0);
    let ca = tidal_tests::tls::test_ca().expect("run with TIDAL_TEST_TLS=1: the point is mutual TLS");
    let work = tempfile::tempdir()?;
    eprintln!("work directory (logs): {}", work.path().display());
    let interval_arg = interval.to_string();
    let group = Group::start_with_metrics(work.path(), 3, &["--interval-s", &interval_arg]);
    let leader = group.leader(Duration::from_secs(30)).await;
    let leader_addr = group.addr(leader);
    eprintln!("replica {leader} leads; registering {tasks} tasks of 5 variants");
    let mut admin = controller_client(&leader_addr).await;
    for t in 0..tasks {
        let spec = task_spec(t);
        admin.register_task(RegisterTaskRequest { task: Some(spec.clone()), ..Default::default() }).await?;
        for (v, per_core) in [60.0, 35.0, 28.0, 16.0, 11.0].into_iter().enumerate() {
            let points =
                tidal_common::profile::synthetic(per_core, &[1, 2, 4, 8, 16], &[(1, 1.0), (4, 1.4), (16, 1.7)], 1.2);
            let profile = VariantProfile {
                task: spec.name.clone(),
                variant: format!("v{v}"),
                node: "agent-0".into(),
                points,
                ..Default::default()
            };
            admin.store_profile(StoreProfileRequest { profile: Some(profile) }).await?;
        }
    }

    eprintln!("starting {agents} simulated agents of {CORES} cores");
    let started = Instant::now();
    let mut fakes = Vec::new();
    let mut handles = Vec::new();
    for i in 0..agents {
        let node = format!("agent-{i}");
        let security = ca.security(&Role::Agent(node.clone()));
        let incoming = tidal_auth::tls::listen("127.0.0.1:0".parse()?)?;
        let address = incoming.local_addr()?.to_string();
        let fake =
            Arc::new(FakeAgent { node: node.clone(), applied: Mutex::new(None), received: Mutex::new(Vec::new()) });
        let server =
            security.server_builder(ClientAuth::Required)?.add_service(AgentServer::new(Service(fake.clone())));
        handles.push(tokio::spawn(async move { server.serve_with_incoming(incoming).await }));
        let endpoint = security.endpoint(&leader_addr)?;
        let mut ctl = ControllerClient::new(endpoint.connect().await?);
        let register = RegisterNodeRequest {
            node: node.clone(),
            address: address.clone(),
            cores: CORES,
            control_address: address,
            ..Default::default()
        };
        ctl.register_node(register).await?;
        let reporter = fake.clone();
        handles.push(tokio::spawn(async move {
            // A cheap per-agent generator rounds each task's share of the arrivals.
            let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            for second in 1u64.. {
                tick.tick().await;
                let s = started.elapsed().as_secs();
                let report = TelemetryReport {
                    node: reporter.node.clone(),
                    applied_epoch: reporter.applied.lock().unwrap().as_ref().map_or(0, |p| p.epoch),
                    tasks: (0..tasks)
                        .map(|t| {
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            let share = rate(t, s) / agents as f64;
                            let count = share.floor() + f64::from((seed % 1000) as f64 / 1000.0 < share.fract());
                            TaskTelemetry {
                                task: format!("task-{t}"),
                                arrivals_per_second: vec![count as u32],
                                first_second: Some(second - 1),
                                ..Default::default()
                            }
                        })
                        .collect(),
                    second: Some(second),
                    ..Default::default()
                };
                if let Err(status) = ctl.report_telemetry(report).await {
                    eprintln!("{}: telemetry refused: {status}", reporter.node);
                }
            }
            Ok(())
        }));
        fakes.push(fake);
    }
    let metrics = group.replicas.iter().find(|r| r.id == leader).and_then(|r| r.metrics.clone()).expect("metrics");
    let pid = group.pid(leader).expect("the leader runs");
    eprintln!("all registered after {:.1} s; warming up for 60 s", started.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(60)).await;

    let (cpu0, _, _) = proc_figures(pid);
    let before = scrape(&metrics).await;
    let measure_from = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(minutes * 60.0)).await;
    let seconds = measure_from.elapsed().as_secs_f64();
    let (cpu1, rss, peak) = proc_figures(pid);
    let after = scrape(&metrics).await;
    assert_eq!(group.agreed_leader().await, Some(leader), "the leader changed during the measurement");

    // Per plan epoch, from the first agent's receipt to the last's, and what each received.
    let mut epochs: BTreeMap<u64, (Instant, Instant, usize)> = BTreeMap::new();
    let mut bytes: HashMap<bool, Vec<usize>> = HashMap::new();
    for fake in &fakes {
        for &(epoch, at, size, delta) in fake.received.lock().unwrap().iter().filter(|r| r.1 >= measure_from) {
            let e = epochs.entry(epoch).or_insert((at, at, 0));
            e.0 = e.0.min(at);
            e.1 = e.1.max(at);
            e.2 += 1;
            bytes.entry(delta).or_default().push(size);
        }
    }
    let mut spreads: Vec<f64> = epochs.values().map(|(a, b, _)| b.duration_since(*a).as_secs_f64()).collect();
    let everyone = epochs.values().filter(|e| e.2 >= agents).count();
    let median = |v: &mut Vec<usize>| {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let log = std::fs::read_to_string(work.path().join(format!("controller-{leader}.log"))).unwrap_or_default();
    let snapshot = log
        .lines()
        .rfind(|l| l.contains("compacted the log into a snapshot"))
        .and_then(|l| l.split("bytes=").nth(1))
        .and_then(|b| b.split_whitespace().next())
        .unwrap_or("none yet")
        .to_string();
    let committed = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("tidal_controller_plans_committed_total"))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let du = |id: u64| {
        let out =
            std::process::Command::new("du").arg("-sk").arg(work.path().join(format!("controller-{id}"))).output();
        out.ok().and_then(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().next().map(String::from))
    };
    println!("{agents} agents, {tasks} tasks, interval {interval} s, measured over {seconds:.0} s");
    println!("plans committed: {:.0}", committed(&after) - committed(&before));
    println!(
        "round (forecast + solve + place): {}",
        between(&before, &after, "tidal_controller_adaptation_seconds", "")
    );
    println!(
        "proposal to an agent's answer: {}",
        between(&before, &after, "tidal_controller_plan_delivery_seconds", "")
    );
    println!(
        "first to last agent per plan: {} plans, {} reached all {agents}; p50 {:.3} s, p99 {:.3} s",
        spreads.len(),
        everyone,
        percentile(&mut spreads, 0.5),
        percentile(&mut spreads, 0.99)
    );
    println!(
        "an agent received per plan (median): {} B as a change ({} pushes), {} B whole ({} pushes)",
        median(bytes.entry(true).or_default()),
        bytes[&true].len(),
        median(bytes.entry(false).or_default()),
        bytes[&false].len()
    );
    for line in after.lines().filter(|l| l.starts_with("tidal_controller_plan_pushes_total")) {
        println!("{line}");
    }
    println!(
        "leader: {:.3} cores of CPU on average, {rss:.0} MiB resident ({peak:.0} MiB peak)",
        (cpu1 - cpu0) / seconds
    );
    println!(
        "raft state on disk (KiB) per replica: {:?}; the leader's last snapshot: {snapshot} bytes",
        group.ids().into_iter().map(du).collect::<Vec<_>>()
    );
    for h in handles {
        h.abort();
    }
    Ok(())
}
