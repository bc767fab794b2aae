//! Pipelines served across agents: the agent a request reaches runs it stage after stage, each
//! stage where the plan's weights send it (here or on another agent), within the request's
//! one deadline; a stage that cannot finish in what is left of the budget answers at once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tidal_common::variant::VariantConfig;
use tidal_proto::v1::{ApplyPlanRequest, Assignment, InferRequest, InferResponse, Plan, TaskSpec};
use tidal_tests::*;
use tonic::Code;

/// A two-stage task "video": `shrink` (2×2 downsampling) then `classify`.
fn video(slo_ms: u32, shrink: &VariantConfig, classify: &VariantConfig) -> TaskSpec {
    let stage = |name: &str, v: &VariantConfig| tidal_common::task::stage(name, vec![v.spec()]);
    TaskSpec {
        name: "video".into(),
        slo_ms,
        variants: vec![],
        stages: vec![stage("shrink", shrink), stage("classify", classify)],
        ..Default::default()
    }
}

fn worker(stage: &str, v: &VariantConfig, node: &str, millicores: u32, weight: f64) -> Assignment {
    Assignment {
        task: "video".into(),
        stage: stage.into(),
        variant: Some(v.spec()),
        node: node.into(),
        millicores,
        max_batch: 1,
        max_delay_ms: 0,
        weight,
        replica: 0,
        memory_bytes: 0,
    }
}

fn plan(epoch: u64, task: TaskSpec, assignments: Vec<Assignment>, agents: &[&Agent]) -> Plan {
    Plan {
        epoch,
        term: 1,
        tasks: vec![task],
        assignments,
        node_addresses: agents.iter().map(|a| (a.node.clone(), a.addr.clone())).collect(),
        ..Default::default()
    }
}

async fn apply(agents: &[&Agent], plan: &Plan) {
    for a in agents {
        let req = ApplyPlanRequest { plan: Some(plan.clone()), ..Default::default() };
        agent_client(&a.control_addr).await.apply_plan(req).await.expect("the plan is applied");
    }
}

async fn infer(addr: &str, shape: &[i64], budget_ms: u32) -> Result<InferResponse, tonic::Status> {
    let req = InferRequest { task: "video".into(), input: Some(sample(shape)), budget_ms, ..Default::default() };
    inference_client(addr).await.infer(req).await.map(|r| r.into_inner())
}

/// Sends `n` requests to `addr`: every answer has the classifier's output, both stages in
/// order, and the same logits (the same input through the same models, wherever they ran).
/// Returns how many times each node ran the `classify` stage.
async fn classify_nodes(addr: &str, shape: &[i64], n: usize, shrink_node: &str) -> BTreeMap<String, usize> {
    let mut by_node = BTreeMap::new();
    let mut first: Option<Vec<u8>> = None;
    for _ in 0..n {
        let resp = infer(addr, shape, 0).await.expect("the request is served");
        let output = resp.output.expect("an output");
        assert_eq!(output.shape, vec![1, 1000], "the last stage's output");
        let stages: Vec<(&str, &str)> = resp.stages.iter().map(|s| (s.stage.as_str(), s.variant.as_str())).collect();
        assert_eq!(stages, [("shrink", "downsample"), ("classify", "resnet18")]);
        assert_eq!(resp.stages[0].node, shrink_node, "the only shrink worker runs stage 1");
        let expected = first.get_or_insert_with(|| output.data.clone());
        let close = expected
            .chunks_exact(4)
            .zip(output.data.chunks_exact(4))
            .map(|(a, b)| (f32::from_le_bytes(a.try_into().unwrap()), f32::from_le_bytes(b.try_into().unwrap())))
            .all(|(a, b)| (a - b).abs() <= 1e-3 * a.abs().max(1.0));
        assert!(close, "a request got other logits than the first");
        *by_node.entry(resp.stages[1].node.clone()).or_default() += 1;
    }
    by_node
}

