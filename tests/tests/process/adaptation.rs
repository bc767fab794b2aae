//! The whole loop across processes: a controller and an agent, real ONNX models profiled on
//! the agent, real inference; a load step makes the controller commit a plan with more
//! capacity, the agent applies it, and the kernel's cgroup files hold the planned quotas. The
//! controller's state survives a restart.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidal_common::variant::VariantConfig;
use tidal_proto::v1::{
    AgentStatusRequest, ClusterStatusRequest, InferRequest, Plan, PlanHistoryRequest, RegisterTaskRequest,
    SetSloRequest, TaskSpec,
};
use tidal_tests::*;
use tonic::Code;

fn total_millicores(plan: &Plan) -> u32 {
    plan.assignments.iter().map(|a| a.millicores).sum()
}

fn variants(plan: &Plan) -> Vec<String> {
    plan.assignments.iter().filter_map(|a| a.variant.as_ref().map(|v| v.name.clone())).collect()
}

/// Open-loop load at `rate` req/s for `secs`; counts answers with the model's output shape.
async fn drive(addr: &str, shape: &[i64], rate: f64, secs: f64) -> (u64, u64) {
    let client = inference_client(addr).await;
    let ok = Arc::new(AtomicU64::new(0));
    let total = (rate * secs) as u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..total {
        tokio::time::sleep_until((started + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        let mut client = client.clone();
        let ok = ok.clone();
        let input = sample(shape);
        tasks.push(tokio::spawn(async move {
            let req = InferRequest { task: "classify".into(), input: Some(input), budget_ms: 0, ..Default::default() };
            if let Ok(r) = client.infer(req).await {
                if r.into_inner().output.is_some_and(|o| o.shape == [1, 1000]) {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (ok.load(Ordering::Relaxed), total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_step_makes_the_controller_plan_more_capacity_and_the_agent_applies_it() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "resnet18,resnet50", 64);
    let (controller, ctl_addr) =
        start_controller(work.path(), 2.0, &["--forecast-window-s", "8", "--no-slack-routing"]);
    let agent = start_agent(work.path(), AgentOpts { model_dir: &models, controller: Some(&ctl_addr), extra: &[] });
    let mut ctl = controller_client(&ctl_addr).await;

    // Bad input to the controller is refused with the reason.
    let bad = TaskSpec { name: "bad task!".into(), slo_ms: 0, ..Default::default() };
    let err = ctl.register_task(RegisterTaskRequest { task: Some(bad), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = ctl.set_slo(SetSloRequest { task: "nope".into(), slo_ms: 100 }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let r18 = VariantConfig::load(&models, "resnet18").unwrap();
    let r50 = VariantConfig::load(&models, "resnet50").unwrap();
    let task = tidal_common::task::single_stage("classify", 1000, vec![r18.spec(), r50.spec()]);
    ctl.register_task(RegisterTaskRequest { task: Some(task), ..Default::default() }).await.unwrap();

    // Profile both variants on the agent with the CLI; the profiles land in the controller.
    let status = as_admin(&mut Command::new(bin("tidalctl")))
        .args(["--controller", &ctl_addr, "profile", "--agent", &agent.control_addr, "--task", "classify"])
        .args(["--cores", "1,2", "--batches", "1,4", "--duration-ms", "600", "--repeat", "1"])
        .status()
        .unwrap();
    assert!(status.success(), "tidalctl profile failed");

    // Idle: the most accurate variant on the fewest cores.
    let idle_plan = eventually(Duration::from_secs(30), "a plan from the profiles", || {
        let mut ctl = ctl.clone();
        async move {
            let s = ctl.status(ClusterStatusRequest {}).await.ok()?.into_inner();
            let plan = s.plan?;
            (variants(&plan) == ["resnet50"] && plan.notes.iter().any(|n| n.contains("planned"))).then_some(plan)
        }
    })
    .await;
    assert_eq!(total_millicores(&idle_plan), 1000, "{:?}", idle_plan.notes);
    // `make demo` and the other scripts wait for this with scripts/cluster.sh's wait_for_plan.
    let mut wait = Command::new("bash");
    as_admin(&mut wait).current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).env("TIDAL_BIN_DIR", bin_dir()).args([
        "-c",
        ". scripts/cluster.sh && wait_for_plan \"$0\"",
        &ctl_addr,
    ]);
    let waited = tokio::task::spawn_blocking(move || wait.output()).await.unwrap().unwrap();
    assert!(waited.status.success(), "wait_for_plan: {}", String::from_utf8_lossy(&waited.stderr));

    // A load step well beyond resnet50 on one core.
    let (ok, total) = drive(&agent.addr, &r18.input_shape, 150.0, 10.0).await;
    assert!(ok as f64 > 0.5 * total as f64, "only {ok} of {total} requests answered");
    let busy_plan = eventually(Duration::from_secs(30), "a plan with more capacity", || {
        let mut ctl = ctl.clone();
        async move {
            let plan = ctl.status(ClusterStatusRequest {}).await.ok()?.into_inner().plan?;
            (plan.epoch > idle_plan.epoch
                && (total_millicores(&plan) > 1000 || variants(&plan).contains(&"resnet18".to_string())))
            .then_some(plan)
        }
    })
    .await;
    println!("idle plan: {:?}\nbusy plan: {:?}", idle_plan.notes, busy_plan.notes);

    // The agent applies it: its workers and the kernel's quotas match the controller's plan.
    let agent_ctl = agent_client(&agent.control_addr).await;
    let applied = eventually(Duration::from_secs(30), "the agent's workers and quotas to match the plan", || {
        let (mut ctl, mut agent_ctl) = (ctl.clone(), agent_ctl.clone());
        async move {
            let plan = ctl.status(ClusterStatusRequest {}).await.ok()?.into_inner().plan?;
            let s = agent_ctl.status(AgentStatusRequest {}).await.ok()?.into_inner();
            if s.applied_epoch != plan.epoch || plan.epoch < busy_plan.epoch {
                return None;
            }
            for a in &plan.assignments {
                let name = &a.variant.as_ref()?.name;
                let w = s.workers.iter().find(|w| &w.variant == name)?;
                let kernel = cgroup_millicores(std::path::Path::new(&w.cgroup));
                if w.millicores != a.millicores || kernel != Some(a.millicores) {
                    return None;
                }
            }
            Some(plan)
        }
    })
    .await;
    assert!(!applied.assignments.is_empty());

    // Plan history has no gap.
    let history = ctl.history(PlanHistoryRequest { limit: 100 }).await.unwrap().into_inner().plans;
    assert!(
        history.windows(2).all(|w| w[1].epoch == w[0].epoch + 1),
        "epochs {:?}",
        history.iter().map(|p| p.epoch).collect::<Vec<_>>()
    );

    // Restart the controller on the same store: the committed plan and the task are back.
    let last_epoch = ctl.status(ClusterStatusRequest {}).await.unwrap().into_inner().plan.unwrap().epoch;
    drop(controller);
    // On port 0 again: the port it had may be another process's by now.
    let restarted = start_controller_ready(work.path(), 3600.0, &["--no-slack-routing"]);
    let ctl = controller_client(&restarted.addr).await;
    let status = eventually(Duration::from_secs(20), "the restarted controller to replay its log", || {
        let mut ctl = ctl.clone();
        async move {
            let s = ctl.status(ClusterStatusRequest {}).await.ok()?.into_inner();
            (s.plan.as_ref().map(|p| p.epoch) >= Some(last_epoch)).then_some(s)
        }
    })
    .await;
    assert_eq!(status.tasks.len(), 1);
    assert_eq!(status.tasks[0].profiled_variants.len(), 2);
    drop(restarted);
    drop(agent);
}
