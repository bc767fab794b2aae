//! The controller's store under damage, with real processes: a replica whose store was
//! corrupted while it was stopped refuses to start with a clear error and is rebuilt from its
//! peers with nothing acknowledged lost; a replica whose disk fills up steps down, the others
//! carry on, and it rejoins once space returns.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tidal_proto::v1::{ClusterStatusRequest, RegisterTaskRequest, TaskSpec, VariantSpec};
use tidal_tests::group::{leader_client, tidalctl, Group};
use tidal_tests::netns;
use tidal_tests::*;

fn task(name: &str) -> TaskSpec {
    let variant = VariantSpec {
        name: "v".into(),
        model_file: "v.onnx".into(),
        accuracy: 70.0,
        input_shape: vec![3, 8, 8],
        tensor_names: Default::default(),
        tokenizer_file: String::new(),
        io: None,
        model_sha256: String::new(),
    };
    tidal_common::task::single_stage(name, 500, vec![variant])
}

/// Registers `name` through whichever replica leads, retrying through elections; returns once
/// the write is acknowledged.
async fn write(group: &Group, name: &str) {
    eventually(Duration::from_secs(30), &format!("task {name} to be acknowledged"), || async {
        let mut c = leader_client(&group.addrs()).await?;
        c.register_task(RegisterTaskRequest { task: Some(task(name)), ..Default::default() }).await.ok()
    })
    .await;
}

/// The tasks the cluster holds, asked of the leader.
async fn tasks(group: &Group) -> Vec<String> {
    eventually(Duration::from_secs(30), "the cluster's status", || async {
        let mut c = leader_client(&group.addrs()).await?;
        let s = c.status(ClusterStatusRequest {}).await.ok()?.into_inner();
        let mut names: Vec<String> = s.tasks.iter().filter_map(|t| t.spec.as_ref()).map(|t| t.name.clone()).collect();
        names.sort();
        Some(names)
    })
    .await
}

/// Flips one byte of every record of the replica's Raft log, as a disk that went bad would.
fn corrupt_log(data: &Path) {
    let db = sled::open(data).expect("the stopped replica's store opens");
    let log = db.open_tree("raft_log").unwrap();
    let keys: Vec<_> = log.iter().keys().map(|k| k.unwrap()).collect();
    assert!(!keys.is_empty(), "the replica has a log to damage");
    for key in keys {
        let mut record = log.get(&key).unwrap().unwrap().to_vec();
        *record.last_mut().unwrap() ^= 0x5a;
        log.insert(key, record).unwrap();
    }
    db.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_replica_refuses_to_start_and_is_rebuilt_from_its_peers() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let mut group = Group::start(work.path(), 3, &["--interval-s", "3600", "--snapshot-entries", "100000"]);
    let leader = group.leader(Duration::from_secs(30)).await;
    let names: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
    for name in &names {
        write(&group, name).await;
    }
    let victim = group.ids().into_iter().find(|&id| id != leader).unwrap();
    let data = work.path().join(format!("controller-{victim}"));
    group.kill(victim);
    corrupt_log(&data);

    group.restart(victim);
    let exited = eventually(Duration::from_secs(20), "the damaged replica to refuse to start", || {
        let child = &mut group.replicas.iter_mut().find(|r| r.id == victim).unwrap().proc.as_mut().unwrap().child;
        let status = child.try_wait().ok().flatten();
        async move { status }
    })
    .await;
    assert!(!exited.success(), "a damaged store must not start");
    let log = std::fs::read_to_string(work.path().join(format!("controller-{victim}.log"))).unwrap();
    assert!(log.contains("is damaged") && log.contains("checksum"), "a clear error: {log}");
    group.kill(victim);

    // Rebuild: out of the group, an empty directory, back in as a new learner.
    tidalctl(&group.addrs(), &["controller", "remove", "--id", &victim.to_string(), "--keep-certificate"])
        .expect("removing it");
    group.stop(victim);
    std::fs::remove_dir_all(&data).unwrap();
    let address = group.start_joining(victim);
    let added = tidalctl(&group.addrs(), &["controller", "add", "--id", &victim.to_string(), "--address", &address]);
    if let Err(e) = added {
        let logs: Vec<String> = group
            .ids()
            .iter()
            .map(|id| std::fs::read_to_string(work.path().join(format!("controller-{id}.log"))).unwrap_or_default())
            .collect();
        panic!("adding it back: {e}\n{}", logs.join("\n----\n"));
    }
    tidalctl(&group.addrs(), &["controller", "transfer-leader", "--to", &victim.to_string()])
        .expect("the rebuilt replica can lead");
    assert_eq!(group.leader(Duration::from_secs(20)).await, victim);
    assert_eq!(tasks(&group).await, names, "every acknowledged write is on the rebuilt replica");
}

/// A tmpfs of `mib` MiB mounted on `dir` (unmounted on drop).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u32) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let size = format!("size={mib}m");
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &size, "tmpfs"]).arg(dir).status().unwrap();
        assert!(ok.success(), "mounting a tmpfs on {}", dir.display());
        Self(dir.to_path_buf())
    }

    /// Writes zeros until the filesystem is full.
    fn fill(&self) {
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", self.0.join("filler").display()))
            .stderr(std::process::Stdio::null())
            .status();
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_disk_fills_steps_down_and_rejoins_when_space_returns() {
    let _turn = tidal_tests::file_turn(module_path!());
    if !netns::available() {
        eprintln!("skipped: mounting a small filesystem needs root");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    // Replica 1 keeps its store on a small filesystem of its own.
    let disk = Tmpfs::mount(&work.path().join("controller-1"), 32);
    let group = Group::start(work.path(), 3, &["--interval-s", "3600"]);
    group.leader(Duration::from_secs(30)).await;
    tidalctl(&group.addrs(), &["controller", "transfer-leader", "--to", "1"]).expect("replica 1 leads");
    assert_eq!(group.leader(Duration::from_secs(20)).await, 1);
    write(&group, "before").await;

    disk.fill();
    // Writes go on. sled writes into space it holds already until it needs more; then
    // replica 1 cannot make them durable, steps down, and another leads.
    let mut written = vec!["before".to_string()];
    let mut suspended = false;
    for i in 0..200 {
        let name = format!("while-full-{i:03}");
        write(&group, &name).await;
        written.push(name);
        let view = group.view(1).await.expect("the full replica still answers");
        if view.leader == 0 {
            suspended = true; // it knows no leader, and leads no more, while it cannot write
            break;
        }
    }
    assert!(suspended, "replica 1 never met its full disk");
    let leader = eventually(Duration::from_secs(30), "the others to elect a leader", || async {
        let v = group.view(2).await?;
        (v.leader != 0).then_some(v.leader)
    })
    .await;
    assert_ne!(leader, 1, "a replica that cannot write does not lead");
    write(&group, "while-full-after-step-down").await;
    written.push("while-full-after-step-down".into());

    disk.free();
    write(&group, "after").await;
    written.push("after".into());
    let commit = group.view(leader).await.unwrap().commit;
    eventually(Duration::from_secs(30), "replica 1 to rejoin and catch up", || async {
        let v = group.view(1).await?;
        (v.leader != 0 && v.leader != 1 && v.commit >= commit && v.applied >= commit).then_some(())
    })
    .await;
    written.sort();
    assert_eq!(tasks(&group).await, written, "every acknowledged write is there");
}
