//! A group of controller replicas as separate processes, for the high-availability tests
//! and the failover measurements: start, `kill -9`, restart, join, and ask who leads.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tidal_proto::v1::controller_client::ControllerClient;
use tidal_proto::v1::{ListReplicasRequest, ReplicaList};
use tonic::transport::Channel;

use crate::{bin, free_port, spawn, Proc};

pub struct Replica {
    pub id: u64,
    /// The API port.
    pub addr: String,
    /// The Raft peer port.
    pub peer: String,
    pub data: PathBuf,
    /// None while killed.
    pub proc: Option<Proc>,
    /// Where it serves its Prometheus metrics, if asked to.
    pub metrics: Option<String>,
    /// Started with --join (not a bootstrap member).
    joined: bool,
    /// Prefix to run it with, e.g. `ip netns exec <ns>`.
    wrapper: Vec<String>,
}

pub struct Group {
    work: PathBuf,
    pub replicas: Vec<Replica>,
    args: Vec<String>,
}

/// How each replica is reached: loopback ports, or given addresses (e.g. in namespaces).
pub struct Placement {
    pub addr: String,
    pub peer: String,
    pub wrapper: Vec<String>,
}

impl Placement {
    /// Two free loopback ports.
    pub fn loopback() -> Self {
        let port = || format!("127.0.0.1:{}", free_port());
        Self { addr: port(), peer: port(), wrapper: vec![] }
    }
}

/// How many times a group's first start is tried on fresh ports. A port [`free_port`] found
/// free can still be bound by another process before the replica binds it (a test process
/// beside this one probes the same range); the replicas must know each other's ports before
/// they start, so they cannot listen on port 0 and report it.
const FIRST_START_TRIES: usize = 5;

impl Group {
    /// Starts `n` bootstrap replicas on loopback ports with `args` (adaptation interval,
    /// Raft timing…).
    pub fn start(work: &Path, n: u64, args: &[&str]) -> Self {
        Self::start_fresh(work, args, || (0..n).map(|_| (Placement::loopback(), None)).collect(), true)
    }

    /// Starts replicas at given addresses (e.g. in namespaces): no second try on other ports.
    pub fn start_placed(work: &Path, placements: Vec<Placement>, args: &[&str]) -> Self {
        let mut placements = Some(placements);
        let take = || placements.take().expect("placed once").into_iter().map(|p| (p, None)).collect();
        Self::start_fresh(work, args, take, false)
    }

    /// Starts `n` bootstrap replicas on loopback ports, each serving its metrics too.
    pub fn start_with_metrics(work: &Path, n: u64, args: &[&str]) -> Self {
        let place = || (0..n).map(|_| (Placement::loopback(), Some(format!("127.0.0.1:{}", free_port())))).collect();
        Self::start_fresh(work, args, place, true)
    }

