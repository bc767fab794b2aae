//! Several tasks on one cluster, as processes: a controller, two agents of two cores, three
//! tasks, real inference. Before the surge, one task holds two cores for its most accurate
//! variant; when another task's load surges, that task gets the cores it needs within an
//! interval or two, taken from the first (which moves to its faster variant), and no task is
//! ever planned without a worker. A flat load from idle is planned within the headroom.
//! The synthetic profiles stand for the truth: the controllers do not correct them by the
//! batches served (`--no-profile-correction`), so that the plans are known in advance.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidal_common::variant::VariantConfig;
use tidal_proto::v1::{
    ClusterStatusRequest, DrainNodeRequest, InferRequest, Plan, PlanHistoryRequest, RegisterTaskRequest,
    StoreProfileRequest,
};
use tidal_tests::*;

/// The cores the plan gives `task`.
fn cores_of(plan: &Plan, task: &str) -> u32 {
    plan.assignments.iter().filter(|a| a.task == task).map(|a| a.millicores / 1000).sum()
}

/// Open-loop requests of `task` at `rate` req/s for `secs` (answers or refusals alike: the
/// agents count arrivals either way); returns how many were answered.
async fn drive(addr: String, task: &'static str, shape: Vec<i64>, rate: f64, secs: f64) -> u64 {
    let client = inference_client(&addr).await;
    let ok = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut sent = Vec::new();
    for i in 0..(rate * secs) as u64 {
        tokio::time::sleep_until((started + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        let (mut client, ok, input) = (client.clone(), ok.clone(), sample(&shape));
        sent.push(tokio::spawn(async move {
            let req = InferRequest { task: task.into(), input: Some(input), budget_ms: 0, ..Default::default() };
            if client.infer(req).await.is_ok() {
                ok.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for s in sent {
        let _ = s.await;
    }
    ok.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surging_task_takes_cores_from_the_others_and_none_goes_without() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "resnet18,resnet50", 32);
    let controller = start_controller_ready(
        work.path(),
        2.0,
        &[
            "--forecast-window-s",
            "6",
            "--metrics-listen",
            "127.0.0.1:0",
            "--no-profile-correction",
            "--no-slack-routing",
        ],
    );
    let (ctl_addr, metrics) = (controller.addr.clone(), controller.metrics.clone().expect("the metrics port"));
    let a1 = start_agent(work.path(), AgentOpts { model_dir: &models, controller: Some(&ctl_addr), extra: &[] });
    let _a2 = start_agent(work.path(), AgentOpts { model_dir: &models, controller: Some(&ctl_addr), extra: &[] });
    let mut ctl = controller_client(&ctl_addr).await;
    let r18 = VariantConfig::load(&models, "resnet18").unwrap();
    let r50 = VariantConfig::load(&models, "resnet50").unwrap();
    for task in ["surging", "steady", "quiet"] {
        let spec = tidal_common::task::single_stage(task, 1000, vec![r18.spec(), r50.spec()]);
        ctl.register_task(RegisterTaskRequest { task: Some(spec), ..Default::default() }).await.unwrap();
        for (variant, per_core) in [("resnet18", 100.0), ("resnet50", 40.0)] {
            let profile = Some(stored_profile(task, variant, per_core));
            ctl.store_profile(StoreProfileRequest { profile }).await.unwrap();
        }
    }
    let both = |plan: &Plan| {
        let nodes: std::collections::BTreeSet<&str> = plan.assignments.iter().map(|a| a.node.as_str()).collect();
        nodes.len() == 2
    };
    eventually(Duration::from_secs(30), "a plan on both agents", || {
        let mut ctl = ctl.clone();
        async move { ctl.status(ClusterStatusRequest {}).await.ok()?.into_inner().plan.filter(|p| both(p)) }
    })
    .await;
    // The status says how each agent answered the leader's latest push.
    eventually(Duration::from_secs(10), "both agents' answers in the status", || {
        let mut ctl = ctl.clone();
        async move {
            let nodes = ctl.status(ClusterStatusRequest {}).await.ok()?.into_inner().nodes;
            let answered = |n: &tidal_proto::v1::NodeStatus| {
                n.last_push
                    .as_ref()
                    .is_some_and(|p| p.outcome == "applied" && p.epoch == n.applied_epoch && p.held.is_empty())
            };
            (nodes.len() == 2 && nodes.iter().all(answered)).then_some(())
        }
    })
    .await;

    // `steady` at 50 req/s (55 with the headroom): resnet50 on two cores (64 req/s planned) is
    // worth the cores while the others idle.
    let shape = r18.input_shape.clone();
    let steady = tokio::spawn(drive(a1.addr.clone(), "steady", shape.clone(), 50.0, 40.0));
    let quiet = tokio::spawn(drive(a1.addr.clone(), "quiet", shape.clone(), 5.0, 40.0));
    let before = eventually(Duration::from_secs(20), "steady on two cores", || {
        let mut ctl = ctl.clone();
        async move {
            let plan = ctl.status(ClusterStatusRequest {}).await.ok()?.into_inner().plan?;
            (cores_of(&plan, "steady") == 2).then_some(plan)
        }
    })
    .await;
    println!("before the surge: {:?}", before.notes);

    // `surging` jumps to 130 req/s (143): two cores of resnet18. Four cores in all: steady has
    // to give one up and carry its 50 req/s on resnet18.
    let surge_started = Instant::now();
    let surging = tokio::spawn(drive(a1.addr.clone(), "surging", shape.clone(), 130.0, 20.0));
    let during = eventually(Duration::from_secs(15), "the surging task on two cores", || {
        let mut ctl = ctl.clone();
        async move {
            let plan = ctl.status(ClusterStatusRequest {}).await.ok()?.into_inner().plan?;
            (cores_of(&plan, "surging") >= 2).then_some(plan)
        }
    })
    .await;
    let took = surge_started.elapsed();
    println!("{took:?} after the surge began: {:?}", during.notes);
    if took >= Duration::from_secs(8) {
        // Say what the rounds planned meanwhile, so that a slow answer can be told apart.
        let history = ctl.history(PlanHistoryRequest { limit: 20 }).await.unwrap().into_inner().plans;
        let rounds: Vec<String> = history.iter().map(|p| format!("epoch {}: {:?}", p.epoch, p.notes)).collect();
        panic!(
            "the surging task waited {took:?} for its cores (interval 2 s); the latest plans:\n{}",
            rounds.join("\n")
        );
    }
    assert_eq!(cores_of(&during, "steady"), 1, "{:?}", during.notes);
    assert!(cores_of(&during, "quiet") >= 1, "{:?}", during.notes);
    let steady_variants: Vec<&str> = during
        .assignments
        .iter()
        .filter(|a| a.task == "steady")
        .map(|a| a.variant.as_ref().unwrap().name.as_str())
        .collect();
    assert_eq!(steady_variants, ["resnet18"], "{:?}", during.notes);
    let answered = (surging.await.unwrap(), steady.await.unwrap(), quiet.await.unwrap());
    println!("answered: surging {}, steady {}, quiet {}", answered.0, answered.1, answered.2);
    assert!(answered.1 > 40 * 50 * 8 / 10, "steady lost its requests: {answered:?}");

    // No plan since the first on both agents left a task without a worker.
    let history = ctl.history(PlanHistoryRequest { limit: 1000 }).await.unwrap().into_inner().plans;
    let first = history.iter().position(both).expect("a plan on both agents");
    for plan in &history[first..] {
        for task in ["surging", "steady", "quiet"] {
            assert!(cores_of(plan, task) >= 1, "plan {} left {task} without a worker: {:?}", plan.epoch, plan.notes);
        }
        assert!(plan.assignments.iter().map(|a| a.millicores).sum::<u32>() <= 4000, "{:?}", plan.notes);
    }

    // After its first plan, each agent was sent the plans as the change of the one it held,
    // and refused none. (A change can miss its base when a report of the older epoch sent the
    // same plan again meanwhile; that agent is sent the plan whole.)
    let (_, _, text) = http_exchange(&metrics, "GET", "/metrics", &[], b"").await;
    let text = String::from_utf8_lossy(&text);
    let pushes = |form: &str, outcome: &str| {
        let series = format!("tidal_controller_plan_pushes_total{{form=\"{form}\",outcome=\"{outcome}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&series)).map_or(0, |v| v.parse::<u64>().unwrap())
    };
    println!("pushes: {} changes applied, {} plans applied", pushes("delta", "applied"), pushes("plan", "applied"));
    assert!(pushes("delta", "applied") >= 4, "{text}");
    assert_eq!(pushes("delta", "refused") + pushes("plan", "refused"), 0, "{text}");
}

/// The case: a flat 150 req/s from idle was planned at 196 → 304 → 341 → 322 → 259
/// req/s while the status showed 119. Now each round plans it within the forecaster's reach of
/// the load (the peak of single seconds of a Poisson-like load, × 1.1), and the status shows
/// the rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flat_load_from_idle_is_planned_near_its_rate() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 32);
    let (_controller, ctl_addr) = start_controller(
        work.path(),
        2.0,
        &["--forecast-window-s", "60", "--no-profile-correction", "--no-slack-routing"],
    );
    let agent = start_agent(work.path(), AgentOpts { model_dir: &models, controller: Some(&ctl_addr), extra: &[] });
    let mut ctl = controller_client(&ctl_addr).await;
    let r18 = VariantConfig::load(&models, "resnet18").unwrap();
    let spec = tidal_common::task::single_stage("flat", 1000, vec![r18.spec()]);
    ctl.register_task(RegisterTaskRequest { task: Some(spec), ..Default::default() }).await.unwrap();
    let profile = Some(stored_profile("flat", "resnet18", 300.0));
    ctl.store_profile(StoreProfileRequest { profile }).await.unwrap();

    // Evenly spaced requests: the load is flat to the second, so what the forecaster adds is
    // its headroom and nothing else.
    let load = tokio::spawn(drive(agent.addr.clone(), "flat", r18.input_shape.clone(), 150.0, 24.0));
    let mut planned = Vec::new();
    let mut forecast = Vec::new();
    let mut rates = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(22) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = ctl.status(ClusterStatusRequest {}).await.unwrap().into_inner();
        let Some(task) = status.tasks.iter().find(|t| t.spec.as_ref().is_some_and(|s| s.name == "flat")) else {
            continue;
        };
        if started.elapsed() > Duration::from_secs(8) {
            rates.push(task.rate_rps);
            planned.push(task.planned_rps);
            forecast.push(task.forecast_rps);
        }
    }
    load.await.unwrap();
    println!("planned {planned:?}\nforecast {forecast:?}\nrates {rates:?}");
    assert!(!planned.is_empty());
    for &p in &planned {
        assert!((150.0 * 0.9..=150.0 * 1.1 * 1.1).contains(&p), "planned {p:.0} req/s for a flat 150: {planned:?}");
    }
    for &r in &rates {
        assert!((150.0 * 0.9..=150.0 * 1.1).contains(&r), "status rate {r:.0} for a flat 150: {rates:?}");
    }
    // The forecast is reported under its own name; the plan is sized for no less.
    for (&f, &p) in forecast.iter().zip(&planned) {
        assert!((150.0 * 0.9..=150.0 * 1.1 * 1.1).contains(&f), "forecast {f:.0} req/s for a flat 150: {forecast:?}");
        assert!(p >= f - 1e-6, "planned {p:.1} below the forecast {f:.1}");
    }
}

/// The agent's readiness as each kind of prober reads it: gRPC health of "" (SERVING),
/// `/readyz` (200) and V2 REST's server readiness (200).
async fn readiness(agent: &Agent) -> (bool, bool, bool) {
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
    let mut health = HealthClient::new(channel(&agent.addr).await);
    let serving = health
        .check(HealthCheckRequest { service: String::new() })
        .await
        .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving);
    let metrics = agent.metrics_addr.as_deref().expect("the agent's metrics port");
    let readyz = http_exchange(metrics, "GET", "/readyz", &[], b"").await.0 == 200;
    let v2 = http_exchange(&agent.addr, "GET", "/v2/health/ready", &[], b"").await.0 == 200;
    (serving, readyz, v2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_reports_itself_not_ready_to_every_prober() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 32);
    let controller = start_controller_ready(work.path(), 1.0, &["--no-profile-correction", "--no-slack-routing"]);
    let extra = ["--metrics-listen", "127.0.0.1:0"];
    let agent =
        start_agent(work.path(), AgentOpts { model_dir: &models, controller: Some(&controller.addr), extra: &extra });
    let mut ctl = controller_client(&controller.addr).await;
    let r18 = VariantConfig::load(&models, "resnet18").unwrap();
    let spec = tidal_common::task::single_stage("t", 1000, vec![r18.spec()]);
    ctl.register_task(RegisterTaskRequest { task: Some(spec), ..Default::default() }).await.unwrap();
    ctl.store_profile(StoreProfileRequest { profile: Some(stored_profile("t", "resnet18", 100.0)) }).await.unwrap();
    let ready = |want: (bool, bool, bool), what: &'static str| {
        let agent = &agent;
        eventually(Duration::from_secs(30), what, move || async move { (readiness(agent).await == want).then_some(()) })
    };
    ready((true, true, true), "the agent to serve its worker and say so").await;

    ctl.drain_node(DrainNodeRequest { node: agent.node.clone(), undrain: false }).await.unwrap();
    ready((false, false, false), "the draining agent to say it is not ready, everywhere").await;
    ctl.drain_node(DrainNodeRequest { node: agent.node.clone(), undrain: true }).await.unwrap();
    ready((true, true, true), "the agent, no longer drained, to serve again").await;
}
