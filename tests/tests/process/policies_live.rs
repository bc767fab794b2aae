//! A policy means the same live as in the simulator: the controller's `--policy` decides how
//! plans move workers (in place or blue-green), whether a burst re-plans between rounds, and
//! whether plans leave room for the network that requests' budgets show (Sponge).
//!
//! Each test runs a controller with a round interval far longer than the test, so that only
//! surges and explicit changes (an SLO change) start a round, and a synthetic profile of
//! resnet18 (20 req/s a core, measured on 2–4 cores) so that the plans are known in advance.

use std::time::Duration;

use tidal_common::variant::VariantConfig;
use tidal_proto::v1::controller_client::ControllerClient;
use tidal_proto::v1::{
    AgentStatusRequest, ClusterStatusRequest, InferRequest, Plan, ProfilePoint, RegisterTaskRequest, SetSloRequest,
    StoreProfileRequest, VariantProfile, WorkerTelemetry,
};
use tidal_tests::*;
use tonic::transport::Channel;

struct Cluster {
    agent: Agent,
    _controller: Proc,
    ctl: ControllerClient<Channel>,
    r18: VariantConfig,
    _work: tempfile::TempDir,
}

async fn cluster(policy: &str) -> Cluster {
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 32);
    // Its synthetic profiles stand for the truth: not corrected by the batches served.
    let (controller, addr) =
        start_controller(work.path(), 3600.0, &["--policy", policy, "--no-profile-correction", "--no-slack-routing"]);
    let agent =
        start_agent(work.path(), AgentOpts { model_dir: &models, controller: Some(&addr), extra: &["--cores", "4"] });
    let mut ctl = controller_client(&addr).await;
    wait_reporting(&ctl, &agent.node, "the agent to report").await;
    let r18 = VariantConfig::load(&models, "resnet18").unwrap();
    let task = tidal_common::task::single_stage("classify", 1000, vec![r18.spec()]);
    ctl.register_task(RegisterTaskRequest { task: Some(task), ..Default::default() }).await.unwrap();
    let points = (2..=4)
        .map(|c| ProfilePoint {
            cores: c,
            batch: 1,
            latency_p50_ms: 50.0 / c as f64,
            latency_p99_ms: 50.0 / c as f64,
            throughput_rps: 20.0 * c as f64,
            size: 0,
            output_tokens: 0,
            resident_bytes: 0,
        })
        .collect();
    let profile = VariantProfile {
        task: "classify".into(),
        variant: "resnet18".into(),
        node: agent.node.clone(),
        points,
        ..Default::default()
    };
    ctl.store_profile(StoreProfileRequest { profile: Some(profile) }).await.unwrap();
    Cluster { agent, _controller: controller, ctl, r18, _work: work }
}

impl Cluster {
    /// The plan in force once it satisfies `f`, and the agent's workers once they match it.
    async fn plan(&self, what: &str, f: impl Fn(&Plan) -> bool) -> (Plan, Vec<WorkerTelemetry>) {
        let agent = agent_client(&self.agent.control_addr).await;
        eventually(Duration::from_secs(30), what, || {
            let (mut ctl, mut agent) = (self.ctl.clone(), agent.clone());
            let f = &f;
            async move {
                let plan = ctl.status(ClusterStatusRequest {}).await.ok()?.into_inner().plan?;
                let s = agent.status(AgentStatusRequest {}).await.ok()?.into_inner();
                let applied = s.applied_epoch == plan.epoch && s.workers.iter().all(|w| w.ready);
                let matches = plan.assignments.len() == s.workers.len();
                (f(&plan) && applied && matches).then_some((plan, s.workers))
            }
        })
        .await
    }

