//! Failover, measured: a three-replica controller group and an agent serving a real model
//! under open-loop load; the leader is killed with SIGKILL again and again. For each kill it
//! times (from the kill) the moment a surviving replica leads and the moment the agent holds
//! a plan of the new leader's term; then it restarts the killed replica and lets it catch up.
//! At the end it compares the data plane's latency inside the failover windows with outside.
//!
//! `cargo run --release -p tidal-tests --example failover -- --trials 20`

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use tidal_proto::v1::{AgentStatusRequest, InferRequest, RegisterTaskRequest};
use tidal_tests::group::{list, Group};
use tidal_tests::*;

#[derive(Parser)]
struct Args {
    /// Leader kills to measure.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Open-loop requests per second on the data plane.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Seconds of steady state between a replica's restart and the next kill.
    #[arg(long, default_value_t = 2.0)]
    settle_s: f64,
    /// Extra arguments for every controller (Raft timing, e.g. "--tick-ms 50").
    #[arg(long, allow_hyphen_values = true, num_args = 0..)]
    controller_args: Vec<String>,
}

struct Sample {
    sent: Instant,
    latency: Duration,
    ok: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let work = tempfile::tempdir().expect("a work directory");
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 32);
    let r18 = tidal_common::variant::VariantConfig::load(&models, "resnet18").expect("resnet18 config");
    let mut controller_args = vec!["--interval-s", "5"];
    controller_args.extend(args.controller_args.iter().map(String::as_str));
    let mut group = Group::start(work.path(), 3, &controller_args);
    let controllers = group.addrs();
    let agent = start_agent(work.path(), AgentOpts { model_dir: &models, controller: Some(&controllers), extra: &[] });
    let leader = group.leader(Duration::from_secs(20)).await;
    let task = tidal_common::task::single_stage("t", 500, vec![r18.spec()]);
    group
        .client(leader)
        .await
        .register_task(RegisterTaskRequest { task: Some(task), ..Default::default() })
        .await
        .expect("task");
    wait_ready(&agent.control_addr, 1).await;
    eprintln!("cluster up: 3 replicas, agent serving resnet18; load at {} req/s", args.rate);

    let samples = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load =
        tokio::spawn(drive(agent.addr.clone(), r18.input_shape.clone(), args.rate, samples.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut agent_client = agent_client(&agent.control_addr).await;
    let mut to_leader = Vec::new();
    let mut to_plan = Vec::new();
    let mut windows = Vec::new();
    for trial in 1..=args.trials {
        let leader = group.leader(Duration::from_secs(20)).await;
        let term = group.view(leader).await.expect("the leader answers").term;
        let killed = Instant::now();
        group.kill(leader);
        let survivors: Vec<String> = group.ids().iter().filter(|&&id| id != leader).map(|&id| group.addr(id)).collect();
        let (mut led, mut planned) = (None, None);
        while led.is_none() || planned.is_none() {
            if led.is_none() {
                for addr in &survivors {
                    if list(addr).await.is_some_and(|v| v.leader == v.answered_by && v.term > term) {
                        led = Some(killed.elapsed());
                    }
                }
            }
            if planned.is_none() {
                let s = agent_client.status(AgentStatusRequest {}).await.expect("agent status").into_inner();
                if s.applied_term > term {
                    planned = Some(killed.elapsed());
                }
            }
            assert!(killed.elapsed() < Duration::from_secs(30), "trial {trial}: no failover within 30 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (led, planned) = (led.unwrap_or_default(), planned.unwrap_or_default());
        eprintln!(
            "trial {trial:>2}: replica {leader} killed; new leader after {:>4} ms, its plan at the agent after {:>4} ms",
            led.as_millis(),
            planned.as_millis()
        );
        to_leader.push(led.as_secs_f64() * 1000.0);
        to_plan.push(planned.as_secs_f64() * 1000.0);
        windows.push((killed, killed + planned));
        group.restart(leader);
        let addr = group.addr(leader);
        eventually(Duration::from_secs(30), "the restarted replica catches up", || async {
            let v = list(&addr).await?;
            (v.leader != 0 && v.applied >= v.commit && v.commit > 0).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_secs_f64(args.settle_s)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = load.await;

    println!("\n## Failover over {} leader kills (SIGKILL)", args.trials);
    println!("| from the kill to | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for (name, values) in [("a new leader", &mut to_leader), ("its plan applied at the agent", &mut to_plan)] {
        let max = values.iter().cloned().fold(0.0, f64::max);
        println!("| {name} | {:.0} ms | {:.0} ms | {:.0} ms |", percentile(values, 0.5), percentile(values, 0.99), max);
    }
    data_plane_report(&samples.lock().unwrap_or_else(|p| p.into_inner()), &windows);
}

/// Open-loop requests at `rate` until stopped, each recorded.
async fn drive(
    addr: String,
    shape: Vec<i64>,
    rate: f64,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let client = inference_client(&addr).await;
    let started = Instant::now();
    let mut i = 0u64;
    let mut inflight = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep_until((started + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        i += 1;
        let (mut client, samples, input) = (client.clone(), samples.clone(), sample(&shape));
        inflight.push(tokio::spawn(async move {
            let sent = Instant::now();
            let req = InferRequest { task: "t".into(), input: Some(input), budget_ms: 0, ..Default::default() };
            let ok = client.infer(req).await.is_ok();
            samples.lock().unwrap_or_else(|p| p.into_inner()).push(Sample { sent, latency: sent.elapsed(), ok });
        }));
    }
    for t in inflight {
        let _ = t.await;
    }
}

fn data_plane_report(samples: &[Sample], windows: &[(Instant, Instant)]) {
    let mut inside = Histogram::<u64>::new(3).expect("histogram");
    let mut outside = Histogram::<u64>::new(3).expect("histogram");
    let (mut errors_in, mut errors_out) = (0, 0);
    for s in samples {
        let during = windows.iter().any(|(a, b)| s.sent >= *a && s.sent <= *b);
        let us = s.latency.as_micros() as u64;
        match (during, s.ok) {
            (true, true) => inside.record(us).unwrap_or_default(),
            (false, true) => outside.record(us).unwrap_or_default(),
            (true, false) => errors_in += 1,
            (false, false) => errors_out += 1,
        }
    }
    println!("\n## Data plane (requests to the agent, open loop)");
    println!("| sent | answered | failed | p50 | p99 |");
    println!("|---|---|---|---|---|");
    for (name, h, errors) in [("during failovers", &inside, errors_in), ("outside failovers", &outside, errors_out)] {
        println!(
            "| {name} | {} | {errors} | {:.1} ms | {:.1} ms |",
            h.len(),
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0
        );
    }
}
