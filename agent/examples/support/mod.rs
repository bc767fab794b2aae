//! What the agent benchmarks share: an agent started as a child process on loopback ports,
//! serving one worker of a variant under a plan they push themselves.

// Each example uses some of these.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::Context;
use tidal_common::variant::VariantConfig;
use tidal_proto::v1::agent_client::AgentClient;
use tidal_proto::v1::{AgentStatusRequest, ApplyPlanRequest, ApplyPlanResponse, Assignment, Plan, WorkerTelemetry};
use tonic::transport::Channel;

pub const LISTEN: &str = "127.0.0.1:7199";
pub const CONTROL_LISTEN: &str = "127.0.0.1:7198";
/// The task the benchmarks' plans serve.
pub const TASK: &str = "classify";

/// The agent binary (`TIDAL_AGENT_BIN`, else the one built next to this example, for A/B runs
/// of two builds), started with 2 cores, plaintext, on [`LISTEN`] and [`CONTROL_LISTEN`], its
/// log in `tidal-bench-agent.log` in the temporary directory (a file, as under journald; not
/// /dev/null, which makes log writes free). Killed when dropped.
pub struct BenchAgent(Child);

impl BenchAgent {
    pub fn start(model_dir: &Path, ort_lib: &Path) -> anyhow::Result<Self> {
        let bin = match std::env::var_os("TIDAL_AGENT_BIN") {
            Some(bin) => bin.into(),
            None => {
                let exe = std::env::current_exe()?;
                exe.parent().and_then(|p| p.parent()).context("target dir")?.join("tidal-agent")
            }
        };
        let log = std::fs::File::create(std::env::temp_dir().join("tidal-bench-agent.log"))?;
        let child = Command::new(&bin)
            .args(["serve", "--node", "bench", "--listen", LISTEN, "--control-listen", CONTROL_LISTEN])
            .args(["--insecure-plaintext", "--cores", "2", "--cgroup-subtree", "tidal-bench/agent"])
            .arg("--model-dir")
            .arg(model_dir)
            .arg("--ort-lib")
            .arg(ort_lib)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self(child))
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// A plaintext channel to `addr`, retried until the agent listens.
pub async fn channel(addr: &str) -> anyhow::Result<Channel> {
    loop {
        match Channel::from_shared(format!("http://{addr}"))?.connect().await {
            Ok(c) => return Ok(c),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A plan (`epoch`) of one worker of `cfg` with `millicores` and batches of up to `max_batch`.
pub fn plan(cfg: &VariantConfig, epoch: u64, millicores: u32, max_batch: u32) -> Plan {
    Plan {
        epoch,
        term: 1,
        tasks: vec![tidal_common::task::single_stage(TASK, 10_000, vec![cfg.spec()])],
        assignments: vec![Assignment {
            stage: TASK.into(),
            task: TASK.into(),
            variant: Some(cfg.spec()),
            node: "bench".into(),
            millicores,
            max_batch,
            max_delay_ms: if max_batch > 1 { 2 } else { 0 },
            weight: 1.0,
            replica: 0,
            memory_bytes: 0,
        }],
        ..Default::default()
    }
}

/// Pushes `plan` and waits until every worker serves; their telemetry.
pub async fn apply(
    control: &mut AgentClient<Channel>,
    plan: Plan,
) -> anyhow::Result<(ApplyPlanResponse, Vec<WorkerTelemetry>)> {
    let answer = control.apply_plan(ApplyPlanRequest { plan: Some(plan), ..Default::default() }).await?.into_inner();
    loop {
        let workers = control.status(AgentStatusRequest {}).await?.into_inner().workers;
        if workers.iter().all(|w| w.ready) {
            return Ok((answer, workers));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// p-th percentile (0..=1) of `v`, by nearest rank.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}