/// A work directory with `downsample` (64×64 → 32×32) and `resnet18` (32×32) generated.
fn shrink_and_classify() -> (tempfile::TempDir, std::path::PathBuf, VariantConfig, VariantConfig) {
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "downsample", 64);
    generate_models(&models, "resnet18", 32);
    let shrink = VariantConfig::load(&models, "downsample").unwrap();
    let r18 = VariantConfig::load(&models, "resnet18").unwrap();
    (work, models, shrink, r18)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_stage_pipeline_is_served_across_two_agents_and_survives_losing_one() {
    let _turn = tidal_tests::file_turn(module_path!());
    let (work, models, shrink, r18) = shrink_and_classify();
    let a = start_agent(work.path(), AgentOpts { model_dir: &models, controller: None, extra: &[] });
    let b = start_agent(work.path(), AgentOpts { model_dir: &models, controller: None, extra: &[] });

    // Stage 1 on A only; stage 2 split evenly across A and B.
    let assignments = vec![
        worker("shrink", &shrink, &a.node, 500, 1.0),
        worker("classify", &r18, &a.node, 1000, 0.5),
        worker("classify", &r18, &b.node, 1000, 0.5),
    ];
    let p = plan(1, video(2000, &shrink, &r18), assignments, &[&a, &b]);
    apply(&[&a, &b], &p).await;
    wait_ready(&a.control_addr, 2).await;
    wait_ready(&b.control_addr, 1).await;

    // Called on B, which has no stage-1 worker: stage 1 runs on A, stage 2 on both.
    let counts = classify_nodes(&b.addr, &shrink.input_shape, 20, &a.node).await;
    assert_eq!(counts.get(&a.node), Some(&10), "{counts:?}");
    assert_eq!(counts.get(&b.node), Some(&10), "{counts:?}");
    // Called on A: the same split.
    let counts = classify_nodes(&a.addr, &shrink.input_shape, 20, &a.node).await;
    assert_eq!((counts.get(&a.node), counts.get(&b.node)), (Some(&10), Some(&10)), "{counts:?}");

    // B goes away: its share of stage 2 moves to A at once, and every answer is still right.
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let counts = classify_nodes(&a.addr, &shrink.input_shape, 20, &a.node).await;
    assert_eq!(counts, BTreeMap::from([(a.node.clone(), 20)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_budget_cannot_cover_the_second_stage_is_answered_without_running_it() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "downsample", 192);
    generate_models(&models, "resnet101", 96);
    let shrink = VariantConfig::load(&models, "downsample").unwrap();
    let r101 = VariantConfig::load(&models, "resnet101").unwrap();
    let a = start_agent(work.path(), AgentOpts { model_dir: &models, controller: None, extra: &[] });
    let assignments =
        vec![worker("shrink", &shrink, &a.node, 1000, 1.0), worker("classify", &r101, &a.node, 1000, 1.0)];
    let mut task = video(2000, &shrink, &r101);
    task.stages[1].variants = vec![r101.spec()];
    apply(&[&a], &plan(1, task, assignments, &[&a])).await;
    wait_ready(&a.control_addr, 2).await;

    // With its whole budget a request is served; the workers learn what a batch takes.
    for _ in 0..5 {
        let resp = infer(&a.addr, &shrink.input_shape, 0).await.expect("served with the SLO as budget");
        assert_eq!(resp.stages.len(), 2);
    }
    let stage2_ms = {
        let resp = infer(&a.addr, &shrink.input_shape, 0).await.unwrap();
        resp.stages[1].total_us as f64 / 1000.0
    };
    // A budget that covers the downsampling (under a millisecond) but not resnet101 at 96×96
    // (about 18 ms here): stage 2 refuses it on arrival instead of running it.
    let budget_ms = 5;
    assert!(stage2_ms > 2.0 * budget_ms as f64, "resnet101 took only {stage2_ms:.1} ms: the budget proves nothing");
    let sent = Instant::now();
    let err = infer(&a.addr, &shrink.input_shape, budget_ms).await.expect_err("the budget is too short");
    let took = sent.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(err.message().contains("shorter than a batch takes"), "refused at stage 2's queue, not timed out: {err}");
    assert!(took < Duration::from_millis(budget_ms as u64 + 50), "answered at once, in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detector_fans_out_to_a_classifier_one_crop_per_object() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "yolov5n", 64);
    generate_models(&models, "resnet18", 32);
    let yolo = VariantConfig::load(&models, "yolov5n").unwrap();
    let r18 = VariantConfig::load(&models, "resnet18").unwrap();
    let a = start_agent(work.path(), AgentOpts { model_dir: &models, controller: None, extra: &[] });
    let mut task = video(2000, &yolo, &r18);
    task.stages[0].name = "detect".into();
    task.stages[1].connector = tidal_proto::v1::Connector::Crops as i32;
    task.stages[1].crops = 3;
    let mut detect = worker("detect", &yolo, &a.node, 1000, 1.0);
    detect.stage = "detect".into();
    let assignments = vec![detect, worker("classify", &r18, &a.node, 1000, 1.0)];
    apply(&[&a], &plan(1, task, assignments, &[&a])).await;
    wait_ready(&a.control_addr, 2).await;

    let resp = infer(&a.addr, &yolo.input_shape, 0).await.expect("served");
    assert_eq!(resp.output.expect("an output").shape, vec![3, 1000], "one classification per crop");
    let stages: Vec<(&str, &str)> = resp.stages.iter().map(|s| (s.stage.as_str(), s.variant.as_str())).collect();
    assert_eq!(
        stages,
        [("detect", "yolov5n"), ("classify", "resnet18"), ("classify", "resnet18"), ("classify", "resnet18")]
    );
}

/// Three one-core agents and a controller: each stage of the pipeline gets a node. The agent
/// serving stage 2 is killed: once it has been silent for the node timeout, the controller
/// plans stage 2 on the idle node, and every answer after that is right again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_whose_agent_dies_is_planned_on_another_node() {
    let _turn = tidal_tests::file_turn(module_path!());
    use tidal_proto::v1::{ClusterStatusRequest, RegisterTaskRequest, StoreProfileRequest, VariantProfile};
    let (work, models, shrink, r18) = shrink_and_classify();
    // Its synthetic profiles stand for the truth: not corrected by the batches served.
    let (_controller, ctl_addr) =
        start_controller(work.path(), 2.0, &["--node-timeout-s", "2", "--no-profile-correction", "--no-slack-routing"]);
    let one_core = &["--cores", "1"];
    let mut agents: Vec<Option<Agent>> = (0..3)
        .map(|_| {
            Some(start_agent(
                work.path(),
                AgentOpts { model_dir: &models, controller: Some(&ctl_addr), extra: one_core },
            ))
        })
        .collect();
    let mut ctl = controller_client(&ctl_addr).await;
    let task = video(2000, &shrink, &r18);
    eventually(Duration::from_secs(20), "the controller to lead and take the task", || {
        let (mut ctl, task) = (ctl.clone(), task.clone());
        async move { ctl.register_task(RegisterTaskRequest { task: Some(task), ..Default::default() }).await.ok() }
    })
    .await;
    for (variant, per_core) in [("downsample", 2000.0), ("resnet18", 600.0)] {
        let points = tidal_common::profile::synthetic(per_core, &[1], &[(1, 1.0), (4, 1.4)], 1.3);
        let profile = VariantProfile {
            task: "video".into(),
            variant: variant.into(),
            node: String::new(),
            points,
            ..Default::default()
        };
        ctl.store_profile(StoreProfileRequest { profile: Some(profile) }).await.unwrap();
    }

    // The plan in force, once every node it uses has applied it and its two workers serve:
    // its epoch and the nodes of the two stages.
    let settled = || {
        let ctl = ctl.clone();
        move || {
            let mut ctl = ctl.clone();
            async move {
                let s = ctl.status(ClusterStatusRequest {}).await.ok()?.into_inner();
                let plan = s.plan?;
                let used = s.nodes.iter().filter(|n| plan.assignments.iter().any(|a| a.node == n.node));
                if plan.assignments.len() != 2 || used.clone().any(|n| n.applied_epoch != plan.epoch) {
                    return None;
                }
                if used.flat_map(|n| n.workers.iter()).filter(|w| w.ready).count() != 2 {
                    return None;
                }
                let node = |stage: &str| plan.assignments.iter().find(|a| a.stage == stage).map(|a| a.node.clone());
                Some((plan.epoch, node("shrink")?, node("classify")?))
            }
        }
    };
    let (epoch, shrink_on, classify_on) =
        eventually(Duration::from_secs(60), "a plan with a node per stage", settled()).await;
    let addr_of = |node: &str, agents: &[Option<Agent>]| {
        agents.iter().flatten().find(|a| a.node == node).map(|a| a.addr.clone()).expect("a live agent")
    };
    let entry = addr_of(&shrink_on, &agents);
    let counts = classify_nodes(&entry, &shrink.input_shape, 5, &shrink_on).await;
    assert_eq!(counts, BTreeMap::from([(classify_on.clone(), 5)]));

    // kill -9 the classifying agent; within the node timeout and a round, a newer plan gives
    // stage 2 to the idle node.
    let killed = agents.iter().position(|a| a.as_ref().is_some_and(|a| a.node == classify_on)).unwrap();
    let moved_at = Instant::now();
    let victim = agents[killed].as_mut().expect("a live agent");
    victim.proc.child.kill().expect("kill -9 the agent");
    let (new_epoch, _, new_node) = eventually(Duration::from_secs(30), "stage 2 planned on a live node", {
        let find = settled();
        let dead = classify_on.clone();
        move || {
            let (find, dead) = (find.clone(), dead.clone());
            async move { find().await.filter(|(e, _, n)| *e > epoch && *n != dead) }
        }
    })
    .await;
    assert!(new_epoch > epoch);
    println!(
        "classify moved from {classify_on} (epoch {epoch}) to {new_node} (epoch {new_epoch}) {:?} after the kill",
        moved_at.elapsed()
    );
    // Node timeout 2 s, a round at once, the new worker's load: well within 10 s.
    assert!(moved_at.elapsed() < Duration::from_secs(10), "{:?}", moved_at.elapsed());
    assert_ne!(new_node, shrink_on, "one core each: the idle node");
    let counts = classify_nodes(&entry, &shrink.input_shape, 5, &shrink_on).await;
    assert_eq!(counts, BTreeMap::from([(new_node, 5)]), "every answer right, from the new node");
}
