//! The controller as a replicated service: three `tidal-controller` processes form a Raft
//! group. A killed leader is replaced and agents follow; a leader cut off by the network steps
//! down and what it accepted alone never commits; a full `kill -9` restart loses nothing
//! committed; replicas join and leave while writes go on; an agent refuses a deposed
//! leader's plan.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tidal_proto::v1::{
    AgentStatus, AgentStatusRequest, ApplyPlanRequest, ClusterStatusRequest, Plan, PlanHistoryRequest,
    RegisterTaskRequest, SetSloRequest, TaskSpec, VariantSpec,
};
use tidal_tests::group::{list, tidalctl, Group, Placement};
use tidal_tests::netns::{self, Net};
use tidal_tests::*;
use tonic::Code;

fn task(slo_ms: u32) -> TaskSpec {
    TaskSpec {
        name: "t".into(),
        slo_ms,
        variants: vec![VariantSpec {
            name: "v".into(),
            model_file: "v.onnx".into(),
            accuracy: 70.0,
            input_shape: vec![3, 8, 8],
            tensor_names: Default::default(),
            tokenizer_file: String::new(),
            io: None,
            model_sha256: String::new(),
        }],
        stages: vec![],
        ..Default::default()
    }
}

async fn history(group: &Group, id: u64) -> Vec<Plan> {
    let mut c = group.client(id).await;
    c.history(PlanHistoryRequest { limit: 1000 }).await.expect("history").into_inner().plans
}

/// Epochs run 1, 2, 3… without a gap and terms never go back.
fn assert_no_gap(plans: &[Plan]) {
    for (i, p) in plans.iter().enumerate() {
        assert_eq!(p.epoch, i as u64 + 1, "plan epochs have a gap: {:?}", epochs(plans));
    }
    assert!(plans.windows(2).all(|w| w[0].term <= w[1].term), "a plan from an older term came later");
}

fn epochs(plans: &[Plan]) -> Vec<(u64, u64)> {
    plans.iter().map(|p| (p.epoch, p.term)).collect()
}

