//! Benchmark: the agent's request path (gRPC → router → deadline queue → batcher → worker
//! process) against calling ONNX Runtime directly in one process, at the same batch size (1),
//! the same threads and one request in flight. Prints mean latency and throughput of each and
//! the ratio.
//!
//! `cargo run --release -p tidal-agent --example overhead -- MODEL_DIR VARIANT [REQUESTS]`
//! with TIDAL_ORT_LIB set and the agent binary built (`make bench` does both).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use tidal_agent::worker_process::{open_session, run_batch};
use tidal_agent::worker_protocol::Batch;
use tidal_common::tensor::f32_tensor;
use tidal_common::variant::VariantConfig;
use tidal_proto::v1::agent_client::AgentClient;
use tidal_proto::v1::inference_client::InferenceClient;
use tidal_proto::v1::{AgentStatusRequest, ApplyPlanRequest, Assignment, InferRequest, Plan};

const THREADS: usize = 2;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_dir = PathBuf::from(args.next().unwrap_or_else(|| "models".into()));
    let variant = args.next().unwrap_or_else(|| "resnet18".into());
    let requests: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let ort_lib = PathBuf::from(std::env::var("TIDAL_ORT_LIB").context("set TIDAL_ORT_LIB")?);
    let cfg = VariantConfig::load(&model_dir, &variant)?;
    let sample_len: i64 = cfg.input_shape.iter().product();
    let values: Vec<f32> = (0..sample_len).map(|i| (i % 255) as f32 / 255.0).collect();

    // Direct: one session in this process, batch 1, back to back.
    let mut session = open_session(&ort_lib, &model_dir.join(&cfg.model_file), THREADS)?;
    let input_name = session.inputs()[0].name().to_string();
    let mut shape = vec![1];
    shape.extend_from_slice(&cfg.input_shape);
    let batch = Batch { id: 1, shape: shape.clone(), data: values.clone() };
    for _ in 0..20 {
        run_batch(&mut session, &input_name, batch.clone())?;
    }
    let t = Instant::now();
    for _ in 0..requests {
        run_batch(&mut session, &input_name, batch.clone())?;
    }
    let direct = t.elapsed().as_secs_f64() / requests as f64;
    drop(session);

    // Through the agent: same model, 2 cores, batch 1, one request in flight.
    let through_agent =
        tokio::runtime::Runtime::new()?.block_on(agent_path(&model_dir, &cfg, &ort_lib, shape, &values, requests))?;
    println!(
        "{variant} batch 1, {THREADS} threads, {requests} sequential requests: direct ONNX Runtime {:.3} ms ({:.0} req/s); through the agent {:.3} ms ({:.0} req/s); overhead ratio {:.3} (+{:.3} ms per request)",
        direct * 1e3,
        1.0 / direct,
        through_agent * 1e3,
        1.0 / through_agent,
        through_agent / direct,
        (through_agent - direct) * 1e3
    );
    Ok(())
}

async fn agent_path(
    model_dir: &std::path::Path,
    cfg: &VariantConfig,
    ort_lib: &std::path::Path,
    shape: Vec<i64>,
    values: &[f32],
    requests: usize,
) -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().and_then(|p| p.parent()).context("target dir")?.join("tidal-agent");
    let (listen, control_listen) = ("127.0.0.1:7199", "127.0.0.1:7198");
    let mut agent = Command::new(&bin)
        .args([
            "serve",
            "--node",
            "bench",
            "--listen",
            listen,
            "--control-listen",
            control_listen,
            "--insecure-plaintext",
        ])
        .args(["--cores", "2", "--cgroup-subtree", "tidal-bench/agent"])
        .arg("--model-dir")
        .arg(model_dir)
        .arg("--ort-lib")
        .arg(ort_lib)
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let result = async {
        let connect = |url: &'static str| async move {
            loop {
                match tonic::transport::Channel::from_static(url).connect().await {
                    Ok(c) => break c,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        };
        let mut control = AgentClient::new(connect("http://127.0.0.1:7198").await);
        let channel = connect("http://127.0.0.1:7199").await;
        let plan = Plan {
            epoch: 1,
            term: 1,
            tasks: vec![tidal_common::task::single_stage("bench", 10_000, vec![cfg.spec()])],
            assignments: vec![Assignment {
                stage: "bench".into(),
                task: "bench".into(),
                variant: Some(cfg.spec()),
                node: "bench".into(),
                millicores: 2000,
                max_batch: 1,
                max_delay_ms: 0,
                weight: 1.0,
                replica: 0,
            }],
            ..Default::default()
        };
        control.apply_plan(ApplyPlanRequest { plan: Some(plan) }).await?;
        while !control.status(AgentStatusRequest {}).await?.into_inner().workers.iter().all(|w| w.ready) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut infer = InferenceClient::new(channel);
        let input = f32_tensor(shape, values);
        let call = || InferRequest { task: "bench".into(), input: Some(input.clone()), budget_ms: 0 };
        for _ in 0..20 {
            infer.infer(call()).await?;
        }
        let t = Instant::now();
        for _ in 0..requests {
            infer.infer(call()).await?;
        }
        Ok::<f64, anyhow::Error>(t.elapsed().as_secs_f64() / requests as f64)
    }
    .await;
    let _ = Command::new("kill").arg(agent.id().to_string()).status();
    let _ = agent.wait();
    result
}
