//! The daemons as systemd's `Type=notify` units see them, without systemd: a datagram socket
//! stands in for `NOTIFY_SOCKET`. Readiness is announced only once a daemon serves (an agent:
//! once its plan's workers are ready), the watchdog is pinged, SIGTERM stops cleanly, and a
//! leader stopped that way hands leadership over instead of leaving the group to an election.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tidal_proto::v1::{
    AgentStatusRequest, ClusterStatusRequest, ProfilePoint, RegisterTaskRequest, StoreProfileRequest, VariantProfile,
};
use tidal_tests::group::Group;
use tidal_tests::*;

/// A socket that plays systemd's part.
struct Notifications(UnixDatagram);

impl Notifications {
    fn bind(path: &Path) -> Self {
        let socket = UnixDatagram::bind(path).expect("a notification socket");
        socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        Self(socket)
    }

    /// Waits up to `timeout` for a message containing `line`; what came before it.
    fn wait_for(&self, line: &str, timeout: Duration) -> Vec<String> {
        let (deadline, mut seen) = (Instant::now() + timeout, Vec::new());
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.0.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let found = text.lines().any(|l| l == line);
                seen.push(text);
                if found {
                    return seen;
                }
            }
        }
        panic!("no {line} within {timeout:?}; received {seen:?}");
    }
}

#[test]
fn a_controller_announces_readiness_pings_its_watchdog_and_stops_on_sigterm() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let socket = work.path().join("notify");
    let systemd = Notifications::bind(&socket);
    let ready = work.path().join("ready.json");
    let mut cmd = Command::new(bin("tidal-controller"));
    cmd.args(["--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(work.path().join("data"));
    cmd.arg("--ready-file").arg(&ready);
    cmd.env("NOTIFY_SOCKET", &socket).env("WATCHDOG_USEC", "300000");
    as_daemon(&mut cmd, &tidal_auth::Role::Controller(1), "");
    let mut child = cmd.stderr(std::process::Stdio::null()).spawn().unwrap();

    systemd.wait_for("READY=1", Duration::from_secs(20));
    // The ready file is written before systemd is told: READY=1 means both are true.
    let ports: std::collections::HashMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(&ready).expect("the ready file before READY=1")).unwrap();
    assert!(std::net::TcpStream::connect(&ports["api"]).is_ok(), "ready means the API listens");
    systemd.wait_for("WATCHDOG=1", Duration::from_secs(2));
    systemd.wait_for("WATCHDOG=1", Duration::from_secs(2));
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    systemd.wait_for("STOPPING=1", Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the controller did not stop within 10 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "SIGTERM is a clean stop: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_is_ready_only_once_the_workers_of_its_plan_serve() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 32);
    let r18 = tidal_common::variant::VariantConfig::load(&models, "resnet18").unwrap();
    let (_controller, ctl_addr) = start_controller(work.path(), 3600.0, &[]);
    let mut ctl = controller_client(&ctl_addr).await;
    let task = tidal_common::task::single_stage("classify", 1000, vec![r18.spec()]);
    eventually(Duration::from_secs(20), "the task to be registered", || {
        let (mut ctl, task) = (ctl.clone(), task.clone());
        async move { ctl.register_task(RegisterTaskRequest { task: Some(task), ..Default::default() }).await.ok() }
    })
    .await;
    let point = ProfilePoint {
        cores: 1,
        batch: 1,
        latency_p50_ms: 5.0,
        latency_p99_ms: 8.0,
        throughput_rps: 150.0,
        ..Default::default()
    };
    let profile = VariantProfile {
        task: "classify".into(),
        variant: "resnet18".into(),
        node: String::new(),
        points: vec![point],
        ..Default::default()
    };
    ctl.store_profile(StoreProfileRequest { profile: Some(profile) }).await.unwrap();

    // An agent in the plan is restarted (as an upgrade does): the new one is ready only
    // once it serves its share again.
    let node = unique_node();
    let opts = || AgentOpts { model_dir: &models, controller: Some(&ctl_addr), extra: &[] };
    let first = start_agent_named(work.path(), &node, opts());
    eventually(Duration::from_secs(60), "the first agent to serve its plan", || {
        let addr = first.control_addr.clone();
        async move {
            let s = agent_client(&addr).await.status(AgentStatusRequest {}).await.ok()?.into_inner();
            (!s.workers.is_empty() && s.workers.iter().all(|w| w.ready)).then_some(())
        }
    })
    .await;
    drop(first);
    let socket = work.path().join("notify");
    let systemd = Notifications::bind(&socket);
    let socket = socket.display().to_string();
    let agent = start_agent_with_env(work.path(), &node, opts(), &[("NOTIFY_SOCKET", &socket)]);
    let systemd = tokio::task::spawn_blocking(move || {
        systemd.wait_for("READY=1", Duration::from_secs(60));
        systemd
    })
    .await
    .unwrap();
    let status = agent_client(&agent.control_addr).await.status(AgentStatusRequest {}).await.unwrap().into_inner();
    let plan = ctl.status(ClusterStatusRequest {}).await.unwrap().into_inner().plan.unwrap();
    assert!(status.applied_epoch >= 1 && !status.workers.is_empty(), "ready with a plan applied: {status:?}");
    assert!(status.workers.iter().all(|w| w.ready), "ready only once its workers serve");
    assert!(plan.assignments.iter().any(|a| a.node == agent.node));
    drop(agent); // SIGTERM
    tokio::task::spawn_blocking(move || systemd.wait_for("STOPPING=1", Duration::from_secs(10))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_with_sigterm_hands_over_without_an_election() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    // Elections take 2–4 s here: a hand-over is the only way to a new leader within one.
    let mut group = Group::start(work.path(), 3, &["--interval-s", "3600", "--election-ticks", "40"]);
    let leader = group.leader(Duration::from_secs(30)).await;
    let stopped = Instant::now();
    let status = group.terminate(leader).expect("the leader stops within 10 s");
    assert!(status.success(), "SIGTERM is a clean stop: {status:?}");
    let next = eventually(Duration::from_secs(10), "another replica to lead", || async {
        for id in group.ids().into_iter().filter(|&id| id != leader) {
            if let Some(v) = group.view(id).await.filter(|v| v.leader != 0 && v.leader != leader) {
                return Some(v.leader);
            }
        }
        None
    })
    .await;
    let took = stopped.elapsed();
    eprintln!("SIGTERM to the leader, replica {leader}: replica {next} leads {took:?} later");
    assert_ne!(next, leader);
    assert!(took < Duration::from_millis(1500), "a hand-over, not an election: {took:?}");
}
