//! Benchmark: resizing a worker in place, end to end. A plain gRPC client (as the controller
//! is) toggles one worker between 1 and 2 cores with a new plan each time, idle and then under
//! a closed-loop inference load on the same worker, and reports:
//! - inside the agent: from the plan's arrival to the new quota written to the kernel's
//!   cgroup file (the `apply_us` the agent answers with);
//! - for the client: from sending `ApplyPlan` to its answer, after which the test reads the
//!   quota back from the cgroup file (it must be in force by then).
//!
//! `cargo run --release -p tidal-agent --example resize_end_to_end -- MODEL_DIR VARIANT [TOGGLES]`
//! with TIDAL_ORT_LIB set and the agent binary built (`make bench` does both).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tidal_common::tensor::f32_tensor;
use tidal_common::variant::VariantConfig;
use tidal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tidal_proto::inference::ServerLiveRequest;
use tidal_proto::v1::agent_client::AgentClient;
use tidal_proto::v1::inference_client::InferenceClient;
use tidal_proto::v1::{ApplyPlanRequest, InferRequest};
use tonic::transport::Channel;

mod support;
use support::{CONTROL_LISTEN, LISTEN, TASK};

/// Concurrent callers of the load phase.
const CALLERS: usize = 4;
/// Pause between two toggles.
const GAP: Duration = Duration::from_millis(10);

// The toggling client drives its own I/O on one thread (as a controller's push does); the load
// runs on a runtime of its own.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_dir = PathBuf::from(args.next().unwrap_or_else(|| "models".into()));
    let variant = args.next().unwrap_or_else(|| "resnet18".into());
    let toggles: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(200);
    let ort_lib = PathBuf::from(std::env::var("TIDAL_ORT_LIB").context("set TIDAL_ORT_LIB")?);
    let cfg = VariantConfig::load(&model_dir, &variant)?;
    let _agent = support::BenchAgent::start(&model_dir, &ort_lib)?;
    let mut control = AgentClient::new(support::channel(CONTROL_LISTEN).await?);
    let (_, workers) = support::apply(&mut control, support::plan(&cfg, 1, 1000, 4)).await?;
    let worker = workers.first().context("the plan's worker")?;
    let cgroup = PathBuf::from(&worker.cgroup);
    println!(
        "{variant}: one worker toggled between 1 and 2 cores {toggles} times per phase, {} ms apart; cgroup {}",
        GAP.as_millis(),
        cgroup.display()
    );
    let mut epoch = 1;
    let idle = toggle(&mut control, &cfg, &cgroup, &mut epoch, toggles).await?;
    report("idle", idle);
    let mut probe = GrpcInferenceServiceClient::new(support::channel(LISTEN).await?);
    let mut empty = Vec::with_capacity(toggles);
    for _ in 0..toggles {
        let sent = Instant::now();
        probe.server_live(ServerLiveRequest {}).await?;
        empty.push(sent.elapsed().as_secs_f64() * 1e6);
        tokio::time::sleep(GAP).await;
    }
    println!(
        "  for scale, an empty gRPC round trip (ServerLive), idle:      p50 {:>7.0} µs  p99 {:>7.0}",
        support::percentile(&mut empty, 0.5),
        support::percentile(&mut empty, 0.99)
    );

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let inference = support::channel(LISTEN).await?;
    let load_runtime = tokio::runtime::Runtime::new()?;
    let load: Vec<_> = (0..CALLERS)
        .map(|_| {
            let caller = call_until(inference.clone(), cfg.input_shape.clone(), stop.clone(), served.clone());
            load_runtime.spawn(caller)
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let loaded = toggle(&mut control, &cfg, &cgroup, &mut epoch, toggles).await?;
    let rate = served.load(Ordering::Relaxed) as f64 / (started.elapsed().as_secs_f64() + 1.0);
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await?;
    }
    load_runtime.shutdown_background();
    report(&format!("under load ({CALLERS} closed-loop callers, {rate:.0} req/s)"), loaded);
    Ok(())
}

/// Agent-internal and client-observed times of each toggle, µs.
struct Toggles {
    agent: Vec<f64>,
    client: Vec<f64>,
}

async fn toggle(
    control: &mut AgentClient<Channel>,
    cfg: &VariantConfig,
    cgroup: &Path,
    epoch: &mut u64,
    toggles: usize,
) -> anyhow::Result<Toggles> {
    let mut out = Toggles { agent: Vec::with_capacity(toggles), client: Vec::with_capacity(toggles) };
    for i in 0..toggles {
        *epoch += 1;
        let millicores = if i % 2 == 0 { 2000 } else { 1000 };
        let plan = support::plan(cfg, *epoch, millicores, 4);
        let sent = Instant::now();
        let answer =
            control.apply_plan(ApplyPlanRequest { plan: Some(plan), ..Default::default() }).await?.into_inner();
        let client_us = sent.elapsed().as_secs_f64() * 1e6;
        let in_force = quota_millicores(cgroup)?;
        anyhow::ensure!(in_force == millicores, "toggle {i}: the cgroup holds {in_force} millicores, not {millicores}");
        out.agent.push(answer.apply_us as f64);
        out.client.push(client_us);
        tokio::time::sleep(GAP).await;
    }
    Ok(out)
}

/// The quota in the cgroup's file: `cpu.max` (v2) or `cpu.cfs_quota_us` / `cpu.cfs_period_us` (v1).
fn quota_millicores(dir: &Path) -> anyhow::Result<u32> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f));
    let (quota, period) = match read("cpu.max") {
        Ok(max) => {
            let mut it = max.split_whitespace();
            (it.next().unwrap_or("max").to_string(), it.next().unwrap_or("100000").to_string())
        }
        Err(_) => (read("cpu.cfs_quota_us")?.trim().to_string(), read("cpu.cfs_period_us")?.trim().to_string()),
    };
    let (quota, period): (f64, f64) = (quota.parse().context("quota")?, period.parse().context("period")?);
    Ok((quota / period * 1000.0).round() as u32)
}

async fn call_until(channel: Channel, shape: Vec<i64>, stop: Arc<AtomicBool>, served: Arc<AtomicU64>) {
    let mut client = InferenceClient::new(channel);
    let n: i64 = shape.iter().product();
    let mut full = vec![1];
    full.extend_from_slice(&shape);
    let input = f32_tensor(full, &vec![0.5; n as usize]);
    while !stop.load(Ordering::Relaxed) {
        let request =
            InferRequest { task: TASK.into(), input: Some(input.clone()), budget_ms: 0, ..Default::default() };
        if client.infer(request).await.is_ok() {
            served.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn report(phase: &str, mut t: Toggles) {
    let line = |name: &str, v: &mut Vec<f64>| {
        let (p50, p90, p99) = (support::percentile(v, 0.5), support::percentile(v, 0.9), support::percentile(v, 0.99));
        let max = v.iter().copied().fold(0.0, f64::max);
        println!("  {name:<58} p50 {p50:>7.0} µs  p90 {p90:>7.0}  p99 {p99:>7.0}  max {max:>7.0}");
    };
    println!("{phase}:");
    line("in the agent: plan arrived -> quota in the kernel's file", &mut t.agent);
    line("for the client: ApplyPlan sent -> answered, quota in force", &mut t.client);
}
