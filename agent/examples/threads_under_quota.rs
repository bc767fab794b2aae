//! Measurement: a worker held to one core's quota (or another), run with 1, 2, 8, 16 and 48 ONNX Runtime
//! intra-op threads: batches per second, samples per second and the p99 of a batch's time, for
//! each thread count and batch size. The workers are the agent's own (`tidal-agent worker`, each
//! in its own cgroup at 1000 millicores); they run in interleaved rounds (each round gives
//! every thread count one window, in a rotating order), so the machine's drift falls on all
//! alike, and each figure is reported as its ratio to one thread's in the same round.
//!
//! `cargo run --release -p tidal-agent --example threads_under_quota -- MODEL [ROUNDS] [SECONDS]
//! [MILLICORES]` as root (cgroups), with TIDAL_ORT_LIB set and the agent binary built; another
//! quota than one core (e.g. 1500) is held by every worker alike.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use tidal_agent::cgroup::{CgroupDriverChoice, CpuCgroups};
use tidal_agent::worker::{ProcessConfig, WorkerProcess};
use tidal_agent::worker_protocol::FrameTensor;
use tidal_common::variant::VariantConfig;

const THREADS: [usize; 5] = [1, 2, 8, 16, 48];
const BATCHES: [usize; 2] = [1, 8];

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = PathBuf::from(args.next().context("usage: threads_under_quota MODEL [ROUNDS] [SECONDS]")?);
    let rounds: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let window = Duration::from_secs_f64(args.next().map(|s| s.parse()).transpose()?.unwrap_or(3.0));
    let millicores: u32 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let ort_lib = PathBuf::from(std::env::var("TIDAL_ORT_LIB").context("TIDAL_ORT_LIB")?);
    let exe = std::env::current_exe()?.parent().and_then(|d| d.parent()).context("target dir")?.join("tidal-agent");
    let cfg = VariantConfig::load(model.parent().context("model dir")?, model.file_stem().unwrap().to_str().unwrap())
        .context("the model's variant config (tidalctl models generate writes it)")?;
    let cgroups = CpuCgroups::setup(CgroupDriverChoice::Auto, &format!("tidal-threads/{}", std::process::id()))?;
    let mut workers = Vec::new();
    for threads in THREADS {
        let config = ProcessConfig {
            exe: exe.clone(),
            ort_lib: ort_lib.clone(),
            fixed_threads: Some(threads),
            load_timeout: Duration::from_secs(120),
            run_as: None,
        };
        let cgroup = cgroups.create(&format!("threads-{threads}"))?;
        let process = WorkerProcess::spawn(&config, &model, &cgroup, millicores).await?;
        workers.push((threads, cgroup, process));
    }
    println!(
        "{} ({}), a quota of {millicores} millicores ({}), {rounds} rounds of {window:?} per thread count and batch",
        cfg.name,
        model.display(),
        cgroups.driver_name()
    );
    for batch in BATCHES {
        let mut shape = vec![batch as i64];
        shape.extend(&cfg.input_shape);
        let count: i64 = shape.iter().product();
        let values: Vec<f32> = (0..count).map(|i| (i % 255) as f32 / 255.0).collect();
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let input = vec![FrameTensor { name: String::new(), datatype: "FP32".into(), shape, data }];
        // Per thread count: each round's (batches/s, p99 ms).
        let mut figures: Vec<Vec<(f64, f64)>> = vec![Vec::new(); THREADS.len()];
        for round in 0..rounds {
            for k in 0..THREADS.len() {
                let i = (k + round) % THREADS.len();
                let process = &mut workers[i].2;
                // A warm-up batch: the threads wake and the allocator settles.
                process.run(input.clone(), millicores).await?;
                let mut times = Vec::new();
                let started = Instant::now();
                while started.elapsed() < window {
                    let t = Instant::now();
                    let result = process.run(input.clone(), millicores).await?;
                    anyhow::ensure!(result.error.is_empty(), "{}", result.error);
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
                let rate = times.len() as f64 / started.elapsed().as_secs_f64();
                times.sort_by(f64::total_cmp);
                let p99 = times[((times.len() as f64 * 0.99).ceil() as usize).clamp(1, times.len()) - 1];
                figures[i].push((rate, p99));
            }
        }
        println!("\nbatch {batch}:");
        println!("| threads | samples/s (median of rounds) | vs 1 thread (median, min–max) | p99 ms (median) | p99 vs 1 thread |");
        println!("|---|---|---|---|---|");
        for (i, threads) in THREADS.iter().enumerate() {
            let rate: Vec<f64> = figures[i].iter().map(|f| f.0 * batch as f64).collect();
            let p99: Vec<f64> = figures[i].iter().map(|f| f.1).collect();
            let rate_ratio: Vec<f64> = figures[i].iter().zip(&figures[0]).map(|(f, one)| f.0 / one.0).collect();
            let p99_ratio: Vec<f64> = figures[i].iter().zip(&figures[0]).map(|(f, one)| f.1 / one.1).collect();
            println!(
                "| {threads} | {:.1} | {:.2} ({:.2}–{:.2}) | {:.1} | {:.2} |",
                median(&rate),
                median(&rate_ratio),
                min(&rate_ratio),
                max(&rate_ratio),
                median(&p99),
                median(&p99_ratio)
            );
        }
    }
    for (_, cgroup, process) in workers {
        process.stop(Duration::from_secs(2)).await;
        cgroup.remove();
    }
    cgroups.remove();
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}
