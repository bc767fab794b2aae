//! Routing across agents: a request sent to any agent reaches the task's workers on other
//! agents by the plan's weights, is served where it lands (never forwarded twice), and an
//! agent that goes away is routed around.

use std::collections::BTreeMap;
use std::time::Duration;

use tidal_common::variant::VariantConfig;
use tidal_proto::v1::{ApplyPlanRequest, InferRequest, Plan};
use tidal_tests::*;

/// Sends `n` requests to `addr`; how many each node served.
async fn served_by(addr: &str, shape: &[i64], n: usize) -> BTreeMap<String, usize> {
    let mut client = inference_client(addr).await;
    let mut by_node = BTreeMap::new();
    for _ in 0..n {
        let req = InferRequest { task: "t".into(), input: Some(sample(shape)), budget_ms: 0, ..Default::default() };
        let resp = client.infer(req).await.expect("the request is served").into_inner();
        assert_eq!(resp.output.expect("an output").shape, vec![1, 1000]);
        *by_node.entry(resp.node).or_default() += 1;
    }
    by_node
}

async fn apply(addr: &str, plan: &Plan) {
    agent_client(addr)
        .await
        .apply_plan(ApplyPlanRequest { plan: Some(plan.clone()), ..Default::default() })
        .await
        .expect("plan applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_route_shares_of_a_task_to_each_other() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 32);
    let r18 = VariantConfig::load(&models, "resnet18").unwrap();
    let a = start_agent(work.path(), AgentOpts { model_dir: &models, controller: None, extra: &[] });
    let b = start_agent(work.path(), AgentOpts { model_dir: &models, controller: None, extra: &[] });
    let addresses: std::collections::HashMap<String, String> =
        [(a.node.clone(), a.addr.clone()), (b.node.clone(), b.addr.clone())].into_iter().collect();

    // The only worker is on A: B sends everything there.
    let mut plan = plan_for(1, &a.node, "t", 2000, &[(&r18, 1000, 1)]);
    plan.node_addresses = addresses.clone();
    apply(&a.control_addr, &plan).await;
    apply(&b.control_addr, &plan).await;
    wait_ready(&a.control_addr, 1).await;
    let counts = served_by(&b.addr, &r18.input_shape, 10).await;
    assert_eq!(counts, BTreeMap::from([(a.node.clone(), 10)]), "B has no worker: A serves all");

    // One worker on each, half the traffic each: whichever agent is called, both serve.
    let mut plan = plan_for(2, &a.node, "t", 2000, &[(&r18, 1000, 1)]);
    let mut on_b = plan.assignments[0].clone();
    on_b.node = b.node.clone();
    plan.assignments.push(on_b);
    for assignment in &mut plan.assignments {
        assignment.weight = 0.5;
    }
    plan.node_addresses = addresses;
    apply(&a.control_addr, &plan).await;
    apply(&b.control_addr, &plan).await;
    wait_ready(&a.control_addr, 1).await;
    wait_ready(&b.control_addr, 1).await;
    let counts = served_by(&a.addr, &r18.input_shape, 20).await;
    assert_eq!(counts.get(&a.node), Some(&10), "{counts:?}");
    assert_eq!(counts.get(&b.node), Some(&10), "{counts:?}");

    // B goes away: A serves everything itself.
    let b_node = b.node.clone();
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let counts = served_by(&a.addr, &r18.input_shape, 10).await;
    assert_eq!(counts, BTreeMap::from([(a.node.clone(), 10)]), "B ({b_node}) is gone: A serves all");
}
