//! What forwarding costs: two agents, the task's only worker on A; the same sequential
//! requests sent to A directly and to B, which forwards them to A.
//!
//! `cargo run --release -p tidal-tests --example forwarding -- 300`

use std::time::Duration;

use hdrhistogram::Histogram;
use tidal_common::variant::VariantConfig;
use tidal_proto::v1::ApplyPlanRequest;
use tidal_tests::*;

async fn latencies(addr: &str, shape: &[i64], n: usize) -> Histogram<u64> {
    sequential_latencies(&mut inference_client(addr).await, "t", shape, n).await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(300);
    let work = tempfile::tempdir().expect("a work directory");
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 32);
    let r18 = VariantConfig::load(&models, "resnet18").expect("resnet18");
    let a = start_agent(work.path(), AgentOpts { model_dir: &models, controller: None, extra: &[] });
    let b = start_agent(work.path(), AgentOpts { model_dir: &models, controller: None, extra: &[] });
    let mut plan = plan_for(1, &a.node, "t", 2000, &[(&r18, 1000, 1)]);
    plan.node_addresses = [(a.node.clone(), a.addr.clone()), (b.node.clone(), b.addr.clone())].into_iter().collect();
    for addr in [&a.control_addr, &b.control_addr] {
        agent_client(addr)
            .await
            .apply_plan(ApplyPlanRequest { plan: Some(plan.clone()), ..Default::default() })
            .await
            .expect("plan");
    }
    wait_ready(&a.control_addr, 1).await;
    latencies(&a.addr, &r18.input_shape, 20).await; // warm up
    tokio::time::sleep(Duration::from_millis(200)).await;
    println!("| resnet18 32×32, 1 core, {n} sequential requests | p50 | p99 |");
    println!("|---|---|---|");
    for (name, addr) in [("to A, served by A", &a.addr), ("to B, forwarded to A", &b.addr)] {
        let h = latencies(addr, &r18.input_shape, n).await;
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!("| {name} | {:.2} ms | {:.2} ms |", ms(0.5), ms(0.99));
    }
}