    /// Launches every replica and waits until each has bound its ports. When one finds a
    /// port taken, and `retry` allows, the whole group starts again on new ports with empty
    /// stores (the others' `--peers` named the taken port).
    fn start_fresh(
        work: &Path,
        args: &[&str],
        mut place: impl FnMut() -> Vec<(Placement, Option<String>)>,
        retry: bool,
    ) -> Self {
        for attempt in 1..=FIRST_START_TRIES {
            let mut group = Self {
                work: work.to_path_buf(),
                replicas: Vec::new(),
                args: args.iter().map(|s| s.to_string()).collect(),
            };
            for (i, (p, metrics)) in place().into_iter().enumerate() {
                let id = i as u64 + 1;
                group.replicas.push(Replica {
                    id,
                    addr: p.addr,
                    peer: p.peer,
                    data: work.join(format!("controller-{id}")),
                    proc: None,
                    metrics,
                    joined: false,
                    wrapper: p.wrapper,
                });
            }
            for id in group.ids() {
                group.launch(id);
            }
            match group.bound() {
                Ok(()) => return group,
                Err(e) if retry && attempt < FIRST_START_TRIES && e.contains("Address already in use") => {
                    eprintln!(
                        "a replica's port was taken before it bound it; starting the group again on other ports:\n{e}"
                    );
                    let dirs: Vec<PathBuf> = group.replicas.iter().map(|r| r.data.clone()).collect();
                    drop(group);
                    for dir in dirs {
                        let _ = std::fs::remove_dir_all(dir);
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!("the last try returns or panics")
    }

    /// Waits until every live replica has written its ready file (bound its ports).
    fn bound(&mut self) -> Result<(), String> {
        let work = self.work.clone();
        for r in &mut self.replicas {
            if let Some(proc) = r.proc.as_mut() {
                let log = work.join(format!("controller-{}.log", r.id));
                crate::try_read_ready_file(&ready_file(&work, r.id), proc, &log)?;
            }
        }
        Ok(())
    }

    /// The process id of replica `id`, while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.replica(id).proc.as_ref().map(|p| p.child.id())
    }

    fn replica(&self, id: u64) -> &Replica {
        self.replicas.iter().find(|r| r.id == id).unwrap_or_else(|| panic!("no replica {id}"))
    }

    fn replica_mut(&mut self, id: u64) -> &mut Replica {
        self.replicas.iter_mut().find(|r| r.id == id).unwrap_or_else(|| panic!("no replica {id}"))
    }

    fn launch(&mut self, id: u64) {
        // --peers as the group is now: every replica's current addresses.
        let peers: Vec<String> = self.replicas.iter().map(|r| format!("{}={}/{}", r.id, r.addr, r.peer)).collect();
        let (work, peers, args) = (self.work.clone(), peers.join(","), self.args.clone());
        let r = self.replica_mut(id);
        let mut cmd = match r.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin("tidal-controller"));
                c
            }
            None => Command::new(bin("tidal-controller")),
        };
        cmd.args(["--id", &id.to_string(), "--listen", &r.addr, "--peer-listen", &r.peer, "--peers", &peers])
            .arg("--data-dir")
            .arg(&r.data)
            .arg("--ready-file")
            .arg(ready_file(&work, id));
        if r.joined {
            cmd.arg("--join");
        }
        if let Some(metrics) = &r.metrics {
            cmd.args(["--metrics-listen", metrics]);
        }
        cmd.args(&args);
        let host = r.addr.rsplit_once(':').map_or("", |(h, _)| h).to_string();
        crate::as_daemon(&mut cmd, &tidal_auth::Role::Controller(id), &host);
        let log = work.join(format!("controller-{id}.log"));
        // Append, so that a restart keeps the earlier run's log.
        r.proc = Some(spawn(&format!("controller-{id}"), cmd, &log));
    }

    /// Comma-separated addresses of every replica (live or not).
    pub fn addrs(&self) -> String {
        self.replicas.iter().map(|r| r.addr.as_str()).collect::<Vec<_>>().join(",")
    }

    pub fn addr(&self, id: u64) -> String {
        self.replica(id).addr.clone()
    }

    pub fn ids(&self) -> Vec<u64> {
        self.replicas.iter().map(|r| r.id).collect()
    }

    pub fn is_alive(&self, id: u64) -> bool {
        self.replica(id).proc.is_some()
    }

