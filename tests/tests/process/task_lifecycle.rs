//! Tasks come and go on a running cluster, as processes (a controller, an agent, real
//! inference): a task deleted under load drains (no request lost), frees its workers and is
//! unknown afterwards, its name free for a new task; a task registered again with other
//! models is its next version, served once its worker is ready, and a rollback brings the
//! earlier version back. Synthetic profiles stand for the truth (`--no-profile-correction`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tidal_common::variant::VariantConfig;
use tidal_proto::v1::{ClusterStatusRequest, InferRequest, RegisterTaskRequest, StoreProfileRequest};
use tidal_tests::*;

/// What a closed-loop caller saw: answers by (variant, version), refusals of an unknown task,
/// and every other outcome (a request lost).
#[derive(Default)]
struct Seen {
    answers: BTreeMap<(String, u32), u64>,
    unknown: u64,
    lost: Vec<String>,
}

/// Closed-loop requests of `task` until `stop`.
async fn call_until_stopped(addr: String, task: &'static str, shape: Vec<i64>, stop: Arc<AtomicU64>) -> Seen {
    let mut client = inference_client(&addr).await;
    let mut seen = Seen::default();
    while stop.load(Ordering::Relaxed) == 0 {
        let req = InferRequest { task: task.into(), input: Some(sample(&shape)), budget_ms: 0, ..Default::default() };
        match client.infer(req).await {
            Ok(answer) => {
                let answer = answer.into_inner();
                *seen.answers.entry((answer.variant, answer.version)).or_default() += 1;
            }
            Err(e) if e.code() == tonic::Code::NotFound => {
                seen.unknown += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => seen.lost.push(format!("{:?}: {}", e.code(), e.message())),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_task_drains_frees_its_workers_and_its_name_is_free_again() {
    let _turn = tidal_tests::file_turn(module_path!());
    use tidal_proto::v1::{AgentStatusRequest, DeleteTaskRequest, SetSloRequest};
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 32);
    let controller = start_controller_ready(work.path(), 1.0, &["--no-profile-correction", "--no-slack-routing"]);
    let agent =
        start_agent(work.path(), AgentOpts { model_dir: &models, controller: Some(&controller.addr), extra: &[] });
    let mut ctl = controller_client(&controller.addr).await;
    let r18 = VariantConfig::load(&models, "resnet18").unwrap();
    let register = |name: &str| RegisterTaskRequest {
        task: Some(tidal_common::task::single_stage(name, 1000, vec![r18.spec()])),
        ..Default::default()
    };
    for task in ["keep", "gone"] {
        ctl.register_task(register(task)).await.unwrap();
        ctl.store_profile(StoreProfileRequest { profile: Some(stored_profile(task, "resnet18", 100.0)) })
            .await
            .unwrap();
    }
    let served = |task: &'static str| {
        let (addr, shape) = (agent.addr.clone(), r18.input_shape.clone());
        async move {
            eventually(Duration::from_secs(30), &format!("{task} to be served"), move || {
                let (addr, shape) = (addr.clone(), shape.clone());
                async move {
                    let req = InferRequest { task: task.into(), input: Some(sample(&shape)), ..Default::default() };
                    inference_client(&addr).await.infer(req).await.ok().map(|_| ())
                }
            })
            .await
        }
    };
    served("keep").await;
    served("gone").await;
    let mut agent_ctl = agent_client(&agent.control_addr).await;
    let workers_of = |status: &tidal_proto::v1::AgentStatus, task: &str| -> Vec<String> {
        status.workers.iter().filter(|w| w.task == task).map(|w| w.cgroup.clone()).collect()
    };
    let before = agent_ctl.status(AgentStatusRequest {}).await.unwrap().into_inner();
    let cgroups = workers_of(&before, "gone");
    assert!(!cgroups.is_empty(), "the task to delete runs a worker");

    // Deleted under load: every request is answered, or refused as unknown once the task is
    // gone; none is lost.
    let stop = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(call_until_stopped(agent.addr.clone(), "gone", r18.input_shape.clone(), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = as_admin(&mut std::process::Command::new(bin("tidalctl")))
        .args(["--controller", &controller.addr, "task", "delete", "--task", "gone"])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tidalctl task delete: {printed}");
    assert!(printed.contains("task gone deleted; plan "), "{printed}");
    // Stopped once drained: out of the agent's workers, their cgroups removed.
    eventually(Duration::from_secs(20), "the agent to stop the deleted task's workers", || {
        let (mut agent_ctl, cgroups) = (agent_ctl.clone(), cgroups.clone());
        async move {
            let status = agent_ctl.status(AgentStatusRequest {}).await.ok()?.into_inner();
            let freed = cgroups.iter().all(|c| c.is_empty() || !std::path::Path::new(c).exists());
            (workers_of(&status, "gone").is_empty() && freed).then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(1, Ordering::Relaxed);
    let mut answered = 0;
    for c in callers {
        let seen = c.await.unwrap();
        assert!(seen.lost.is_empty(), "requests lost while the task was deleted: {:?}", seen.lost);
        assert!(seen.unknown > 0, "the callers saw the task go");
        answered += seen.answers.values().sum::<u64>();
    }
    assert!(answered > 0, "requests were answered until the task went");

    // Gone everywhere: not in the plan or the status, unknown to every call; the other task
    // is still served.
    let status = ctl.status(ClusterStatusRequest {}).await.unwrap().into_inner();
    assert!(status.tasks.iter().all(|t| t.spec.as_ref().unwrap().name != "gone"));
    assert!(status.plan.unwrap().assignments.iter().all(|a| a.task != "gone"));
    let again = ctl.delete_task(DeleteTaskRequest { task: "gone".into() }).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::NotFound, "{again:?}");
    let slo = ctl.set_slo(SetSloRequest { task: "gone".into(), slo_ms: 500 }).await.unwrap_err();
    assert_eq!(slo.code(), tonic::Code::NotFound);
    served("keep").await;

    // The name is free: registered again, it is a new task (no profile until one is stored),
    // and served once it has one.
    ctl.register_task(register("gone")).await.unwrap();
    let status = ctl.status(ClusterStatusRequest {}).await.unwrap().into_inner();
    let task = status.tasks.iter().find(|t| t.spec.as_ref().unwrap().name == "gone").expect("registered again");
    assert!(task.profiles.is_empty(), "the deleted task's profile went with it");
    ctl.store_profile(StoreProfileRequest { profile: Some(stored_profile("gone", "resnet18", 100.0)) }).await.unwrap();
    served("gone").await;

    let log = std::fs::read_to_string(work.path().join("controller.log")).unwrap();
    assert!(log.lines().any(|l| l.contains("audit") && l.contains("delete task gone")), "the deletion is audited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_takes_over_once_ready_and_a_rollback_brings_the_old_one_back() {
    let _turn = tidal_tests::file_turn(module_path!());
    use tidal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    use tidal_proto::inference::{ModelMetadataRequest, ModelReadyRequest};
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "resnet18,resnet50", 32);
    let controller = start_controller_ready(work.path(), 1.0, &["--no-profile-correction", "--no-slack-routing"]);
    let agent =
        start_agent(work.path(), AgentOpts { model_dir: &models, controller: Some(&controller.addr), extra: &[] });
    let mut ctl = controller_client(&controller.addr).await;
    let r18 = VariantConfig::load(&models, "resnet18").unwrap();
    let first = ctl
        .register_task(RegisterTaskRequest {
            task: Some(tidal_common::task::single_stage("t", 1000, vec![r18.spec()])),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.version, first.new_version), (1, true));
    ctl.store_profile(StoreProfileRequest { profile: Some(stored_profile("t", "resnet18", 100.0)) }).await.unwrap();
    let answered_by = |variant: &'static str| {
        let (addr, shape) = (agent.addr.clone(), r18.input_shape.clone());
        async move {
            eventually(Duration::from_secs(40), &format!("t to be answered by {variant}"), move || {
                let (addr, shape) = (addr.clone(), shape.clone());
                async move {
                    let req = InferRequest { task: "t".into(), input: Some(sample(&shape)), ..Default::default() };
                    let answer = inference_client(&addr).await.infer(req).await.ok()?.into_inner();
                    (answer.variant == variant).then_some(())
                }
            })
            .await
        }
    };
    answered_by("resnet18").await;
    let mut v2 = GrpcInferenceServiceClient::new(channel(&agent.addr).await);
    let versions = |v2: &mut GrpcInferenceServiceClient<_>| {
        let mut v2 = v2.clone();
        async move {
            let request = ModelMetadataRequest { name: "t".into(), version: String::new() };
            v2.model_metadata(request).await.unwrap().into_inner().versions
        }
    };
    assert_eq!(versions(&mut v2).await, vec!["1"]);

    // Under load, a new version with other models: the old one answers until the new one's
    // worker is ready, and no request is lost either way.
    let stop = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(call_until_stopped(agent.addr.clone(), "t", r18.input_shape.clone(), stop.clone())))
        .collect();
    let tidalctl = |args: &[&str]| {
        let out = as_admin(&mut std::process::Command::new(bin("tidalctl")))
            .args(["--controller", &controller.addr])
            .args(args)
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "tidalctl {args:?}: {printed}");
        printed
    };
    let model_dir = models.display().to_string();
    let register = ["task", "register", "--name", "t", "--slo-ms", "1000", "--model-dir", &model_dir];
    let printed = tidalctl(&[&register[..], &["--variants", "resnet50"]].concat());
    assert!(printed.contains("version 2 of task t"), "{printed}");
    answered_by("resnet50").await;
    assert_eq!(versions(&mut v2).await, vec!["2"]);
    let ready = |version: &str| ModelReadyRequest { name: "t".into(), version: version.into() };
    assert!(v2.model_ready(ready("2")).await.unwrap().into_inner().ready);
    let old = v2.model_ready(ready("1")).await.unwrap_err();
    assert_eq!(old.code(), tonic::Code::NotFound, "version 1 is not served any more: {old:?}");
    let status = ctl.status(ClusterStatusRequest {}).await.unwrap().into_inner();
    let t = &status.tasks[0];
    assert_eq!((t.spec.as_ref().unwrap().version, t.earlier_versions.clone()), (2, vec![1]));
    // Registering the same models again makes no version.
    let printed = tidalctl(&[&register[..], &["--variants", "resnet50"]].concat());
    assert!(printed.contains("the same models as version 2"), "{printed}");

    // Rolled back: version 1's model answers again, planned with the profile it kept.
    let printed = tidalctl(&["task", "rollback", "--task", "t"]);
    assert!(printed.contains("serves version 1 again (was version 2)"), "{printed}");
    answered_by("resnet18").await;
    assert_eq!(versions(&mut v2).await, vec!["1"]);
    stop.store(1, Ordering::Relaxed);
    let mut answered = BTreeMap::new();
    for c in callers {
        let seen = c.await.unwrap();
        assert!(seen.lost.is_empty(), "requests lost while versions changed: {:?}", seen.lost);
        for ((variant, _), n) in seen.answers {
            *answered.entry(variant).or_insert(0) += n;
        }
    }
    println!("answered while versions changed: {answered:?}");
    assert!(answered.len() == 2, "both versions answered the callers: {answered:?}");
    let status = ctl.status(ClusterStatusRequest {}).await.unwrap().into_inner();
    let t = &status.tasks[0];
    assert_eq!((t.spec.as_ref().unwrap().version, t.earlier_versions.clone()), (1, vec![2]));
    let none = tidal_proto::v1::RollbackTaskRequest { task: "t".into(), version: 0 };
    let refused = ctl.rollback_task(none).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "nothing below version 1: {refused:?}");
    assert!(refused.message().contains("kept: 2"), "{}", refused.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_lags_or_crashes_is_rolled_back_and_a_healthy_one_promoted_without_losing_a_request() {
    let _turn = tidal_tests::file_turn(module_path!());
    use tidal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    use tidal_proto::inference::ModelMetadataRequest;
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "resnet18,resnet152", 32);
    // The same model under another name: a new version that is as good as the old.
    let same = std::fs::read_to_string(models.join("resnet18.toml")).unwrap();
    for copy in ["resnet18b", "resnet18c"] {
        std::fs::write(
            models.join(format!("{copy}.toml")),
            same.replace("name = \"resnet18\"", &format!("name = \"{copy}\"")),
        )
        .unwrap();
    }
    let controller = start_controller_ready(work.path(), 1.0, &["--no-profile-correction", "--no-slack-routing"]);
    let agent =
        start_agent(work.path(), AgentOpts { model_dir: &models, controller: Some(&controller.addr), extra: &[] });
    let mut ctl = controller_client(&controller.addr).await;
    let tidalctl = |args: &[&str]| {
        let out = as_admin(&mut std::process::Command::new(bin("tidalctl")))
            .args(["--controller", &controller.addr])
            .args(args)
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "tidalctl {args:?}: {printed}");
        printed
    };
    let model_dir = models.display().to_string();
    let register = |variant: &str, staged: bool| {
        let mut args = vec!["task", "register", "--name", "t", "--slo-ms", "5000", "--model-dir", &model_dir];
        args.extend(["--variants", variant]);
        if staged {
            args.push("--staged");
        }
        args.iter().map(|a| a.to_string()).collect::<Vec<String>>()
    };
    let run = |args: Vec<String>| tidalctl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    run(register("resnet18", false));
    // Every variant profiled alike: the planner takes resnet152 for as fast as resnet18, and
    // only its canary shows otherwise.
    ctl.store_profile(StoreProfileRequest { profile: Some(stored_profile("t", "resnet18", 100.0)) }).await.unwrap();
    let shape = VariantConfig::load(&models, "resnet18").unwrap().input_shape;
    eventually(Duration::from_secs(30), "t to be served", || {
        let (addr, shape) = (agent.addr.clone(), shape.clone());
        async move {
            let req = InferRequest { task: "t".into(), input: Some(sample(&shape)), ..Default::default() };
            inference_client(&addr).await.infer(req).await.ok().map(|_| ())
        }
    })
    .await;
    let stop = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(call_until_stopped(agent.addr.clone(), "t", shape.clone(), stop.clone())))
        .collect();
    let reader = ctl.clone();
    let rollout_ended = |version: &'static str| {
        let ctl = reader.clone();
        async move {
            eventually(Duration::from_secs(60), &format!("the rollout of version {version} to end"), move || {
                let mut ctl = ctl.clone();
                async move {
                    let status = ctl.status(ClusterStatusRequest {}).await.ok()?.into_inner();
                    let t = status.tasks.into_iter().find(|t| t.spec.as_ref().is_some_and(|s| s.name == "t"))?;
                    t.rollout.is_none().then(|| t.spec.unwrap().version)
                }
            })
            .await
        }
    };

    // Version 2, resnet152 (several times slower), staged and rolled out to 30 %: rolled back
    // on its p99.
    let printed = run(register("resnet152", true));
    assert!(printed.contains("version 2 (staged, not served) of task t"), "{printed}");
    ctl.store_profile(StoreProfileRequest { profile: Some(stored_profile("t", "resnet152", 100.0)) }).await.unwrap();
    let rollout = |version: &str| {
        run(["task", "rollout", "--task", "t", "--version", version, "--canary", "30", "--window-s", "8"]
            .iter()
            .chain(&["--max-slowdown", "2", "--max-error-increase", "0.005"])
            .map(|a| a.to_string())
            .collect())
    };
    rollout("2");
    let mut v2 = GrpcInferenceServiceClient::new(channel(&agent.addr).await);
    eventually(Duration::from_secs(30), "V2 metadata to list the canary's version", || {
        let mut v2 = v2.clone();
        async move {
            let meta =
                v2.model_metadata(ModelMetadataRequest { name: "t".into(), version: String::new() }).await.ok()?;
            (meta.into_inner().versions == ["1", "2"]).then_some(())
        }
    })
    .await;
    assert_eq!(rollout_ended("2").await, 1, "the slow canary is rolled back: version 1 serves");
    let log = std::fs::read_to_string(work.path().join("controller.log")).unwrap();
    let ended = log.lines().find(|l| l.contains("roll back the rollout of task t")).expect("audited");
    assert!(ended.contains("p99"), "rolled back on its latency: {ended}");

    // Version 3, a model whose worker crashes (killed again and again, as a model that
    // brings its process down would): rolled back on its errors, and every request it
    // failed answered by version 1.
    run(register("resnet18c", true));
    ctl.store_profile(StoreProfileRequest { profile: Some(stored_profile("t", "resnet18c", 100.0)) }).await.unwrap();
    rollout("3");
    let crashing = tokio::spawn({
        let agent_ctl = agent_client(&agent.control_addr).await;
        async move {
            let mut kills = 0;
            for _ in 0..600 {
                let status =
                    agent_ctl.clone().status(tidal_proto::v1::AgentStatusRequest {}).await.unwrap().into_inner();
                let Some(canary) = status.workers.iter().find(|w| w.task == "t@3") else {
                    if kills > 0 {
                        break; // rolled back: its worker is gone
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                // Killed once it serves (and has taken its share of requests), each time.
                if !canary.ready {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                let procs = std::fs::read_to_string(std::path::Path::new(&canary.cgroup).join("cgroup.procs"));
                for pid in procs.unwrap_or_default().lines().filter(|p| !p.trim().is_empty()) {
                    let killed = std::process::Command::new("kill").args(["-9", pid.trim()]).status();
                    kills += killed.is_ok_and(|s| s.success()) as u32;
                }
            }
            kills
        }
    });
    assert_eq!(rollout_ended("3").await, 1, "the crashing canary is rolled back: version 1 serves");
    assert!(crashing.await.unwrap() > 0, "the canary's worker was killed");
    let log = std::fs::read_to_string(work.path().join("controller.log")).unwrap();
    let ended = log.lines().filter(|l| l.contains("roll back the rollout of task t")).nth(1).expect("audited");
    assert!(ended.contains("failed or was late"), "rolled back on its errors: {ended}");

    // Version 4, the same model under another name: promoted after its window.
    let printed = run(register("resnet18b", true));
    assert!(printed.contains("version 4 (staged, not served)"), "{printed}");
    ctl.store_profile(StoreProfileRequest { profile: Some(stored_profile("t", "resnet18b", 100.0)) }).await.unwrap();
    rollout("4");
    let meta = v2.model_metadata(ModelMetadataRequest { name: "t".into(), version: String::new() });
    assert!(meta.await.is_ok());
    let served = rollout_ended("4").await;
    let log = std::fs::read_to_string(work.path().join("controller.log")).unwrap();
    let audit: Vec<&str> = log.lines().filter(|l| l.contains("rollout")).collect();
    assert_eq!(served, 4, "the healthy canary is promoted: {audit:#?}");
    assert!(log.lines().any(|l| l.contains("promote the rollout of task t")), "audited");
    eventually(Duration::from_secs(30), "version 4 to answer every request", || {
        let (addr, shape) = (agent.addr.clone(), shape.clone());
        async move {
            let req = InferRequest { task: "t".into(), input: Some(sample(&shape)), ..Default::default() };
            let answer = inference_client(&addr).await.infer(req).await.ok()?.into_inner();
            (answer.version == 4 && answer.variant == "resnet18b").then_some(())
        }
    })
    .await;
    stop.store(1, Ordering::Relaxed);
    let mut answered = BTreeMap::new();
    for c in callers {
        let seen = c.await.unwrap();
        assert!(seen.lost.is_empty(), "requests lost during the rollouts: {:?}", seen.lost);
        for ((_, version), n) in seen.answers {
            *answered.entry(version).or_insert(0) += n;
        }
    }
    println!("answered by version: {answered:?}; {audit:#?}");
    assert!([1, 2, 4].iter().all(|v| answered.get(v).is_some_and(|&n| n > 0)), "the versions answered: {answered:?}");
}