    /// `n` requests at `rate` req/s, each with `budget_ms` (0: the SLO).
    async fn send(&self, rate: f64, n: usize, budget_ms: u32) {
        let client = inference_client(&self.agent.addr).await;
        let start = std::time::Instant::now();
        let mut tasks = Vec::new();
        for i in 0..n {
            tokio::time::sleep_until((start + Duration::from_secs_f64(i as f64 / rate)).into()).await;
            let mut client = client.clone();
            let req = InferRequest {
                task: "classify".into(),
                input: Some(sample(&self.r18.input_shape)),
                budget_ms,
                ..Default::default()
            };
            tasks.push(tokio::spawn(async move { client.infer(req).await.is_ok() }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += matches!(t.await, Ok(true)) as usize;
        }
        assert!(ok > n * 9 / 10, "only {ok} of {n} requests answered");
    }

    async fn set_slo(&self, slo_ms: u32) {
        self.ctl.clone().set_slo(SetSloRequest { task: "classify".into(), slo_ms }).await.unwrap();
    }
}

fn millicores(plan: &Plan) -> u32 {
    plan.assignments.iter().map(|a| a.millicores).sum()
}

/// A burst that the plan (2 cores: 32 req/s) cannot carry: Tidal re-plans at once and
/// resizes its worker in place; InfAdapter waits for the next round, then starts a worker of
/// the new size and retires the old one once it serves.
async fn burst_then_round(policy: &str) -> (Plan, Plan, bool, Vec<WorkerTelemetry>, Vec<WorkerTelemetry>) {
    let c = cluster(policy).await;
    let (before, workers_before) = c.plan("a 2-core plan", |p| millicores(p) == 2000).await;
    c.send(60.0, 240, 0).await;
    // Did the burst alone bring a new plan (within 5 s of its end)?
    let mut re_planned = false;
    for _ in 0..50 {
        let status = c.ctl.clone().status(ClusterStatusRequest {}).await.unwrap().into_inner();
        if status.plan.is_some_and(|p| p.epoch > before.epoch) {
            re_planned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An SLO change starts a round: the 60 req/s just seen call for all four cores.
    c.set_slo(900).await;
    let (after, workers_after) = c.plan("a 4-core plan", |p| millicores(p) == 4000 && p.tasks[0].slo_ms == 900).await;
    (before, after, re_planned, workers_before, workers_after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tidal_re_plans_on_a_burst_and_resizes_in_place() {
    let _turn = tidal_tests::file_turn(module_path!());
    let (before, after, re_planned, w0, w1) = burst_then_round("tidal").await;
    assert!(re_planned, "a surge re-plans between rounds");
    assert_eq!(after.transition, tidal_proto::v1::Transition::InPlace as i32);
    assert!(after.epoch > before.epoch);
    assert_eq!(w0[0].id, w1[0].id, "the same worker, resized");
    assert_eq!(w1[0].millicores, 4000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infadapter_waits_for_its_round_and_swaps_blue_green() {
    let _turn = tidal_tests::file_turn(module_path!());
    let (before, after, re_planned, w0, w1) = burst_then_round("infadapter").await;
    assert!(!re_planned, "InfAdapter does not re-plan on a surge: {:?}", after.notes);
    assert_eq!(after.transition, tidal_proto::v1::Transition::BlueGreen as i32);
    assert!(after.epoch > before.epoch);
    assert_eq!(w1.len(), 1, "the old worker retired once the new one served: {w1:?}");
    assert_ne!(w0[0].id, w1[0].id, "a new worker of the new size: {w0:?} → {w1:?}");
    assert_eq!(w1[0].millicores, 4000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sponge_plans_with_the_budgets_requests_arrive_with() {
    let _turn = tidal_tests::file_turn(module_path!());
    let c = cluster("sponge").await;
    c.plan("a first plan", |p| !p.assignments.is_empty()).await;
    // Requests that spent 700 ms of their 1000 ms on the network.
    c.send(10.0, 30, 300).await;
    c.set_slo(999).await;
    let (plan, _) = c
        .plan("a plan that leaves the network its share", |p| {
            p.tasks[0].slo_ms == 999 && p.notes.iter().any(|n| n.contains("ms of the SLO left to the network"))
        })
        .await;
    // 300 ms at 10 req/s: one core of 50 ms is not enough room with queueing; Sponge grows it.
    assert!(plan.notes.iter().any(|n| n.contains("699 ms of the SLO left to the network")), "{:?}", plan.notes);
}