    /// `kill -9`: no shutdown, no flush beyond what was already made durable.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut p) = self.replica_mut(id).proc.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
            std::mem::forget(p);
        }
    }

    /// SIGTERM, as systemd stops a unit; waits up to 10 s for the exit.
    pub fn terminate(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        let mut p = self.replica_mut(id).proc.take()?;
        let _ = Command::new("kill").args(["-TERM", &p.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            match p.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                _ if Instant::now() > deadline => break None,
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        if status.is_none() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        std::mem::forget(p);
        status
    }

    pub fn restart(&mut self, id: u64) {
        assert!(!self.is_alive(id), "replica {id} is running");
        self.launch(id);
    }

    /// Starts a new, empty replica that waits to be added (`tidal-controller --join`); its
    /// addresses as `tidalctl controller add --address` takes them (API/PEER).
    pub fn start_joining(&mut self, id: u64) -> String {
        let Placement { addr, peer, .. } = Placement::loopback();
        self.replicas.push(Replica {
            id,
            addr: addr.clone(),
            peer: peer.clone(),
            data: self.work.join(format!("controller-{id}")),
            proc: None,
            metrics: None,
            joined: true,
            wrapper: vec![],
        });
        self.launch(id);
        format!("{addr}/{peer}")
    }

    /// Stops a replica for good and forgets it.
    pub fn stop(&mut self, id: u64) {
        self.replicas.retain(|r| r.id != id);
    }

    /// The group as replica `id` sees it (None if it does not answer within a second).
    pub async fn view(&self, id: u64) -> Option<ReplicaList> {
        list(&self.replica(id).addr).await
    }

    /// Waits until a live replica claims leadership and every other live replica that
    /// answers agrees; returns its id.
    pub async fn leader(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(id) = self.agreed_leader().await {
                return id;
            }
            if Instant::now() >= deadline {
                panic!("no leader agreed on within {timeout:?}\n{}", self.describe().await);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Each replica's view of the group and the end of its log, for a failure's message.
    pub async fn describe(&self) -> String {
        let mut out = String::new();
        for r in &self.replicas {
            let view = match (&r.proc, list(&r.addr).await) {
                (None, _) => "killed".to_string(),
                (Some(_), None) => "no answer within a second".to_string(),
                (Some(_), Some(v)) => format!(
                    "leader {} term {} commit {} applied {} voters {:?}",
                    v.leader,
                    v.term,
                    v.commit,
                    v.applied,
                    v.replicas.iter().filter(|x| x.voter).map(|x| x.id).collect::<Vec<_>>()
                ),
            };
            let log = std::fs::read_to_string(self.work.join(format!("controller-{}.log", r.id))).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            // Where it failed, if it did: the error or panic before its backtrace.
            let failed = lines.iter().position(|l| l.contains("panicked at") || l.starts_with("Error:"));
            if let Some(at) = failed {
                let why = lines[at..].iter().take_while(|l| !l.contains("backtrace")).take(8);
                out.push_str(&format!(
                    "replica {} failed:\n    {}\n",
                    r.id,
                    why.copied().collect::<Vec<_>>().join("\n    ")
                ));
            }
            let tail: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.contains(" INFO ") || l.contains(" WARN ") || l.contains("ERROR"))
                .collect();
            let tail = tail[tail.len().saturating_sub(20)..].join("\n    ");
            out.push_str(&format!("replica {}: {view}\n  log tail:\n    {tail}\n", r.id));
        }
        out
    }

    /// The leader, if a live replica leads and the live replicas that answer agree.
    pub async fn agreed_leader(&self) -> Option<u64> {
        let mut views = Vec::new();
        for r in self.replicas.iter().filter(|r| r.proc.is_some()) {
            if let Some(v) = list(&r.addr).await {
                views.push(v);
            }
        }
        let leader = views.iter().find(|v| v.leader == v.answered_by && v.leader != 0)?.leader;
        views.iter().all(|v| v.leader == leader).then_some(leader)
    }

    /// A client of replica `id`.
    pub async fn client(&self, id: u64) -> ControllerClient<Channel> {
        crate::controller_client(&self.replica(id).addr).await
    }
}

/// ListReplicas on one address, with a short deadline.
pub async fn list(addr: &str) -> Option<ReplicaList> {
    let endpoint = crate::tls::endpoint(addr, crate::tls::Client::Admin);
    let channel = endpoint.connect_timeout(Duration::from_millis(300)).timeout(Duration::from_secs(1));
    let channel = tokio::time::timeout(Duration::from_secs(1), channel.connect()).await.ok()?.ok()?;
    Some(ControllerClient::new(channel).list_replicas(ListReplicasRequest {}).await.ok()?.into_inner())
}

/// A client of the leader, found through any of the comma-separated `addrs`.
pub async fn leader_client(addrs: &str) -> Option<ControllerClient<Channel>> {
    for addr in addrs.split(',') {
        if let Some(v) = list(addr).await.filter(|v| !v.leader_address.is_empty()) {
            let endpoint = crate::tls::endpoint(&v.leader_address, crate::tls::Client::Admin);
            let channel = endpoint.connect_timeout(Duration::from_millis(300)).timeout(Duration::from_secs(6));
            return Some(ControllerClient::new(channel.connect().await.ok()?));
        }
    }
    None
}

/// Runs `tidalctl` with `args` against `controllers`; its stdout, or its stderr as the error.
pub fn tidalctl(controllers: &str, args: &[&str]) -> Result<String, String> {
    let out = crate::as_admin(&mut Command::new(bin("tidalctl")))
        .env("RUST_BACKTRACE", "0")
        .args(["--controller", controllers])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// Where replica `id` says it has bound its ports.
fn ready_file(work: &Path, id: u64) -> PathBuf {
    work.join(format!("controller-{id}.ready"))
}
