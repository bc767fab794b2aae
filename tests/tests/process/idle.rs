//! Load on demand, as processes: a task registered with `--min-workers 0` is loaded by its
//! first request, and loses its worker once no request came for its idle time (its cores and
//! memory go back to the cluster). Its next request is answered, not refused: it waits at the
//! agent, which tells the controller at once, while a plan gives the task a worker and the
//! worker loads. A task that keeps one worker (the default) keeps it however idle it is.
//!
//! The stored profiles stand for the truth (`--no-profile-correction`, `--no-slack-routing`).

use std::time::{Duration, Instant};

use tidal_common::variant::VariantConfig;
use tidal_proto::v1::{ClusterStatus, InferRequest, RegisterTaskRequest, StoreProfileRequest, TaskShare};
use tidal_tests::*;

/// How many workers of `task` the agents report, and how many of them are ready.
fn workers_of(st: &ClusterStatus, task: &str) -> (usize, usize) {
    let workers: Vec<_> = st.nodes.iter().flat_map(|n| &n.workers).filter(|w| w.task == task).collect();
    (workers.len(), workers.iter().filter(|w| w.ready).count())
}

/// Seconds without a request before the test's task is unloaded.
const IDLE_S: u32 = 3;
/// What the first request after an unload may take here: a telemetry report, a round (the
/// controller waits 0.3 s for more news), a push, and a 32×32 ResNet18 loading.
const COLD_START_BOUND: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_task_is_unloaded_and_its_next_request_waits_while_it_loads() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 32);
    let controller = start_controller_ready(work.path(), 1.0, &["--no-profile-correction", "--no-slack-routing"]);
    let ctl_addr = controller.addr.clone();
    let agent = start_agent(work.path(), AgentOpts { model_dir: &models, controller: Some(&ctl_addr), extra: &[] });
    let mut ctl = controller_client(&ctl_addr).await;
    let r18 = VariantConfig::load(&models, "resnet18").unwrap();
    let unloads = TaskShare { min_workers: Some(0), idle_s: IDLE_S, ..Default::default() };
    for (task, share) in [("sleepy", Some(unloads)), ("awake", None)] {
        let mut spec = tidal_common::task::single_stage(task, 1000, vec![r18.spec()]);
        spec.share = share;
        ctl.register_task(RegisterTaskRequest { task: Some(spec), ..Default::default() }).await.unwrap();
        let profile = Some(stored_profile(task, "resnet18", 200.0));
        ctl.store_profile(StoreProfileRequest { profile }).await.unwrap();
    }
    // Never asked for, it is not loaded; its first request loads it.
    let st = eventually(Duration::from_secs(30), "the other task served", || async {
        let st = cluster_status(&ctl_addr).await?;
        (workers_of(&st, "awake").1 == 1).then_some(st)
    })
    .await;
    assert_eq!(workers_of(&st, "sleepy"), (0, 0), "loaded before any request");
    let mut client = inference_client(&agent.addr).await;
    let request =
        |task: &str| InferRequest { task: task.into(), input: Some(sample(&r18.input_shape)), ..Default::default() };
    let asked = Instant::now();
    client.infer(request("sleepy")).await.expect("its first request loads it");
    println!("its first request answered in {:.2} s", asked.elapsed().as_secs_f64());
    let last_request = Instant::now();
    eventually(Duration::from_secs(5), "its worker in the status", || async {
        let st = cluster_status(&ctl_addr).await?;
        (workers_of(&st, "sleepy") == (1, 1)).then_some(())
    })
    .await;

    // Unloaded once idle for its idle time; the other keeps its worker.
    let st = eventually(Duration::from_secs(30), "the idle task unloaded", || async {
        let st = cluster_status(&ctl_addr).await?;
        (workers_of(&st, "sleepy").0 == 0).then_some(st)
    })
    .await;
    let unloaded_after = last_request.elapsed();
    println!("unloaded {:.1} s after its last request (idle time {IDLE_S} s)", unloaded_after.as_secs_f64());
    assert!(unloaded_after >= Duration::from_secs(IDLE_S as u64), "unloaded before its idle time");
    assert_eq!(workers_of(&st, "awake"), (1, 1), "a task that keeps a worker keeps it");
    let plan = st.plan.expect("a plan");
    assert!(plan.notes.iter().any(|n| n.starts_with("sleepy: unloaded: no request")), "{:?}", plan.notes);

    // Its next request is answered: it waits while the task is planned again and loads.
    let asked = Instant::now();
    let answer = client.infer(request("sleepy")).await.expect("answered after a cold start, not refused");
    let cold_start = asked.elapsed();
    println!("first request after the unload answered in {:.2} s", cold_start.as_secs_f64());
    assert!(cold_start < COLD_START_BOUND, "{cold_start:?}");
    assert_eq!(answer.into_inner().version, 1);
    // Served at once now that it has a worker, which the agent reports as any other.
    let asked = Instant::now();
    client.infer(request("sleepy")).await.unwrap();
    let warm = asked.elapsed();
    println!("the next answered in {:.3} s", warm.as_secs_f64());
    assert!(warm < cold_start, "{warm:?} warm against {cold_start:?} cold");
    eventually(Duration::from_secs(5), "its worker in the status", || async {
        let st = cluster_status(&ctl_addr).await?;
        (workers_of(&st, "sleepy") == (1, 1)).then_some(())
    })
    .await;
}