async fn agent_status(addr: &str) -> Option<AgentStatus> {
    agent_client(addr).await.status(AgentStatusRequest {}).await.ok().map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_agents_follow_and_a_full_restart_loses_nothing() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    // Snapshots every 5 entries: the restart below rebuilds the state from a snapshot and
    // the log after it.
    let mut group = Group::start(work.path(), 3, &["--interval-s", "2", "--snapshot-entries", "5"]);
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 32);
    let r18 = tidal_common::variant::VariantConfig::load(&models, "resnet18").unwrap();
    let controllers = group.addrs();
    let agent = start_agent(work.path(), AgentOpts { model_dir: &models, controller: Some(&controllers), extra: &[] });

    let first = group.leader(Duration::from_secs(20)).await;
    let served = tidal_common::task::single_stage("t", 500, vec![r18.spec()]);
    group
        .client(first)
        .await
        .register_task(RegisterTaskRequest { task: Some(served), ..Default::default() })
        .await
        .unwrap();
    let before = eventually(Duration::from_secs(20), "the agent applies the first leader's plan", || async {
        agent_status(&agent.control_addr).await.filter(|s| s.applied_epoch >= 1)
    })
    .await;
    let term1 = group.view(first).await.unwrap().term;

    group.kill(first);
    let killed = std::time::Instant::now();
    let second = group.leader(Duration::from_secs(10)).await;
    eprintln!("a new leader agreed on {:?} after the kill", killed.elapsed());
    assert_ne!(second, first);
    let term2 = group.view(second).await.unwrap().term;
    assert!(term2 > term1);
    // The new leader re-commits the plan under its term and pushes it; the agent takes it.
    eventually(Duration::from_secs(10), "the agent applies the new leader's plan", || async {
        agent_status(&agent.control_addr)
            .await
            .filter(|s| s.applied_term >= term2 && s.applied_epoch > before.applied_epoch)
    })
    .await;
    // The agent re-registers with the new leader and its telemetry resumes there. (On a
    // loaded machine a spurious election may move leadership again: follow it.)
    let mut leader = tidal_tests::group::leader_client(&group.addrs()).await.expect("a leader");
    wait_reporting(&leader, &agent.node, "the agent reports to the new leader").await;
    // The next adaptation runs on the new leader: an SLO change reaches the agent in a plan.
    leader.set_slo(SetSloRequest { task: "t".into(), slo_ms: 400 }).await.unwrap();
    eventually(Duration::from_secs(10), "a plan with the new SLO from the new leader", || async {
        let plans = history(&group, second).await;
        let last = plans.last()?;
        (last.term >= term2 && last.tasks.iter().any(|t| t.slo_ms == 400)).then_some(())
    })
    .await;
    let committed = history(&group, second).await;
    assert_no_gap(&committed);
    assert!(committed.iter().any(|p| p.term == term1) && committed.iter().any(|p| p.term >= term2));

    assert!(group.view(second).await.unwrap().snapshot_index > 0, "the log was compacted");
    // kill -9 every replica, then start them all again: every committed plan is back.
    for id in group.ids() {
        group.kill(id);
    }
    for id in group.ids() {
        group.restart(id);
    }
    let third = group.leader(Duration::from_secs(20)).await;
    // A leader commits its plan in its first round, which may come after it is agreed on.
    let after = eventually(Duration::from_secs(10), "the new leader commits a plan of its own", || async {
        let after = history(&group, third).await;
        (after.len() > committed.len()).then_some(after)
    })
    .await;
    assert_no_gap(&after);
    assert_eq!(after[..committed.len()], committed[..], "committed plans survive a full restart unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_a_plan_from_a_deposed_leader() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let agent = start_agent(work.path(), AgentOpts { model_dir: &models, controller: None, extra: &[] });
    let mut client = agent_client(&agent.control_addr).await;
    let plan = |epoch, term| {
        // A task with no worker on this node: only the ordering of plans is at stake.
        let mut p = plan_for(epoch, &agent.node, "t", 100, &[]);
        p.tasks = vec![tidal_common::task::normalise(task(100))];
        p.term = term;
        ApplyPlanRequest { plan: Some(p), ..Default::default() }
    };
    client.apply_plan(plan(5, 3)).await.expect("a first plan is applied");
    for (epoch, term) in [(4, 9), (5, 2)] {
        let err = client.apply_plan(plan(epoch, term)).await.expect_err("an older plan is refused");
        assert_eq!(err.code(), Code::FailedPrecondition, "epoch {epoch} term {term}: {err}");
    }
    client.apply_plan(plan(5, 3)).await.expect("the same plan again is harmless");
    client.apply_plan(plan(6, 3)).await.expect("the next plan is applied");
    let s = agent_status(&agent.control_addr).await.unwrap();
    assert_eq!((s.applied_epoch, s.applied_term), (6, 3));
}

