//! Benchmark: the agent's request path (gRPC → router → deadline queue → batcher → worker
//! process) against calling ONNX Runtime directly in one process, at batch 1, the same
//! threads and one request in flight, through Tidal's own API and through the standard
//! protocol (KServe V2).
//!
//! The machine is noisy, so the three paths are measured interleaved: in each round a short
//! block of requests goes each way (in a rotating order), the round's ratio is the agent's
//! mean latency over the direct one, and the report gives the median ratio with its spread
//! (p10–p90) over the rounds. Every process shares the same cores: the bench process (the
//! direct session and the gRPC client), the agent and its worker.
//!
//! `cargo run --release -p tidal-agent --example overhead -- MODEL_DIR VARIANT [ROUNDS] [BLOCK]`
//! with TIDAL_ORT_LIB set and the agent binary built (`make bench` does both).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use tidal_agent::worker_process::{open_env, open_session, run_batch};
use tidal_agent::worker_protocol::{Batch, FrameTensor};
use tidal_common::tensor::f32_tensor;
use tidal_common::variant::VariantConfig;
use tidal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tidal_proto::inference::model_infer_request::InferInputTensor;
use tidal_proto::inference::ModelInferRequest;
use tidal_proto::v1::agent_client::AgentClient;
use tidal_proto::v1::inference_client::InferenceClient;
use tidal_proto::v1::InferRequest;
use tonic::transport::Channel;

mod support;
use support::{CONTROL_LISTEN, LISTEN, TASK};

const THREADS: usize = 2;

/// The three ways a request goes.
#[derive(Clone, Copy)]
enum Route {
    Direct,
    Tidal,
    V2,
}

struct Clients {
    tidal: InferenceClient<Channel>,
    v2: GrpcInferenceServiceClient<Channel>,
    tidal_request: InferRequest,
    v2_request: ModelInferRequest,
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_dir = PathBuf::from(args.next().unwrap_or_else(|| "models".into()));
    let variant = args.next().unwrap_or_else(|| "resnet18".into());
    let rounds: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(60);
    let block: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);
    let ort_lib = PathBuf::from(std::env::var("TIDAL_ORT_LIB").context("set TIDAL_ORT_LIB")?);
    let cfg = VariantConfig::load(&model_dir, &variant)?;
    let sample_len: i64 = cfg.input_shape.iter().product();
    let values: Vec<f32> = (0..sample_len).map(|i| (i % 255) as f32 / 255.0).collect();
    let mut shape = vec![1];
    shape.extend_from_slice(&cfg.input_shape);

    let mut session = open_session(&open_env(&ort_lib)?, &model_dir.join(&cfg.model_file), THREADS)?;
    let input = FrameTensor {
        name: session.inputs()[0].name().to_string(),
        datatype: "FP32".into(),
        shape: shape.clone(),
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    let batch = Batch { id: 1, inputs: vec![input], outputs: Vec::new(), threads: 0, memory_limit: 0 };
    // The client drives its own I/O on this thread: no hand-over from a runtime thread per answer.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let agent = support::BenchAgent::start(&model_dir, &ort_lib)?;
    let result = (|| {
        let mut clients = rt.block_on(connect(&cfg, &shape, &values))?;
        let mut run = |path: Route, n: usize| -> anyhow::Result<f64> {
            let t = Instant::now();
            for _ in 0..n {
                match path {
                    Route::Direct => drop(run_batch(&mut session, &batch)?),
                    Route::Tidal => drop(rt.block_on(clients.tidal.infer(clients.tidal_request.clone()))?),
                    Route::V2 => drop(rt.block_on(clients.v2.model_infer(clients.v2_request.clone()))?),
                }
            }
            Ok(t.elapsed().as_secs_f64() / n as f64)
        };
        for path in [Route::Direct, Route::Tidal, Route::V2] {
            run(path, 20)?; // warm-up
        }
        let mut per_round = Vec::with_capacity(rounds);
        for round in 0..rounds {
            let mut order = [Route::Direct, Route::Tidal, Route::V2];
            order.rotate_left(round % 3);
            let mut means = [0.0; 3];
            for path in order {
                means[path as usize] = run(path, block)?;
            }
            per_round.push(means);
        }
        let breakdown = rt.block_on(breakdown(&mut clients, 200))?;
        Ok::<_, anyhow::Error>((per_round, breakdown))
    })();
    drop(agent);
    let (per_round, breakdown) = result?;
    report(&variant, rounds, block, &per_round);
    println!("  where a request through the agent spends its time (Tidal API, median of {} requests, µs):", 200);
    for (what, us) in breakdown {
        println!("    {what:<58} {us:>7.0}");
    }
    Ok(())
}

