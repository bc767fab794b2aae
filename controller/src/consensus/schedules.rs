//! Consensus tested deterministically. Three replicas' Raft drivers, each over its real sled
//! store, are driven on one thread, one tick a step, over a simulated network that drops,
//! delays (and so reorders), duplicates and partitions messages (one-way partitions too);
//! replicas crash (the driver dropped between two turns, as kill -9 leaves the store) and come
//! back from their stores; a store's flushes fail for a while (a full disk). Clients write and
//! read through whichever replica they reach, with the calls the service makes.
//!
//! Each seed is one schedule: a chaos phase, then everything healed. Checked throughout and at
//! the end:
//! - election safety: at most one leader per term;
//! - state machine safety: every replica's state at a log index is the same, before and after
//!   crashes (so committed entries are never lost or changed);
//! - durability: every acknowledged write is in every replica's final state;
//! - linearizability of the client history, for its model (a set that grows: each write adds a
//!   unique task, a read returns them all): reads form a chain, a read after another sees all
//!   it saw, a read sees every write acknowledged before it began and none begun after it ended;
//! - liveness: once healed, the group elects one leader that all follow and commits a new write
//!   everywhere within [`HEAL_STEPS`].
//!
//! `TIDAL_RAFT_SCHEDULES` sets how many seeds run (default [`DEFAULT_SCHEDULES`]);
//! `TIDAL_RAFT_SEED` runs one, to replay a failure.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use raft::prelude::{Message, MessageType};
use raft::StateRole;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tidal_proto::v1::{command::Change, Command, VariantSpec};
use tokio::sync::oneshot;

use super::{open_store, Driver, Feedback, Input, ProposeError, RaftConfig};
use crate::state::ClusterState;
use crate::transport::{AddressBook, Dropped, Network};

const REPLICAS: u64 = 3;
/// Steps of faults: 30 s at the controller's 50 ms tick.
const CHAOS_STEPS: u64 = 600;
/// Steps a healed group has to elect a leader and commit a write everywhere: 20 s, about
/// twenty election timeouts.
const HEAL_STEPS: u64 = 400;
/// Steps a client waits for an answer (the service's 5 s).
const CLIENT_TIMEOUT: u64 = 100;
const DEFAULT_SCHEDULES: u64 = 1000;
/// The controller's default.
const ELECTION_TICKS: usize = 8;

/// How one schedule's faults are drawn: each seed draws its own rates.
struct Weather {
    drop: f64,
    duplicate: f64,
    max_delay: u64,
    crash: f64,
    partition: f64,
    disk: f64,
}

impl Weather {
    fn draw(rng: &mut ChaCha8Rng) -> Self {
        Self {
            drop: rng.gen_range(0.0..0.3),
            duplicate: rng.gen_range(0.0..0.1),
            max_delay: rng.gen_range(0..=6),
            crash: rng.gen_range(0.0..0.02),
            partition: rng.gen_range(0.0..0.02),
            disk: rng.gen_range(0.0..0.01),
        }
    }

    fn calm() -> Self {
        Self { drop: 0.0, duplicate: 0.0, max_delay: 1, crash: 0.0, partition: 0.0, disk: 0.0 }
    }
}

/// The network: messages in flight, each due at a step.
#[derive(Clone, Default)]
struct Outbox(Arc<Mutex<Vec<Message>>>);

impl Network for Outbox {
    fn send(&mut self, messages: Vec<Message>) -> Vec<Dropped> {
        self.0.lock().unwrap().extend(messages);
        Vec::new()
    }
}

struct Live {
    driver: Driver,
    state: Arc<RwLock<ClusterState>>,
    outbox: Outbox,
}

struct Replica {
    id: u64,
    seed: u64,
    dir: PathBuf,
    /// (term, role, leader) as last seen, and how often it changed: what this replica's
    /// election timeouts are drawn from.
    seen: (u64, StateRole, u64),
    changes: u64,
    /// None while crashed.
    live: Option<Live>,
    /// Its disk: while set, flushes fail.
    failing: Arc<AtomicBool>,
}