/// `tidalctl controller list` run inside a namespace, parsed: (term, leader, last index, commit).
fn view_from_inside(net: &Net, k: usize, addr: &str) -> Option<(u64, u64, u64, u64)> {
    let mut cmd = Command::new(&net.wrapper(k)[0]);
    as_admin(&mut cmd).args(&net.wrapper(k)[1..]).arg(bin("tidalctl")).args([
        "--controller",
        addr,
        "controller",
        "list",
    ]);
    let out = String::from_utf8(cmd.output().ok()?.stdout).ok()?;
    let line = out.lines().next()?;
    let number_after = |key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split(|c: char| !c.is_ascii_digit()).find(|s| !s.is_empty())?.parse().ok()
    };
    let leader = if line.contains("leader none") { 0 } else { number_after("leader ")? };
    Some((number_after("term ")?, leader, number_after("log to ")?, number_after("commit ")?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_steps_down_its_writes_never_commit_and_it_catches_up() {
    let _turn = tidal_tests::file_turn(module_path!());
    if !netns::available() {
        eprintln!("skipped: cutting a link needs root (network namespaces)");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let net = Net::create(3).expect("network namespaces");
    let placements = (1..=3)
        .map(|k| Placement {
            addr: format!("{}:7000", net.host(k)),
            peer: format!("{}:7001", net.host(k)),
            wrapper: net.wrapper(k),
        })
        .collect();
    // A 2–4 s election timeout leaves the cut-off leader time to accept a write alone.
    let group = Group::start_placed(work.path(), placements, &["--interval-s", "2", "--election-ticks", "40"]);
    let old = group.leader(Duration::from_secs(30)).await;
    let old_addr = group.addr(old);
    group
        .client(old)
        .await
        .register_task(RegisterTaskRequest { task: Some(task(500)), ..Default::default() })
        .await
        .unwrap();
    let old_term = group.view(old).await.unwrap().term;

    net.cut(old as usize).unwrap();
    // A write reaches the cut-off leader from its own side of the cut: it cannot commit.
    let mut write = Command::new(&net.wrapper(old as usize)[0]);
    as_admin(&mut write).args(&net.wrapper(old as usize)[1..]).arg(bin("tidalctl"));
    write.args(["--controller", &old_addr, "task", "set-slo", "--task", "t", "--slo-ms", "999"]);
    let refused = write.output().unwrap();
    assert!(!refused.status.success(), "a write on a cut-off leader must not succeed");

    let majority: Vec<u64> = group.ids().into_iter().filter(|&id| id != old).collect();
    let new = eventually(Duration::from_secs(20), "the majority elects a new leader", || async {
        let v = list(&group.addr(majority[0])).await?;
        (v.leader != 0 && v.leader != old && v.term > old_term).then_some(v.leader)
    })
    .await;
    let (term, leader, last, commit) = eventually(Duration::from_secs(10), "the cut-off leader steps down", || async {
        view_from_inside(&net, old as usize, &old_addr).filter(|v| v.1 != old)
    })
    .await;
    assert_eq!(leader, 0, "alone, it knows no leader");
    assert_eq!(term, old_term, "pre-vote keeps a cut-off replica from inflating the term");
    assert!(last > commit, "the write it accepted alone stays uncommitted (log to {last}, commit {commit})");

    net.heal(old as usize).unwrap();
    let leader_commit = group.view(new).await.unwrap().commit;
    eventually(Duration::from_secs(20), "the old leader catches up and follows", || async {
        let v = group.view(old).await?;
        (v.leader != 0 && v.term > old_term && v.commit >= leader_commit && v.last_index == v.commit).then_some(())
    })
    .await;
    let mut leader = tidal_tests::group::leader_client(&group.addrs()).await.expect("a leader");
    let status = leader.status(ClusterStatusRequest {}).await.unwrap().into_inner();
    let slo = status.tasks.iter().find_map(|t| t.spec.as_ref().filter(|s| s.name == "t").map(|s| s.slo_ms));
    assert_eq!(slo, Some(500), "the cut-off leader's write never committed");
    // A follower's reads go through the leader's read index: the old leader now answers the
    // same history as the new one.
    same_history(&group, old, new).await;
}

/// Waits until replicas `a` and `b` answer the same plan history (a plan may commit between
/// two reads).
async fn same_history(group: &Group, a: u64, b: u64) {
    eventually(Duration::from_secs(10), "both replicas answer the same history", || async {
        let (x, y) = (history(group, a).await, history(group, b).await);
        (x == y && !x.is_empty()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_join_and_leave_while_writes_go_on() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    // Snapshot every 20 entries, so the joining replica must be sent a snapshot.
    let mut group = Group::start(work.path(), 3, &["--interval-s", "2", "--snapshot-entries", "20"]);
    let first = group.leader(Duration::from_secs(20)).await;
    group
        .client(first)
        .await
        .register_task(RegisterTaskRequest { task: Some(task(500)), ..Default::default() })
        .await
        .unwrap();

    // Writes all along, to whoever leads.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let writer = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let addrs = group.addrs();
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let result = async {
                    let mut c = tidal_tests::group::leader_client(&addrs).await?;
                    c.set_slo(SetSloRequest { task: "t".into(), slo_ms: 300 + i % 100 }).await.ok()
                }
                .await;
                let counter = if result.is_some() { &ok } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    eventually(Duration::from_secs(20), "the log is compacted", || async {
        group.view(first).await.filter(|v| v.snapshot_index > 0).map(|_| ())
    })
    .await;

    let fourth = group.start_joining(4);
    tidalctl(&group.addrs(), &["controller", "add", "--id", "4", "--address", &fourth]).expect("adding replica 4");
    let commit = group.view(first).await.unwrap().commit;
    eventually(Duration::from_secs(20), "replica 4 catches up from a snapshot", || async {
        let v = group.view(4).await?;
        (v.replicas.iter().any(|r| r.id == 4 && r.voter) && v.snapshot_index > 0 && v.applied >= commit).then_some(())
    })
    .await;

    // A replica that never comes up stays a learner (it cannot stall the quorum), with a
    // clear error, and can be removed again.
    let nobody = format!("127.0.0.1:{}/127.0.0.1:{}", free_port(), free_port());
    let err = tidalctl(&group.addrs(), &["controller", "add", "--id", "5", "--address", &nobody])
        .expect_err("a replica that is not running cannot be promoted");
    assert!(err.contains("has not caught up"), "{err}");
    let v = group.view(first).await.unwrap();
    assert!(v.replicas.iter().any(|r| r.id == 5 && !r.voter), "replica 5 is a learner");
    tidalctl(&group.addrs(), &["controller", "remove", "--id", "5"]).expect("removing the learner");

    tidalctl(&group.addrs(), &["controller", "wait", "--replica", "4", "--timeout-s", "20"]).expect("replica 4 waits");
    // What a rolling restart does before touching a machine: hand leadership away from it.
    let before = group.leader(Duration::from_secs(10)).await;
    let other = group.ids().into_iter().find(|&id| id != before).unwrap();
    let idle = tidalctl(&group.addrs(), &["controller", "transfer-leader", "--away-from", &other.to_string()]).unwrap();
    assert!(idle.contains("nothing to do"), "{idle}");
    tidalctl(&group.addrs(), &["controller", "transfer-leader", "--away-from", &before.to_string()])
        .expect("handing leadership away");
    let leader = group.leader(Duration::from_secs(10)).await;
    assert_ne!(leader, before);
    tidalctl(&group.addrs(), &["controller", "remove", "--id", &leader.to_string()]).expect("removing the leader");
    let remaining: Vec<u64> = group.ids().into_iter().filter(|&id| id != leader).collect();
    eventually(Duration::from_secs(20), "the others agree on the new membership", || async {
        let v = group.view(remaining[0]).await?;
        let mut voters: Vec<u64> = v.replicas.iter().filter(|r| r.voter).map(|r| r.id).collect();
        voters.sort_unstable();
        (voters == remaining && v.leader != 0 && v.leader != leader).then_some(())
    })
    .await;
    group.stop(leader);
    let written = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > written, "writes go on after the leader left");
    assert!(failed * 5 < ok, "{failed} of {} writes failed", ok + failed);
    let new = group.leader(Duration::from_secs(10)).await;
    // Every replica left, the joined one included unless it was the leader removed.
    for id in group.ids().into_iter().filter(|&id| id != new) {
        same_history(&group, id, new).await;
    }

    // A killed replica is not "caught up", though the leader still remembers how far it got
    // (what a rolling upgrade relies on before it touches the next machine); once it is
    // back, it is.
    let follower = group.ids().into_iter().find(|&id| id != new && id != leader).unwrap();
    group.kill(follower);
    let err = tidalctl(&group.addrs(), &["controller", "wait", "--replica", &follower.to_string(), "--timeout-s", "2"])
        .expect_err("a killed replica is not caught up");
    assert!(err.contains("does not answer"), "{err}");
    group.restart(follower);
    tidalctl(&group.addrs(), &["controller", "wait", "--replica", &follower.to_string(), "--timeout-s", "30"])
        .expect("the restarted replica catches up");
}

/// Random `kill -9`s and restarts (never more than one replica down) while writes go on,
/// with the log compacted every 10 entries: every acknowledged write survives, and the
/// replicas end with the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_random_kills_and_restarts() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let mut group = Group::start(work.path(), 3, &["--interval-s", "2", "--snapshot-entries", "10"]);
    group.leader(Duration::from_secs(20)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = {
        let (stop, acked, addrs) = (stop.clone(), acked.clone(), group.addrs());
        tokio::spawn(async move {
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let name = format!("c{i}");
                let ok = async {
                    let mut c = tidal_tests::group::leader_client(&addrs).await?;
                    let mut t = task(500);
                    t.name = name.clone();
                    c.register_task(RegisterTaskRequest { task: Some(t), ..Default::default() }).await.ok()
                }
                .await
                .is_some();
                if ok {
                    acked.lock().unwrap().push(name);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    // A fixed-seed generator: the same schedule every run.
    let mut seed: u64 = 0x5eed;
    let mut next = move |n: u64| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(700 + next(800))).await;
        let dead: Vec<u64> = group.ids().into_iter().filter(|&id| !group.is_alive(id)).collect();
        match dead.first() {
            Some(&id) => group.restart(id),
            None => group.kill(next(3) + 1),
        }
    }
    for id in group.ids() {
        if !group.is_alive(id) {
            group.restart(id);
        }
    }
    group.leader(Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 50, "only {} writes were acknowledged in 15 s", acked.len());
    let mut leader = tidal_tests::group::leader_client(&group.addrs()).await.expect("a leader");
    let status = leader.status(ClusterStatusRequest {}).await.unwrap().into_inner();
    let present: std::collections::HashSet<String> =
        status.tasks.iter().filter_map(|t| t.spec.as_ref().map(|s| s.name.clone())).collect();
    let lost: Vec<&String> = acked.iter().filter(|n| !present.contains(*n)).collect();
    assert!(lost.is_empty(), "{} acknowledged writes were lost: {lost:?}", lost.len());
    eprintln!("{} writes acknowledged through 6 kills and restarts, none lost", acked.len());
    // Every replica converges on the same log. A replica restarted last may have to catch up
    // by snapshot while the other tests of this binary load the two cores: up to 60 s, and a
    // timeout says what each replica reported last.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut seen = Vec::new();
        for id in group.ids() {
            seen.push((id, group.view(id).await.map(|v| (v.applied, v.commit))));
        }
        let states: Vec<_> = seen.iter().map(|(_, s)| *s).collect();
        if states.iter().all(Option::is_some) && states.windows(2).all(|w| w[0] == w[1]) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replicas did not converge: (id, (applied, commit)) {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    same_history(&group, 1, 2).await;
    same_history(&group, 2, 3).await;
}

/// Sends `signal` (`-STOP`, `-CONT`) to replica `id`.
fn signal(group: &Group, id: u64, signal: &str) {
    let pid = group.pid(id).expect("the replica runs").to_string();
    assert!(Command::new("kill").args([signal, &pid]).status().unwrap().success(), "kill {signal} {pid}");
}

/// Runs tidalctl and asserts it succeeds within `within`.
fn timely(addrs: &str, args: &[&str], within: Duration) -> String {
    let started = std::time::Instant::now();
    let out = tidalctl(addrs, args).unwrap_or_else(|e| panic!("tidalctl {args:?}: {e}"));
    let took = started.elapsed();
    assert!(took < within, "tidalctl {args:?} took {took:?}, more than {within:?}");
    out
}

/// tidalctl asks every address at once and gives each a deadline that covers its TLS and
/// HTTP/2 handshakes and its answer: an address that accepts connections but never answers,
/// and a paused replica (SIGSTOP), follower or leader, cost no more than that deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_finish_in_time_beside_a_paused_replica_and_a_silent_address() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let group = Group::start(work.path(), 3, &["--interval-s", "2"]);
    let leader = group.leader(Duration::from_secs(20)).await;
    group
        .client(leader)
        .await
        .register_task(RegisterTaskRequest { task: Some(task(500)), ..Default::default() })
        .await
        .unwrap();
    // The kernel completes connections to a listener nobody accepts from: it never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let follower = group.ids().into_iter().find(|&id| id != leader).unwrap();
    // The silent address and the paused replica first, where asking one by one would stall.
    let mut addrs = vec![silent.local_addr().unwrap().to_string(), group.addr(follower)];
    addrs.extend(group.ids().into_iter().filter(|&id| id != follower).map(|id| group.addr(id)));
    let addrs = addrs.join(",");

    signal(&group, follower, "-STOP");
    let within = Duration::from_secs(12);
    let list = timely(&addrs, &["controller", "list"], within);
    assert!(list.contains(&format!("leader {leader}")), "{list}");
    timely(&addrs, &["status"], within);
    timely(&addrs, &["task", "set-slo", "--task", "t", "--slo-ms", "400"], within);
    timely(&addrs, &["history", "--limit", "5"], within);
    signal(&group, follower, "-CONT");

    // The leader paused: the others elect another, and writes go on within the leader wait.
    signal(&group, leader, "-STOP");
    // (It commits only under another leader: the paused one cannot reach a quorum.)
    timely(&addrs, &["task", "set-slo", "--task", "t", "--slo-ms", "450"], Duration::from_secs(25));
    signal(&group, leader, "-CONT");
    drop(silent);
}
