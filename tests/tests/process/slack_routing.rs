//! Routing by slack, live: a burst larger than the accurate variant's worker can finish in
//! time is refused by plan-only routing, and taken by the standby of a cheaper variant (weight
//! 0, no share of the traffic) when the plan routes by slack (`tidal_common::slack`).

use std::collections::BTreeMap;

use tidal_common::variant::VariantConfig;
use tidal_proto::v1::{ApplyPlanRequest, InferRequest, Plan, Routing};
use tidal_tests::*;

const SLO_MS: u32 = 120;
const BURST: usize = 32;

/// The plan: resnet50 on one core takes all the traffic, resnet18 (batch 4) on the other none
/// (`standby`), or the other way round.
fn plan(epoch: u64, node: &str, r50: &VariantConfig, r18: &VariantConfig, routing: Routing, standby: bool) -> Plan {
    let mut plan = plan_for(epoch, node, "t", SLO_MS, &[(r50, 1000, 1), (r18, 1000, 4)]);
    plan.assignments[0].weight = if standby { 1.0 } else { 0.0 };
    plan.assignments[1].weight = if standby { 0.0 } else { 1.0 };
    plan.routing = routing as i32;
    plan
}

/// Warms the accurate worker (its estimate is fresh), then sends `BURST` requests at once:
/// how many each variant answered, and how many were refused or late.
async fn burst(addr: &str, shape: &[i64]) -> (BTreeMap<String, usize>, usize) {
    let mut client = inference_client(addr).await;
    for _ in 0..5 {
        let req = InferRequest { task: "t".into(), input: Some(sample(shape)), ..Default::default() };
        client.infer(req).await.expect("a warm-up request is served");
    }
    let calls = (0..BURST).map(|_| {
        let mut client = client.clone();
        let req = InferRequest { task: "t".into(), input: Some(sample(shape)), ..Default::default() };
        async move { client.infer(req).await.map(|r| r.into_inner().variant) }
    });
    let mut by_variant = BTreeMap::new();
    let mut failed = 0;
    for answer in futures::future::join_all(calls).await {
        match answer {
            Ok(variant) => *by_variant.entry(variant).or_default() += 1,
            Err(_) => failed += 1,
        }
    }
    (by_variant, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_the_accurate_worker_cannot_finish_spills_to_the_standby_only_by_slack() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "resnet18,resnet50", 64);
    let r18 = VariantConfig::load(&models, "resnet18").unwrap();
    let r50 = VariantConfig::load(&models, "resnet50").unwrap();
    let agent = start_agent(
        work.path(),
        AgentOpts { model_dir: &models, controller: None, extra: &["--cores", "2", "--metrics-listen", "127.0.0.1:0"] },
    );
    let apply = |plan: Plan| {
        let addr = agent.control_addr.clone();
        async move {
            agent_client(&addr)
                .await
                .apply_plan(ApplyPlanRequest { plan: Some(plan), ..Default::default() })
                .await
                .expect("plan applied");
        }
    };

    apply(plan(1, &agent.node, &r50, &r18, Routing::ByWeight, true)).await;
    wait_ready(&agent.control_addr, 2).await;
    let (by_weight, refused_by_weight) = burst(&agent.addr, &r50.input_shape).await;
    eprintln!("by the weights: {by_weight:?}, {refused_by_weight} refused or late");
    assert_eq!(by_weight.get("resnet18"), None, "weight 0 takes nothing by the weights");
    assert!(refused_by_weight > BURST / 4, "the burst is more than resnet50 finishes in {SLO_MS} ms");

    // The standby warm, as it is when a burst comes (a new session's first runs are slow):
    // a few requests while it takes the traffic, then back to standby, routing by slack.
    apply(plan(2, &agent.node, &r50, &r18, Routing::ByWeight, false)).await;
    let mut client = inference_client(&agent.addr).await;
    for _ in 0..5 {
        let req = InferRequest { task: "t".into(), input: Some(sample(&r18.input_shape)), ..Default::default() };
        assert_eq!(client.infer(req).await.expect("served").into_inner().variant, "resnet18");
    }
    apply(plan(3, &agent.node, &r50, &r18, Routing::BySlack, true)).await;
    let (by_slack, refused_by_slack) = burst(&agent.addr, &r50.input_shape).await;
    eprintln!("by slack: {by_slack:?}, {refused_by_slack} refused or late");
    assert!(by_slack.get("resnet18").copied().unwrap_or(0) > 0, "the standby took a share: {by_slack:?}");
    assert!(
        by_slack.get("resnet50").copied().unwrap_or(0) * 2 >= by_weight.get("resnet50").copied().unwrap_or(0),
        "resnet50 still serves what it can: {by_slack:?} against {by_weight:?}"
    );
    assert!(
        2 * refused_by_slack <= refused_by_weight,
        "{refused_by_slack} refused by slack, {refused_by_weight} by the weights"
    );

    let metrics_addr = agent.metrics_addr.as_deref().expect("the agent's metrics port");
    let (status, _, body) = http_exchange(metrics_addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200);
    let metrics = String::from_utf8_lossy(&body);
    assert!(
        metrics.lines().any(|l| l.starts_with("tidal_agent_slack_reroutes_total{")
            && l.contains("from=\"resnet50\"")
            && l.contains("to=\"resnet18\"")),
        "{metrics}"
    );
}
