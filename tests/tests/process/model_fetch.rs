//! Models without a shared file system, as processes: the agent's model directory is empty,
//! and the controller (`--model-dir`) holds the files. A task registered with `tidalctl`
//! (which records each file's SHA-256) is served from a file the agent fetched from the
//! controller and checked. A task whose file on the controller is not the one registered (a
//! byte changed on the way, or on its disk) is not served from it: the download is refused
//! and tried again, and served once the controller has the right file. The controller sends
//! only files that a task registers with that digest.

use std::process::Command;
use std::time::{Duration, Instant};

use tidal_proto::v1::{ClusterStatus, FetchModelRequest, InferRequest, StoreProfileRequest};
use tidal_tests::*;

/// How many ready workers of `task` the agents report.
fn ready_workers(st: &ClusterStatus, task: &str) -> usize {
    st.nodes.iter().flat_map(|n| &n.workers).filter(|w| w.task == task && w.ready).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_the_files_serves_from_fetched_ones_and_refuses_a_corrupt_one() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    // What the admin registers from, and the controller's copy.
    let (admin, store, empty) = (work.path().join("admin"), work.path().join("store"), work.path().join("empty"));
    generate_models(&admin, "resnet18,resnet50,resnet34", 32);
    std::fs::create_dir_all(&empty).unwrap();
    let onnx = std::fs::read(admin.join("resnet18.onnx")).unwrap();
    let other = std::fs::read(admin.join("resnet50.onnx")).unwrap();
    // The controller's copy of resnet50 differs from the registered file by one byte.
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(store.join("resnet18.onnx"), &onnx).unwrap();
    let lazy = std::fs::read(admin.join("resnet34.onnx")).unwrap();
    std::fs::write(store.join("resnet34.onnx"), &lazy).unwrap();
    let mut flipped = other.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0xff;
    std::fs::write(store.join("resnet50.onnx"), &flipped).unwrap();

    let store_arg = store.display().to_string();
    let controller = start_controller_ready(
        work.path(),
        1.0,
        &["--model-dir", &store_arg, "--no-profile-correction", "--no-slack-routing"],
    );
    let ctl_addr = controller.addr.clone();
    let extra = ["--metrics-listen", "127.0.0.1:0"];
    let agent = start_agent(work.path(), AgentOpts { model_dir: &empty, controller: Some(&ctl_addr), extra: &extra });
    let metrics = agent.metrics_addr.clone().expect("the agent's metrics port");
    // A counter of the agent's metrics page (0 while it has no sample).
    let counter = |name: &'static str| {
        let metrics = metrics.clone();
        async move {
            let (status, _, page) = http_exchange(&metrics, "GET", "/metrics", &[], b"").await;
            assert_eq!(status, 200);
            let page = String::from_utf8_lossy(&page).into_owned();
            page.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok()).unwrap_or(0)
        }
    };
    let mut ctl = controller_client(&ctl_addr).await;
    for (task, variant) in [("fetched", "resnet18"), ("corrupt", "resnet50")] {
        let out = as_admin(&mut Command::new(bin("tidalctl")))
            .args(["--controller", &ctl_addr, "task", "register", "--name", task, "--slo-ms", "1000"])
            .args(["--variants", variant, "--model-dir"])
            .arg(&admin)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let profile = Some(stored_profile(task, variant, 200.0));
        ctl.store_profile(StoreProfileRequest { profile }).await.unwrap();
    }
    let digest = tidal_common::digest::sha256_hex(&onnx);

    // Served from the fetched file, kept under its digest in the cache.
    let started = Instant::now();
    eventually(Duration::from_secs(60), "the fetched task served", || async {
        (ready_workers(&cluster_status(&ctl_addr).await?, "fetched") == 1).then_some(())
    })
    .await;
    println!("served from a fetched file {:.1} s after registration", started.elapsed().as_secs_f64());
    let cached = empty.join(".fetched").join(format!("{digest}.onnx"));
    assert_eq!(std::fs::read(&cached).expect("the fetched file in the cache"), onnx);
    let mut client = inference_client(&agent.addr).await;
    let request =
        |task: &str| InferRequest { task: task.into(), input: Some(sample(&[3, 32, 32])), ..Default::default() };
    let answer = client.infer(request("fetched")).await.expect("served from the fetched file").into_inner();
    assert_eq!(answer.variant, "resnet18");

    // The corrupt copy is refused: no worker, nothing kept; the agent says why and retries.
    let log = agent.proc.log.clone();
    eventually(Duration::from_secs(30), "the corrupt download refused", || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log).ok()?;
            text.contains("corrupt: the bytes received have SHA-256").then_some(())
        }
    })
    .await;
    let st = cluster_status(&ctl_addr).await.unwrap();
    assert_eq!(ready_workers(&st, "corrupt"), 0, "served from a file that is not the registered one");
    let refused = client.infer(request("corrupt")).await.expect_err("no worker");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let kept: Vec<_> = std::fs::read_dir(empty.join(".fetched")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(kept.len(), 1, "only the good file is kept: {kept:?}");
    // Counted: one attempt fetched (the good file's bytes), the corrupt ones failed.
    assert_eq!(counter("tidal_agent_model_fetches_total{outcome=\"fetched\"}").await, 1);
    assert!(counter("tidal_agent_model_fetches_total{outcome=\"failed\"}").await >= 1);
    assert_eq!(counter("tidal_agent_model_fetched_bytes_total").await, onnx.len() as u64);
    let other_digest = tidal_common::digest::sha256_hex(&other);

    // Mended on the controller: fetched again on the agent's next try, and served.
    std::fs::write(store.join("resnet50.onnx"), &other).unwrap();
    let mended = Instant::now();
    eventually(Duration::from_secs(60), "the mended task served", || async {
        (ready_workers(&cluster_status(&ctl_addr).await?, "corrupt") == 1).then_some(())
    })
    .await;
    println!("served {:.1} s after the controller's copy was mended", mended.elapsed().as_secs_f64());
    client.infer(request("corrupt")).await.expect("served once the right file came");
    let cached = empty.join(".fetched").join(format!("{other_digest}.onnx"));
    assert_eq!(std::fs::read(&cached).expect("the mended file in the cache"), other);

    // A profile of a variant whose file no plan has fetched (its task is loaded on demand and
    // was never asked for) fetches it first.
    let out = as_admin(&mut Command::new(bin("tidalctl")))
        .args(["--controller", &ctl_addr, "task", "register", "--name", "lazy", "--slo-ms", "1000"])
        .args(["--min-workers", "0", "--variants", "resnet34", "--model-dir"])
        .arg(&admin)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lazy_cached = empty.join(".fetched").join(format!("{}.onnx", tidal_common::digest::sha256_hex(&lazy)));
    assert!(!lazy_cached.exists(), "fetched before anything asked for it");
    let out = as_admin(&mut Command::new(bin("tidalctl")))
        .args(["--controller", &ctl_addr, "profile", "--agent", &agent.control_addr, "--task", "lazy"])
        .args(["--cores", "1", "--batches", "1", "--duration-ms", "200", "--repeat", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "profile failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&lazy_cached).expect("the profiled file in the cache"), lazy);
    assert_eq!(counter("tidal_agent_model_fetches_total{outcome=\"fetched\"}").await, 3);

    // The controller sends only a file a task registers with that digest.
    for (file, sha) in [("resnet18.onnx", "0".repeat(64)), ("resnet18.toml", digest.clone())] {
        let asked = FetchModelRequest { model_file: file.into(), sha256: sha };
        let refused = match ctl.fetch_model(asked).await {
            Ok(_) => panic!("{file} sent"),
            Err(status) => status,
        };
        // On mutual TLS (TIDAL_TEST_TLS=1) the tests' admin is not an agent: refused before that.
        let expected =
            if tidal_tests::tls::test_ca().is_some() { tonic::Code::PermissionDenied } else { tonic::Code::NotFound };
        assert_eq!(refused.code(), expected, "{refused:?}");
    }
}