impl Replica {
    fn boot(&mut self) {
        let cfg = config(self.id);
        let (mut log, state) = open_store(&cfg, &self.dir).expect("a store reopens after a crash");
        log.failing = self.failing.clone();
        let outbox = Outbox::default();
        let (driver, state, _status) = Driver::new(&cfg, log, state, Box::new(outbox.clone())).unwrap();
        self.live = Some(Live { driver, state, outbox });
        self.changes += 1;
        self.pin_timeout();
    }

    /// raft-rs draws each election timeout from the thread's random numbers when it resets
    /// (a new term, role or leader): the schedule replaces it with one drawn from the seed, the
    /// replica and how many such changes it has been through, so that a seed replays exactly.
    fn pin_timeout(&mut self) {
        let Some(l) = self.live.as_mut() else { return };
        let raft = &mut l.driver.node.raft;
        let now = (raft.term, raft.state, raft.leader_id);
        if now != self.seen {
            self.seen = now;
            self.changes += 1;
        }
        // raft-rs's own range: [election, 2 × election) ticks.
        let low = ELECTION_TICKS as u64;
        let high = 2 * low;
        let mut draw =
            ChaCha8Rng::seed_from_u64(self.seed ^ (self.id << 56) ^ self.changes.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        raft.set_randomized_election_timeout(draw.gen_range(low..high) as usize);
    }

    fn leads(&self) -> bool {
        self.live
            .as_ref()
            .is_some_and(|l| l.driver.node.raft.state == StateRole::Leader && l.driver.suspended.is_none())
    }
}

fn config(id: u64) -> RaftConfig {
    RaftConfig {
        id,
        voters: (1..=REPLICAS).collect(),
        peers: AddressBook::new((1..=REPLICAS).map(|i| (i, format!("127.0.0.{i}:1/127.0.0.{i}:2")))),
        security: tidal_auth::Security::plaintext(),
        tick: Duration::from_millis(50),
        election_ticks: ELECTION_TICKS,
        heartbeat_ticks: 2,
        // Compaction often, so that snapshots are sent and installed.
        snapshot_entries: 6,
        accept_unverified_store: false,
    }
}

fn write(key: &str) -> Command {
    let variant = VariantSpec {
        name: "v".into(),
        model_file: "v.onnx".into(),
        accuracy: 70.0,
        input_shape: vec![3],
        tensor_names: Default::default(),
        tokenizer_file: String::new(),
        io: None,
        model_sha256: String::new(),
    };
    Command { change: Some(Change::RegisterTask(tidal_common::task::single_stage(key, 100, vec![variant]))) }
}

enum Call {
    Write(String),
    Read { at: u64 },
}

struct Pending {
    call: Call,
    invoked: u64,
    answer: oneshot::Receiver<Result<(), ProposeError>>,
}

struct WriteOp {
    key: String,
    invoked: u64,
    /// When it was acknowledged; None if it failed or was given up (it may or may not have
    /// taken effect).
    acked: Option<u64>,
}

struct ReadOp {
    invoked: u64,
    completed: u64,
    seen: BTreeSet<String>,
}

#[derive(Default)]
struct Stats {
    steps: u64,
    writes_acked: u64,
    reads: u64,
    crashes: u64,
    partitions: u64,
    disk_failures: u64,
    max_term: u64,
    snapshots_sent: u64,
    heal_steps: u64,
}

struct Schedule {
    seed: u64,
    rng: ChaCha8Rng,
    weather: Weather,
    replicas: Vec<Replica>,
    /// (due step, message).
    in_flight: Vec<(u64, Message)>,
    /// Directed links that drop everything: (from, to).
    cut: BTreeSet<(u64, u64)>,
    step: u64,
    pending: Vec<Pending>,
    writes: Vec<WriteOp>,
    reads: Vec<ReadOp>,
    next_key: u64,
    leaders: BTreeMap<u64, u64>,
    /// The state at each applied index, as the first replica to reach it had it.
    states: HashMap<u64, Vec<String>>,
    last_seen: HashMap<u64, u64>,
    stats: Stats,
    _dirs: tempfile::TempDir,
}

type Violation = String;

impl Schedule {
    fn new(seed: u64) -> Self {
        // tmpfs where there is one: the stores are real, their fsyncs need not be.
        let dirs = tempfile::Builder::new()
            .prefix("raft-schedule")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let mut replicas: Vec<Replica> = (1..=REPLICAS)
            .map(|id| Replica {
                id,
                seed,
                dir: dirs.path().join(id.to_string()),
                seen: (0, StateRole::Follower, 0),
                changes: 0,
                live: None,
                failing: Default::default(),
            })
            .collect();
        for r in &mut replicas {
            r.boot();
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let weather = Weather::draw(&mut rng);
        Self {
            seed,
            rng,
            weather,
            replicas,
            in_flight: Vec::new(),
            cut: BTreeSet::new(),
            step: 0,
            pending: Vec::new(),
            writes: Vec::new(),
            reads: Vec::new(),
            next_key: 0,
            leaders: BTreeMap::new(),
            states: HashMap::new(),
            last_seen: HashMap::new(),
            stats: Stats::default(),
            _dirs: dirs,
        }
    }

    fn replica(&mut self, id: u64) -> &mut Replica {
        &mut self.replicas[(id - 1) as usize]
    }

    fn run(mut self) -> Result<Stats, Violation> {
        for _ in 0..CHAOS_STEPS {
            self.faults();
            self.clients();
            self.advance()?;
        }
        self.heal();
        let healed = self.step;
        // A write through the agreed leader, asked again until one is acknowledged.
        let mut probe: Option<String> = None;
        loop {
            let acked = |s: &Self, k: &String| s.writes.iter().any(|w| &w.key == k && w.acked.is_some());
            if let Some(key) = probe.as_ref().filter(|k| acked(&self, k)) {
                let everywhere = self
                    .replicas
                    .iter()
                    .all(|r| r.live.as_ref().is_some_and(|l| l.state.read().unwrap().tasks.contains_key(key)));
                if everywhere {
                    break;
                }
            }
            if self.step - healed > HEAL_STEPS {
                let leaders: Vec<Option<u64>> =
                    self.replicas.iter().map(|r| r.live.as_ref().map(|l| l.driver.node.raft.leader_id)).collect();
                return Err(format!(
                    "seed {}: not live: {HEAL_STEPS} steps after healing no write is committed everywhere \
                     (each replica's leader: {leaders:?})",
                    self.seed
                ));
            }
            let asked = |s: &Self, k: &String| s.pending.iter().any(|p| matches!(&p.call, Call::Write(w) if w == k));
            let open = probe.as_ref().is_some_and(|k| acked(&self, k) || asked(&self, k));
            if !open {
                if let Some(leader) = self.agreed_leader() {
                    probe = Some(self.invoke_write(leader));
                }
            }
            self.advance()?;
        }
        self.stats.heal_steps = self.step - healed;
        // Answers still owed are given up: their writes may or may not have taken effect.
        self.pending.clear();
        self.check_final()?;
        self.check_history()?;
        self.stats.steps = self.step;
        self.stats.max_term = self.leaders.keys().max().copied().unwrap_or(0);
        Ok(self.stats)
    }

    /// The leader every replica follows, if they agree and it leads.
    fn agreed_leader(&self) -> Option<u64> {
        let first = self.replicas[0].live.as_ref()?.driver.node.raft.leader_id;
        let all = self.replicas.iter().all(|r| r.live.as_ref().is_some_and(|l| l.driver.node.raft.leader_id == first));
        (all && first != 0 && self.replicas[(first - 1) as usize].leads()).then_some(first)
    }

    fn faults(&mut self) {
        let w = &self.weather;
        let (crash, partition, disk) = (w.crash, w.partition, w.disk);
        if self.rng.gen_bool(crash) {
            let id = self.rng.gen_range(1..=REPLICAS);
            if self.replica(id).live.take().is_some() {
                tracing::info!(step = self.step, replica = id, "schedule: crash");
                self.stats.crashes += 1;
                // A crashed machine's disk is back with it.
                self.replica(id).failing.store(false, Ordering::Relaxed);
            }
        }
        for i in 0..self.replicas.len() {
            if self.replicas[i].live.is_none() && self.rng.gen_bool(0.05) {
                tracing::info!(step = self.step, replica = i + 1, "schedule: restart");
                self.replicas[i].boot();
            }
        }
        if self.cut.is_empty() && self.rng.gen_bool(partition) {
            for from in 1..=REPLICAS {
                for to in (1..=REPLICAS).filter(|&to| to != from) {
                    if self.rng.gen_bool(0.5) {
                        self.cut.insert((from, to));
                    }
                }
            }
            self.stats.partitions += 1;
            tracing::info!(step = self.step, cut = ?self.cut, "schedule: partition");
        } else if !self.cut.is_empty() && self.rng.gen_bool(0.05) {
            tracing::info!(step = self.step, "schedule: partition healed");
            self.cut.clear();
        }
        if self.rng.gen_bool(disk) {
            let id = self.rng.gen_range(1..=REPLICAS);
            self.replica(id).failing.store(true, Ordering::Relaxed);
            tracing::info!(step = self.step, replica = id, "schedule: disk fails");
            self.stats.disk_failures += 1;
        }
        for r in &self.replicas {
            if r.failing.load(Ordering::Relaxed) && self.rng.gen_bool(0.03) {
                tracing::info!(step = self.step, replica = r.id, "schedule: disk back");
                r.failing.store(false, Ordering::Relaxed);
            }
        }
    }

    fn heal(&mut self) {
        self.weather = Weather::calm();
        self.cut.clear();
        for r in &mut self.replicas {
            r.failing.store(false, Ordering::Relaxed);
            if r.live.is_none() {
                r.boot();
            }
        }
    }

    /// Clients call a replica: mostly the one that leads, as clients following the leader do.
    fn clients(&mut self) {
        let leader = self.replicas.iter().find(|r| r.leads()).map(|r| r.id);
        let target = |rng: &mut ChaCha8Rng| match leader {
            Some(l) if rng.gen_bool(0.8) => l,
            _ => rng.gen_range(1..=REPLICAS),
        };
        if self.rng.gen_bool(0.3) {
            let at = target(&mut self.rng);
            self.invoke_write(at);
        }
        if self.rng.gen_bool(0.2) {
            let at = target(&mut self.rng);
            let (reply, answer) = oneshot::channel();
            if self.deliver(at, Input::ReadIndex { reply }) {
                self.pending.push(Pending { call: Call::Read { at }, invoked: self.step, answer });
            }
        }
    }

    fn invoke_write(&mut self, at: u64) -> String {
        let key = format!("k{}", self.next_key);
        self.next_key += 1;
        let (reply, answer) = oneshot::channel();
        self.writes.push(WriteOp { key: key.clone(), invoked: self.step, acked: None });
        if self.deliver(at, Input::Propose { cmd: Box::new(write(&key)), reply }) {
            self.pending.push(Pending { call: Call::Write(key.clone()), invoked: self.step, answer });
        }
        key
    }

    /// Hands an input to a live replica (false if it is down: the call fails at once).
    fn deliver(&mut self, id: u64, input: Input) -> bool {
        let r = self.replica(id);
        match r.live.as_mut() {
            Some(l) => {
                l.driver.input(input);
                r.pin_timeout();
                true
            }
            None => false,
        }
    }

    /// One step: messages due are delivered, each live replica takes its inputs and a tick in
    /// random order, what they send goes into flight, and everything is checked.
    fn advance(&mut self) -> Result<(), Violation> {
        self.step += 1;
        let mut order: Vec<u64> = (1..=REPLICAS).collect();
        order.shuffle(&mut self.rng);
        for id in order {
            let (due, later): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.in_flight).into_iter().partition(|(at, m)| *at <= self.step && m.to == id);
            self.in_flight = later;
            for (_, m) in due {
                self.receive(m);
            }
            if let Some(l) = self.replica(id).live.as_mut() {
                l.driver.turn(true);
                self.replica(id).pin_timeout();
            }
            self.collect_answers(id);
            self.observe(id)?;
            self.post(id);
        }
        Ok(())
    }

