//! The agent on its own, driven with plans pushed over gRPC: real ONNX inference, clear
//! statuses for bad input and bad plans, deadlines, restarts of dead workers, and cgroup
//! clean-up on exit.

use std::time::Duration;

use tidal_proto::v1::{AgentStatusRequest, ApplyPlanRequest, DataType, InferRequest, Tensor};
use tidal_tests::netns;
use tidal_tests::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_answers_with_the_model_output_shape_from_the_planned_variants() {
    let _turn = tidal_tests::file_turn(module_path!());
    let s = setup(&[]);
    s.serve(1, 2000, &[(&s.r18, 1000, 1), (&s.r50, 1000, 4)]).await;
    let mut infer = inference_client(&s.agent.addr).await;
    let mut variants = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let r = infer
            .infer(InferRequest {
                task: "classify".into(),
                input: Some(sample(&s.r18.input_shape)),
                budget_ms: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let out = r.output.unwrap();
        assert_eq!(out.shape, vec![1, 1000]);
        assert_eq!(out.data.len(), 4000);
        let values: Vec<f32> = out.data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert!(values.iter().all(|v| v.is_finite()), "the model's logits are finite");
        variants.insert(r.variant);
    }
    assert_eq!(variants.len(), 2, "equal weights route to both variants: {variants:?}");
}

/// The status code of a failed call (None when it succeeded).
fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Option<Code> {
    r.err().map(|s| s.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_plans_get_clear_statuses_and_the_agent_keeps_serving() {
    let _turn = tidal_tests::file_turn(module_path!());
    let s = setup(&["--max-request-bytes", "1000000"]);
    let mut agent = agent_client(&s.agent.control_addr).await;
    // Before its first plan an agent is not ready: UNAVAILABLE (clients go elsewhere), not NOT_FOUND.
    let mut early = inference_client(&s.agent.addr).await;
    let req = InferRequest {
        task: "classify".into(),
        input: Some(sample(&s.r18.input_shape)),
        budget_ms: 0,
        ..Default::default()
    };
    assert_eq!(code(early.infer(req).await), Some(Code::Unavailable));
    let mut plan = plan_for(5, &s.agent.node, "classify", 2000, &[(&s.r18, 1000, 1)]);
    agent.apply_plan(ApplyPlanRequest { plan: Some(plan.clone()), ..Default::default() }).await.unwrap();
    wait_ready(&s.agent.control_addr, 1).await;
    let mut infer = inference_client(&s.agent.addr).await;
    let shape = s.r18.input_shape.clone();
    let call = |task: &str, input: Option<Tensor>| InferRequest {
        task: task.into(),
        input,
        budget_ms: 0,
        ..Default::default()
    };

    assert_eq!(code(infer.infer(call("nope", Some(sample(&shape)))).await), Some(Code::NotFound));
    assert_eq!(code(infer.infer(call("classify", Some(sample(&[3, 32, 32])))).await), Some(Code::InvalidArgument));
    let mut wrong_dtype = sample(&shape);
    wrong_dtype.dtype = DataType::Int64 as i32;
    assert_eq!(code(infer.infer(call("classify", Some(wrong_dtype))).await), Some(Code::InvalidArgument));
    assert_eq!(code(infer.infer(call("classify", None)).await), Some(Code::InvalidArgument));
    assert_eq!(code(infer.infer(call("classify", Some(Tensor::default()))).await), Some(Code::InvalidArgument));
    let mut truncated = sample(&shape);
    truncated.data.truncate(100);
    assert_eq!(code(infer.infer(call("classify", Some(truncated))).await), Some(Code::InvalidArgument));
    let oversized = sample(&[3, 400, 400]); // ~1.9 MB, over the 1 MB limit
    let r = infer.infer(call("classify", Some(oversized))).await;
    assert_eq!(r.as_ref().err().map(|s| s.code()), Some(Code::ResourceExhausted), "{r:?}");

    // Malformed plans are refused whole; a stale one too.
    plan.epoch = 6;
    let mut bad = plan.clone();
    bad.assignments[0].max_batch = 0;
    assert_eq!(
        code(agent.apply_plan(ApplyPlanRequest { plan: Some(bad), ..Default::default() }).await),
        Some(Code::InvalidArgument)
    );
    let mut bad = plan.clone();
    bad.assignments[0].millicores = 64_000;
    assert_eq!(
        code(agent.apply_plan(ApplyPlanRequest { plan: Some(bad), ..Default::default() }).await),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code(agent.apply_plan(ApplyPlanRequest { plan: None, ..Default::default() }).await),
        Some(Code::InvalidArgument)
    );
    let mut stale = plan.clone();
    stale.epoch = 4;
    assert_eq!(
        code(agent.apply_plan(ApplyPlanRequest { plan: Some(stale), ..Default::default() }).await),
        Some(Code::FailedPrecondition)
    );
    let status = agent.status(AgentStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.applied_epoch, 5);

    // A model file missing here holds the task at what runs, and says so.
    let mut missing = plan.clone();
    missing.assignments[0].variant.as_mut().unwrap().model_file = "missing.onnx".into();
    let applied = agent
        .apply_plan(ApplyPlanRequest { plan: Some(missing.clone()), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.applied_epoch, 6);
    assert!(applied.held.iter().any(|h| h.starts_with("classify:") && h.contains("missing.onnx")), "{applied:?}");

    // Still serving, with the last good workers.
    let r = infer.infer(call("classify", Some(sample(&shape)))).await.unwrap().into_inner();
    assert_eq!(r.variant, "resnet18");
    let status = agent.status(AgentStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.workers.len(), 1);
    assert!(status.workers[0].ready);

    // A plan as the change of the one applied (6, term 1): taken from that base only, and
    // refused whole when malformed.
    let with_idle = |epoch: u64| {
        let mut next = plan_for(epoch, &s.agent.node, "classify", 2000, &[(&s.r18, 1000, 1)]);
        next.tasks.push(tidal_common::task::single_stage("idle", 2000, vec![s.r18.spec()]));
        next
    };
    let held = tidal_common::plan::cut(&missing, &s.agent.node);
    let delta = tidal_common::plan::delta::delta(Some(&held), &tidal_common::plan::cut(&with_idle(7), &s.agent.node));
    let send = |delta: tidal_proto::v1::PlanDelta, base_epoch| ApplyPlanRequest {
        delta: Some(delta),
        base_epoch,
        base_term: 1,
        ..Default::default()
    };
    assert_eq!(code(agent.apply_plan(send(delta.clone(), 5)).await), Some(Code::FailedPrecondition));
    let mut stray = delta.clone();
    stray.tasks.clear();
    assert_eq!(code(agent.apply_plan(send(stray, 6)).await), Some(Code::InvalidArgument));
    let both = ApplyPlanRequest { plan: Some(with_idle(7)), ..send(delta.clone(), 6) };
    assert_eq!(code(agent.apply_plan(both).await), Some(Code::InvalidArgument));
    assert_eq!(agent.apply_plan(send(delta, 6)).await.unwrap().into_inner().applied_epoch, 7);
    let r = infer.infer(call("classify", Some(sample(&shape)))).await.unwrap().into_inner();
    assert_eq!(r.variant, "resnet18", "the task the change did not touch serves on");

    // `idle` has no worker anywhere: UNAVAILABLE, so that a client tries another agent, and
    // marked as counted here, so that its retry there is not counted again.
    let refused = infer.infer(call("idle", Some(sample(&shape)))).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.metadata().contains_key(tidal_proto::COUNTED_METADATA), "{refused:?}");
    let mut retry = tonic::Request::new(call("idle", Some(sample(&shape))));
    retry.metadata_mut().insert(tidal_proto::COUNTED_METADATA, "1".parse().unwrap());
    let again = infer.infer(retry).await.unwrap_err();
    assert!(!again.metadata().contains_key(tidal_proto::COUNTED_METADATA), "a retry is not counted: {again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_budget_cannot_be_met_gets_deadline_exceeded() {
    let _turn = tidal_tests::file_turn(module_path!());
    let s = setup(&[]);
    s.serve(1, 2000, &[(&s.r50, 1000, 8)]).await;
    let mut infer = inference_client(&s.agent.addr).await;
    // 1 ms cannot cover a resnet50 batch on one core.
    let r = infer
        .infer(InferRequest {
            task: "classify".into(),
            input: Some(sample(&s.r50.input_shape)),
            budget_ms: 1,
            ..Default::default()
        })
        .await;
    assert_eq!(r.err().map(|s| s.code()), Some(Code::DeadlineExceeded));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_restarted_and_the_agent_removes_its_cgroups_on_exit() {
    let _turn = tidal_tests::file_turn(module_path!());
    let s = setup(&[]);
    let workers = s.serve(1, 5000, &[(&s.r18, 1000, 1)]).await;
    let agent = agent_client(&s.agent.control_addr).await;
    let cgroup = std::path::PathBuf::from(&workers[0].cgroup);
    let pid = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
    let pid = pid.lines().next().expect("the worker process is in its cgroup").trim().to_string();
    assert!(std::process::Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());

    let restarted = eventually(Duration::from_secs(30), "the worker to be restarted", || {
        let mut agent = agent.clone();
        async move {
            let w = agent.status(AgentStatusRequest {}).await.ok()?.into_inner().workers;
            (w.len() == 1 && w[0].restarts >= 1 && w[0].ready).then(|| w[0].clone())
        }
    })
    .await;
    assert_eq!(restarted.id, workers[0].id);
    let new_pid = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
    assert!(!new_pid.contains(&pid), "a new process in the same cgroup");
    let mut infer = inference_client(&s.agent.addr).await;
    let r = infer
        .infer(InferRequest {
            task: "classify".into(),
            input: Some(sample(&s.r18.input_shape)),
            budget_ms: 0,
            ..Default::default()
        })
        .await;
    assert!(r.is_ok(), "serving again after the restart: {r:?}");

    let agent_cgroup = cgroup.parent().unwrap().to_path_buf();
    assert!(agent_cgroup.is_dir());
    let Setup { agent, work, .. } = s;
    drop(agent); // SIGTERM: the agent stops its workers and removes its cgroups
    assert!(!agent_cgroup.exists(), "{} is left behind", agent_cgroup.display());
    drop(work);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_after_a_crash_removes_the_cgroups_it_left_behind() {
    let _turn = tidal_tests::file_turn(module_path!());
    let s = setup(&[]);
    let workers = s.serve(1, 5000, &[(&s.r18, 1000, 1)]).await;
    let leftover = std::path::PathBuf::from(&workers[0].cgroup);
    let Setup { agent: crashed, work, .. } = s;
    let node = crashed.node.clone();
    let mut proc = crashed.proc;
    proc.child.kill().unwrap(); // SIGKILL: no clean-up
    proc.child.wait().unwrap();
    assert!(leftover.is_dir(), "a crashed agent leaves its worker's cgroup");

    let models = work.path().join("models");
    let again = start_agent_named(work.path(), &node, AgentOpts { model_dir: &models, controller: None, extra: &[] });
    agent_client(&again.control_addr).await; // listening: start-up is over
    assert!(!leftover.exists(), "{} survived the restart", leftover.display());
    drop(again);
}

/// A second agent on a running agent's cgroup subtree (the same --node on one machine) is
/// refused at start, before its sweep of the subtree would kill the first one's workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_cgroup_subtree_is_refused_and_kills_nothing() {
    let _turn = tidal_tests::file_turn(module_path!());
    let s = setup(&[]);
    let workers = s.serve(1, 5000, &[(&s.r18, 1000, 1)]).await;
    let ready = s.work.path().join("second.ready.json");
    let mut cmd = std::process::Command::new(bin("tidal-agent"));
    cmd.arg("serve")
        .args(["--node", &s.agent.node, "--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0"])
        .arg("--ready-file")
        .arg(&ready)
        .arg("--model-dir")
        .arg(s.work.path().join("models"))
        .arg("--ort-lib")
        .arg(ort_lib())
        .args(["--cgroup-subtree", &cgroup_subtree(s.work.path(), &s.agent.node)])
        .args(["--cores", "2"]);
    tidal_tests::tls::as_daemon(&mut cmd, &tidal_auth::Role::Agent(s.agent.node.clone()), "");
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second agent started:\n{stderr}");
    assert!(stderr.contains("another agent runs in cgroup subtree"), "{stderr}");
    assert!(!ready.exists(), "it never said it was ready");
    // The first agent's worker was not touched.
    let after = wait_ready(&s.agent.control_addr, 1).await;
    assert_eq!((after[0].id.as_str(), after[0].restarts), (workers[0].id.as_str(), 0));
    let mut infer = inference_client(&s.agent.addr).await;
    let request =
        InferRequest { task: "classify".into(), input: Some(sample(&s.r18.input_shape)), ..Default::default() };
    infer.infer(request).await.expect("the first agent still serves");
}

/// Whether user `nobody` can reach `path`: every directory above it searchable by others,
/// the file itself readable (and, for a program, executable) by others.
fn others_can_use(path: &std::path::Path, exec: bool) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.permissions().mode()).unwrap_or(0);
    let file_ok = mode(path) & if exec { 0o005 } else { 0o004 } != 0;
    file_ok && path.ancestors().skip(1).all(|dir| dir.as_os_str().is_empty() || mode(dir) & 0o001 != 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_run_as_the_unprivileged_user_they_are_given() {
    let _turn = tidal_tests::file_turn(module_path!());
    if !netns::available() {
        eprintln!("skipped: switching a worker to another user needs an agent running as root");
        return;
    }
    let (agent_bin, ort) = (bin("tidal-agent"), ort_lib());
    if !others_can_use(&agent_bin, true) || !others_can_use(&ort, false) {
        eprintln!(
            "skipped: user nobody cannot reach {} or {} from here (a directory above is private)",
            agent_bin.display(),
            ort.display()
        );
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 32);
    use std::os::unix::fs::PermissionsExt;
    for p in [work.path(), models.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let agent = start_agent(
        work.path(),
        AgentOpts { model_dir: &models, controller: None, extra: &["--worker-user", "nobody"] },
    );
    let r18 = tidal_common::variant::VariantConfig::load(&models, "resnet18").unwrap();
    let plan = plan_for(1, &agent.node, "classify", 2000, &[(&r18, 1000, 1)]);
    agent_client(&agent.control_addr)
        .await
        .apply_plan(ApplyPlanRequest { plan: Some(plan), ..Default::default() })
        .await
        .unwrap();
    let workers = wait_ready(&agent.control_addr, 1).await;
    let procs = std::fs::read_to_string(std::path::Path::new(&workers[0].cgroup).join("cgroup.procs")).unwrap();
    let pid = procs.lines().next().expect("the worker is in its cgroup").trim().to_string();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ids = |key: &str| status.lines().find(|l| l.starts_with(key)).map(|l| l.split_whitespace().skip(1).collect());
    let uids: Option<Vec<&str>> = ids("Uid:");
    assert_eq!(uids, Some(vec!["65534"; 4]), "real, effective, saved and filesystem uid are nobody's");
    let groups: Option<Vec<&str>> = ids("Groups:");
    assert_eq!(groups, Some(vec![]), "no supplementary groups are kept");
    let mut infer = inference_client(&agent.addr).await;
    let r = infer.infer(InferRequest {
        task: "classify".into(),
        input: Some(sample(&r18.input_shape)),
        budget_ms: 0,
        ..Default::default()
    });
    assert!(r.await.is_ok(), "the unprivileged worker serves");
}
