//! In-place resizing: a worker under sustained load goes from 1 to 2 cores and back; the kernel's
//! cgroup files show each new quota, the process is never restarted, its ONNX Runtime threads
//! follow the quota (a session of the new count built beside the running one and swapped in),
//! and the throughput follows. Alone in its own test binary, so no other test competes for the
//! machine's cores.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidal_proto::v1::{ApplyPlanRequest, InferRequest};
use tidal_tests::*;

/// Closed-loop load with `concurrency` callers for `secs`; the rate of answered requests.
async fn throughput(addr: &str, shape: &[i64], concurrency: usize, secs: f64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut client = inference_client(addr).await;
        let done = done.clone();
        let input = sample(shape);
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let req = InferRequest {
                    task: "classify".into(),
                    input: Some(input.clone()),
                    budget_ms: 10_000,
                    ..Default::default()
                };
                if client.infer(req).await.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / secs
}

/// The threads of the process in a worker's cgroup, as the kernel counts them.
fn os_threads(cgroup: &std::path::Path) -> usize {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
    let pid = procs.lines().next().expect("the worker's process in its cgroup").trim().to_string();
    std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().count()
}

/// Keeps the worker busy until its batches run with `threads` (its telemetry says what its
/// last batch ran with); how long that took.
async fn until_threads(s: &Setup, threads: u32) -> Duration {
    let started = Instant::now();
    loop {
        throughput(&s.agent.addr, &s.r50.input_shape, 2, 0.2).await;
        if wait_ready(&s.agent.control_addr, 1).await[0].threads == threads {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the worker never ran {threads} threads");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_under_load_is_resized_in_place_and_its_throughput_follows() {
    let s = setup(&[]);
    let mut agent = agent_client(&s.agent.control_addr).await;
    let node = s.agent.node.clone();
    let apply = |epoch: u64, millicores: u32| plan_for(epoch, &node, "classify", 10_000, &[(&s.r50, millicores, 4)]);
    agent.apply_plan(ApplyPlanRequest { plan: Some(apply(1, 1000)), ..Default::default() }).await.unwrap();
    let before = wait_ready(&s.agent.control_addr, 1).await;
    let cgroup = std::path::PathBuf::from(&before[0].cgroup);
    assert_eq!(cgroup_millicores(&cgroup), Some(1000));
    throughput(&s.agent.addr, &s.r50.input_shape, 8, 1.0).await; // warm-up
    assert_eq!(wait_ready(&s.agent.control_addr, 1).await[0].threads, 1, "one core, one thread");
    let one_thread = os_threads(&cgroup);
    let one_core = throughput(&s.agent.addr, &s.r50.input_shape, 8, 4.0).await;

    agent.apply_plan(ApplyPlanRequest { plan: Some(apply(2, 2000)), ..Default::default() }).await.unwrap();
    assert_eq!(cgroup_millicores(&cgroup), Some(2000), "the new quota is in the kernel's files");
    let grew = until_threads(&s, 2).await;
    let two_threads = os_threads(&cgroup);
    let two_cores = throughput(&s.agent.addr, &s.r50.input_shape, 8, 4.0).await;

    agent.apply_plan(ApplyPlanRequest { plan: Some(apply(3, 1000)), ..Default::default() }).await.unwrap();
    assert_eq!(cgroup_millicores(&cgroup), Some(1000));
    let shrank = until_threads(&s, 1).await;
    let back = throughput(&s.agent.addr, &s.r50.input_shape, 8, 4.0).await;

    let after = wait_ready(&s.agent.control_addr, 1).await;
    assert_eq!(after[0].id, before[0].id, "the same worker, not a new one");
    assert_eq!(after[0].restarts, 0, "resizing never restarts the process");
    println!(
        "resnet50 throughput: 1 core {one_core:.1} req/s, 2 cores {two_cores:.1} req/s, back to 1 core {back:.1} req/s; \
         threads followed in {grew:?} and {shrank:?}; the process ran {one_thread}, {two_threads}, {} threads",
        os_threads(&cgroup)
    );
    // The session swapped out took its threads with it.
    assert_eq!(two_threads, one_thread + 1, "one more intra-op thread at 2 cores");
    assert_eq!(os_threads(&cgroup), one_thread, "as many threads as before at 1 core");
    assert!(two_cores > 1.4 * one_core, "2 cores {two_cores:.1} vs 1 core {one_core:.1}");
    assert!(back < 0.75 * two_cores, "back at 1 core {back:.1} vs 2 cores {two_cores:.1}");
}