    /// A message arrives, or is lost; the sender hears what the transport would tell it.
    fn receive(&mut self, m: Message) {
        let (from, to) = (m.from, m.to);
        let lost = self.cut.contains(&(from, to)) || self.replica(to).live.is_none();
        let snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
        if !lost {
            self.stats.snapshots_sent += snapshot as u64;
            self.deliver(to, Input::Step(Box::new(m)));
        }
        if lost {
            self.deliver(from, Input::Transport(Feedback::Unreachable(to)));
        }
        if snapshot {
            self.deliver(from, Input::Transport(Feedback::SnapshotSent { to, ok: !lost }));
        }
    }

    /// What a replica sent goes into flight: some lost, some twice, each after a delay.
    fn post(&mut self, id: u64) {
        let Some(l) = self.replica(id).live.as_ref() else { return };
        let sent = std::mem::take(&mut *l.outbox.0.lock().unwrap());
        for m in sent {
            if self.rng.gen_bool(self.weather.drop) && m.get_msg_type() != MessageType::MsgSnapshot {
                continue;
            }
            let copies = if self.rng.gen_bool(self.weather.duplicate) { 2 } else { 1 };
            for _ in 0..copies {
                let at = self.step + self.rng.gen_range(0..=self.weather.max_delay);
                self.in_flight.push((at, m.clone()));
            }
        }
    }

