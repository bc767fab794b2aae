//! Write throughput of the replicated log: three replicas in one process, each with its own
//! sled store (fsync on every Ready) and the real gRPC transport on loopback. It commits
//! plans one after another, as the adaptation loop does (latency and plans per second), then
//! keeps many plan-sized writes in flight at once (throughput when proposals share fsyncs).
//!
//! `cargo run --release -p tidal-controller --example commit_throughput`

use std::time::{Duration, Instant};

use futures::future::join_all;
use hdrhistogram::Histogram;
use tidal_controller::local::{start_local_group, wait_leader};
use tidal_proto::v1::{command::Change, Assignment, Command, Plan, ProfilePoint, VariantProfile, VariantSpec};

fn plan(epoch: u64, term: u64) -> Command {
    let variant = VariantSpec {
        name: "resnet50".into(),
        model_file: "resnet50.onnx".into(),
        accuracy: 76.1,
        input_shape: vec![3, 224, 224],
        tensor_names: Default::default(),
        tokenizer_file: String::new(),
        io: None,
        model_sha256: String::new(),
    };
    let assignments = (0..16)
        .map(|i| Assignment {
            task: "classify".into(),
            stage: "classify".into(),
            variant: Some(variant.clone()),
            node: format!("node-{i}"),
            millicores: 4000,
            max_batch: 8,
            max_delay_ms: 12,
            weight: 1.0 / 16.0,
            replica: 0,
            memory_bytes: 0,
        })
        .collect();
    let task = tidal_common::task::single_stage("classify", 750, vec![variant]);
    let plan = Plan {
        epoch,
        term,
        tasks: vec![task],
        assignments,
        notes: vec!["classify: forecast 412.0 req/s, resnet50 ×16 on 4 cores, batch 8".into()],
        planned_rps: [("classify".to_string(), 412.0)].into_iter().collect(),
        ..Default::default()
    };
    Command { change: Some(Change::CommitPlan(plan)) }
}

/// A write of about a plan's size that is valid in any order (a stored profile).
fn profile_write(points: u32) -> Command {
    let points = (1..=points)
        .map(|i| ProfilePoint {
            cores: i % 8 + 1,
            batch: i % 16 + 1,
            latency_p99_ms: 10.0 + i as f64,
            throughput_rps: 100.0,
            ..Default::default()
        })
        .collect();
    Command {
        change: Some(Change::StoreProfile(VariantProfile {
            task: "classify".into(),
            variant: "resnet50".into(),
            points,
            ..Default::default()
        })),
    }
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("a work directory");
    let group = start_local_group(dir.path(), 3).expect("three replicas start");
    let leader = wait_leader(&group, Duration::from_secs(10)).await.expect("a leader is elected");
    let term = leader.status().term;
    // Something for the profile writes to refer to.
    let spec = match plan(1, term).change {
        Some(Change::CommitPlan(p)) => p.tasks[0].clone(),
        _ => unreachable!(),
    };
    leader.propose(Command { change: Some(Change::RegisterTask(spec)) }).await.expect("register the task");
    let bytes = prost::Message::encoded_len(&plan(1, term));

    let n = 300;
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    let started = Instant::now();
    for epoch in 1..=n {
        let t = Instant::now();
        leader.propose(plan(epoch, term)).await.expect("a plan commits");
        latency.record(t.elapsed().as_micros() as u64).unwrap_or_default();
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!("## Plan commits on 3 replicas (sled fsync, gRPC on loopback), {bytes}-byte plans");
    println!("| writes in flight | commits | per second | p50 | p99 |");
    println!("|---|---|---|---|---|");
    println!(
        "| 1 (one plan after another) | {n} | {:.0} | {:.1} ms | {:.1} ms |",
        n as f64 / elapsed,
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0
    );
    let write = profile_write(60);
    let write_bytes = prost::Message::encoded_len(&write);
    for inflight in [8usize, 64] {
        let rounds = 2000 / inflight;
        let mut latency = Histogram::<u64>::new(3).expect("histogram");
        let started = Instant::now();
        for _ in 0..rounds {
            let batch = (0..inflight).map(|_| {
                let (leader, write) = (leader.clone(), write.clone());
                async move {
                    let t = Instant::now();
                    leader.propose(write).await.expect("a write commits");
                    t.elapsed()
                }
            });
            for d in join_all(batch).await {
                latency.record(d.as_micros() as u64).unwrap_or_default();
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        println!(
            "| {inflight} ({write_bytes}-byte writes) | {} | {:.0} | {:.1} ms | {:.1} ms |",
            rounds * inflight,
            (rounds * inflight) as f64 / elapsed,
            latency.value_at_quantile(0.5) as f64 / 1000.0,
            latency.value_at_quantile(0.99) as f64 / 1000.0
        );
    }
    let followers_applied: Vec<u64> = group.iter().map(|h| h.status().applied).collect();
    println!("\napplied index per replica at the end: {followers_applied:?}");
}