/// Where a request's time goes, from the timings the agent reports with each answer: medians
/// of each part over `n` sequential requests.
async fn breakdown(clients: &mut Clients, n: usize) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let mut parts: [Vec<f64>; 6] = Default::default();
    for _ in 0..n {
        let t = Instant::now();
        clients.v2.server_live(tidal_proto::inference::ServerLiveRequest {}).await?;
        parts[5].push(t.elapsed().as_micros() as f64);
        let t = Instant::now();
        let r = clients.tidal.infer(clients.tidal_request.clone()).await?.into_inner();
        let rtt = t.elapsed().as_micros() as f64;
        let stage = r.stages.first().context("the answer names its stage")?;
        let (total, stage_total) = (r.total_us as f64, stage.total_us as f64);
        let (queue, run) = (stage.queue_us as f64, stage.run_us as f64);
        let values = [rtt - total, total - stage_total, queue, stage_total - queue - run, run];
        for (part, v) in parts.iter_mut().zip(values) {
            part.push(v);
        }
    }
    let names = [
        "client and gRPC, both ways (round trip - agent's time)",
        "agent: checks, routing, answer (agent's - stage's time)",
        "queue: until the batcher takes it",
        "to the worker process and back (pipes, copies)",
        "ONNX Runtime in the worker",
        "for scale: a gRPC round trip without payload (ServerLive)",
    ];
    Ok(names.into_iter().zip(parts.into_iter().map(median)).collect())
}

fn report(variant: &str, rounds: usize, block: usize, per_round: &[[f64; 3]]) {
    let column = |i: usize| per_round.iter().map(|r| r[i]).collect::<Vec<f64>>();
    let ratio = |i: usize| per_round.iter().map(|r| r[i] / r[0]).collect::<Vec<f64>>();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "{variant}, batch 1, {THREADS} ONNX Runtime threads, one request in flight, {rounds} rounds of {block} requests per path, interleaved; {cores} cores shared by the client, the agent and its worker"
    );
    println!("  direct ONNX Runtime    median {:.3} ms per request", median(column(0)) * 1e3);
    for (i, name) in [(1, "Tidal API (tidal.v1)"), (2, "KServe V2 (inference)")] {
        let (p10, p50, p90) = spread(ratio(i));
        println!(
            "  {name:<22} median {:.3} ms; ratio to direct: median {p50:.3} (p10 {p10:.3}, p90 {p90:.3})",
            median(column(i)) * 1e3
        );
    }
}

fn median(v: Vec<f64>) -> f64 {
    spread(v).1
}

/// p10, p50, p90.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    let mut at = |p: f64| support::percentile(&mut v, p);
    (at(0.1), at(0.5), at(0.9))
}

/// Applies a one-worker plan (2 cores, batch 1) and connects both inference clients.
async fn connect(cfg: &VariantConfig, shape: &[i64], values: &[f32]) -> anyhow::Result<Clients> {
    let mut control = AgentClient::new(support::channel(CONTROL_LISTEN).await?);
    support::apply(&mut control, support::plan(cfg, 1, 2000, 1)).await?;
    let inference = support::channel(LISTEN).await?;
    let input = f32_tensor(shape.to_vec(), values);
    let v2_request = ModelInferRequest {
        model_name: TASK.into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: shape.to_vec(),
            ..Default::default()
        }],
        raw_input_contents: vec![input.data.clone()],
        ..Default::default()
    };
    Ok(Clients {
        tidal: InferenceClient::new(inference.clone()),
        v2: GrpcInferenceServiceClient::new(inference),
        tidal_request: InferRequest { task: TASK.into(), input: Some(input), budget_ms: 0, ..Default::default() },
        v2_request,
    })
}