    fn collect_answers(&mut self, id: u64) {
        let now = self.step;
        let mut still = Vec::new();
        for mut p in std::mem::take(&mut self.pending) {
            match p.answer.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) if now - p.invoked < CLIENT_TIMEOUT => still.push(p),
                Ok(Ok(())) => match &p.call {
                    Call::Write(key) => {
                        self.stats.writes_acked += 1;
                        let w = self.writes.iter_mut().find(|w| &w.key == key).unwrap();
                        w.acked = Some(now);
                    }
                    Call::Read { at } => {
                        assert_eq!(*at, id, "a read is answered by the replica asked, during its turn");
                        let seen = self
                            .replica(id)
                            .live
                            .as_ref()
                            .unwrap()
                            .state
                            .read()
                            .unwrap()
                            .tasks
                            .keys()
                            .cloned()
                            .collect();
                        self.stats.reads += 1;
                        self.reads.push(ReadOp { invoked: p.invoked, completed: now, seen });
                    }
                },
                // Failed, or not answered in time: the write may or may not take effect.
                _ => {}
            }
        }
        self.pending = still;
    }

    fn observe(&mut self, id: u64) -> Result<(), Violation> {
        let seed = self.seed;
        let Some(l) = self.replicas[(id - 1) as usize].live.as_ref() else { return Ok(()) };
        let raft = &l.driver.node.raft;
        if raft.state == StateRole::Leader {
            let leader = *self.leaders.entry(raft.term).or_insert(id);
            if leader != id {
                return Err(format!("seed {seed}: two leaders in term {}: {leader} and {id}", raft.term));
            }
        }
        let state = l.state.read().unwrap();
        if self.last_seen.get(&id) == Some(&state.applied_index) {
            return Ok(());
        }
        self.last_seen.insert(id, state.applied_index);
        tracing::debug!(
            step = self.step,
            replica = id,
            index = state.applied_index,
            tasks = state.tasks.len(),
            "schedule: applied"
        );
        let keys: Vec<String> = state.tasks.keys().cloned().collect();
        match self.states.get(&state.applied_index) {
            Some(expected) if *expected != keys => Err(format!(
                "seed {seed}: replica {id} at index {} holds {keys:?}, another held {expected:?} there",
                state.applied_index
            )),
            Some(_) => Ok(()),
            None => {
                self.states.insert(state.applied_index, keys);
                Ok(())
            }
        }
    }

    /// Every replica ends at one state holding every acknowledged write.
    fn check_final(&mut self) -> Result<(), Violation> {
        // A few calm steps so that every replica applies the last commit.
        for _ in 0..40 {
            self.advance()?;
        }
        let finals: Vec<(u64, BTreeSet<String>)> = self
            .replicas
            .iter()
            .map(|r| {
                let s = r.live.as_ref().unwrap().state.read().unwrap();
                (s.applied_index, s.tasks.keys().cloned().collect())
            })
            .collect();
        if finals.iter().any(|f| *f != finals[0]) {
            let indexes: Vec<u64> = finals.iter().map(|f| f.0).collect();
            return Err(format!("seed {}: replicas did not converge (applied {indexes:?})", self.seed));
        }
        for w in self.writes.iter().filter(|w| w.acked.is_some()) {
            if !finals[0].1.contains(&w.key) {
                return Err(format!("seed {}: acknowledged write {} was lost", self.seed, w.key));
            }
        }
        Ok(())
    }

    /// The client history is linearizable as a growing set (see the module's notes).
    fn check_history(&self) -> Result<(), Violation> {
        let seed = self.seed;
        let invoked: HashMap<&str, u64> = self.writes.iter().map(|w| (w.key.as_str(), w.invoked)).collect();
        let mut by_size: Vec<&ReadOp> = self.reads.iter().collect();
        by_size.sort_by_key(|r| r.seen.len());
        for pair in by_size.windows(2) {
            if !pair[0].seen.is_subset(&pair[1].seen) {
                return Err(format!(
                    "seed {seed}: two reads no order explains: {:?} and {:?}",
                    pair[0].seen.difference(&pair[1].seen).collect::<Vec<_>>(),
                    pair[1].seen.difference(&pair[0].seen).collect::<Vec<_>>()
                ));
            }
        }
        for r in &self.reads {
            for key in &r.seen {
                match invoked.get(key.as_str()) {
                    Some(&at) if at <= r.completed => {}
                    _ => {
                        return Err(format!(
                            "seed {seed}: a read ending at step {} saw {key}, not yet written",
                            r.completed
                        ))
                    }
                }
            }
            for w in &self.writes {
                if w.acked.is_some_and(|at| at < r.invoked) && !r.seen.contains(&w.key) {
                    return Err(format!(
                        "seed {seed}: a read from step {} missed {}, acknowledged at step {}",
                        r.invoked,
                        w.key,
                        w.acked.unwrap()
                    ));
                }
            }
        }
        for earlier in &self.reads {
            for later in self.reads.iter().filter(|l| l.invoked > earlier.completed) {
                if !earlier.seen.is_subset(&later.seen) {
                    return Err(format!(
                        "seed {seed}: a read from step {} lost what a read ending at step {} saw",
                        later.invoked, earlier.completed
                    ));
                }
            }
        }
        Ok(())
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn seeded_schedules_of_faults_keep_raft_safe_linearizable_and_live() {
    let seeds: Vec<u64> = match env_u64("TIDAL_RAFT_SEED") {
        Some(seed) => {
            // One schedule replayed: what the drivers say, step by step.
            let _ = tracing_subscriber::fmt()
                .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
                .with_test_writer()
                .try_init();
            vec![seed]
        }
        None => (0..env_u64("TIDAL_RAFT_SCHEDULES").unwrap_or(DEFAULT_SCHEDULES)).collect(),
    };
    let started = Instant::now();
    let mut total = Stats::default();
    let mut heal_max = 0;
    // Schedules are independent and single-threaded: they run on every core, each thread
    // taking every n-th seed (the test was the longest of the unit tests, alone on one core).
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(seeds.len().max(1));
    let runs: Vec<Result<Stats, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let seeds = &seeds;
                scope.spawn(move || {
                    seeds
                        .iter()
                        .skip(t)
                        .step_by(threads)
                        .map(|&seed| {
                            Schedule::new(seed).run().map_err(|v| format!("{v} (replay: TIDAL_RAFT_SEED={seed})"))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a schedule thread panicked")).collect()
    });
    for run in runs {
        let stats = run.unwrap_or_else(|v| panic!("{v}"));
        total.steps += stats.steps;
        total.writes_acked += stats.writes_acked;
        total.reads += stats.reads;
        total.crashes += stats.crashes;
        total.partitions += stats.partitions;
        total.disk_failures += stats.disk_failures;
        total.snapshots_sent += stats.snapshots_sent;
        total.max_term = total.max_term.max(stats.max_term);
        heal_max = heal_max.max(stats.heal_steps);
    }
    eprintln!(
        "{} schedules in {:.1?}: {} steps, {} writes acknowledged, {} reads, {} crashes, {} partitions, \
         {} disk failures, {} snapshots delivered, terms up to {}, recovery after healing at most {} steps",
        seeds.len(),
        started.elapsed(),
        total.steps,
        total.writes_acked,
        total.reads,
        total.crashes,
        total.partitions,
        total.disk_failures,
        total.snapshots_sent,
        total.max_term,
        heal_max
    );
    assert!(total.writes_acked > 0 && total.reads > 0, "the schedules did some work");
}
