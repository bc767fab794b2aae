//! The Raft driver: one OS thread per replica owns the raft-rs `RawNode`. It ticks it, steps
//! in messages from peers, feeds it proposals, membership changes and read requests, persists
//! each Ready in sled before sending the messages that depend on it, applies committed
//! entries to the state machine, and compacts the log into snapshots. Async callers talk to
//! it through a channel and get their answer when their command is applied (or refused).
//!
//! A thread rather than a tokio task, because sled's flush is a blocking fsync and the runtime
//! must not block; the transport's tasks and the callers stay on the runtime.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, Snapshot};
use raft::{Config, RawNode, SnapshotStatus, StateRole, Storage};
use thiserror::Error;
use tidal_proto::v1::{Command, StateSnapshot};
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

#[cfg(test)]
mod schedules;

use crate::logging::slog_to_tracing;
use crate::state::ClusterState;
use crate::storage::{DurableLog, LogView, StorageError};
use crate::transport::{AddressBook, Feedback, FeedbackSink, Network, Outbound, Refused};

#[derive(Debug, Error, Clone, PartialEq)]
pub enum ProposeError {
    /// Refused before it was proposed: nothing was done, and it is safe to send again.
    #[error("this replica is not the leader (leader: {0:?}); nothing was proposed")]
    NotLeader(Option<u64>),
    /// Proposed, and then no answer: it may still commit, or never.
    #[error("the command was proposed but {0}: it may or may not take effect")]
    OutcomeUnknown(String),
    #[error("the command was refused: {0}")]
    Rejected(String),
    #[error("the replica is shutting down")]
    Stopped,
    #[error("no answer within {0:?} (no leader, or the leader lost its majority)")]
    Timeout(Duration),
    #[error("raft: {0}")]
    Raft(String),
    #[error("the Raft driver has {INPUT_QUEUE} inputs queued; try again")]
    Busy,
}

/// What the rest of the controller may read about consensus.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RaftStatus {
    pub id: u64,
    pub term: u64,
    /// 0 while no leader is known.
    pub leader: u64,
    pub is_leader: bool,
    pub commit: u64,
    pub applied: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Per replica, the highest index known replicated there (on the leader only).
    pub matched: Vec<(u64, u64)>,
    /// This replica was removed from the group and no longer takes part.
    pub removed: bool,
}

/// A membership change, proposed on the leader.
#[derive(Debug, Clone, PartialEq)]
pub enum MembershipChange {
    /// A replica that receives the log but does not vote (yet).
    AddLearner {
        id: u64,
        address: String,
    },
    /// A new voter, or a learner promoted.
    Add {
        id: u64,
        address: String,
    },
    Remove {
        id: u64,
    },
}

type Reply = oneshot::Sender<Result<(), ProposeError>>;

/// What the driver thread is asked to do.
pub enum Input {
    Propose {
        cmd: Box<Command>,
        reply: Reply,
    },
    Membership {
        change: MembershipChange,
        reply: Reply,
    },
    TransferLeader {
        to: u64,
        reply: Reply,
    },
    /// Answered once this replica has applied everything committed when it asked.
    ReadIndex {
        reply: Reply,
    },
    Step(Box<Message>),
    Transport(Feedback),
    /// Ends the driver thread (the daemon stops): what is queued behind it is dropped.
    Stop,
}

/// How long a caller waits for a command to be applied or a read to be confirmed.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);
pub const READ_TIMEOUT: Duration = Duration::from_secs(3);
const READ_ATTEMPT: Duration = Duration::from_millis(300);

#[derive(Clone)]
pub struct RaftHandle {
    /// The driver's input queue. Only handles own it: the transport's feedback holds it
    /// weakly, so that when the last handle goes the queue closes and the driver thread ends.
    tx: Arc<mpsc::SyncSender<Input>>,
    pub state: Arc<RwLock<ClusterState>>,
    status: watch::Receiver<RaftStatus>,
    pub peers: AddressBook,
    /// The certificate each peer last spoke Raft with (what removing it revokes).
    pub certificates: crate::transport::SeenCertificates,
    /// How long a call waits for a leader to be known: three of the longest election timeouts.
    election_timeout: Duration,
    /// The driver thread, joined by [`RaftHandle::stop`].
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl RaftHandle {
    /// Stops the driver and waits for its thread to end (every handle then finds it gone).
    pub async fn stop(&self) {
        let tx = self.tx.clone();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let joined = tokio::task::spawn_blocking(move || {
            // Waits for room: the driver drains its queue on every turn.
            let _ = tx.send(Input::Stop);
            thread.map(|t| t.join().is_ok())
        })
        .await;
        if matches!(joined, Ok(Some(false))) {
            error!("the Raft driver thread panicked");
        }
    }

    pub fn status(&self) -> RaftStatus {
        self.status.borrow().clone()
    }

    /// Changes of the status, for whoever must react to gaining or losing leadership.
    pub fn watch(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }

    pub fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        f(&self.state.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The status once a leader is known, waiting for an election under way (a replica just
    /// started, or one that lost its leader, knows none for a while) up to three election timeouts;
    /// the status as it is then if none is known by that time.
    pub async fn known_leader(&self) -> RaftStatus {
        let mut status = self.status.clone();
        let _ = tokio::time::timeout(self.election_timeout, status.wait_for(|s| s.leader != 0)).await;
        self.status()
    }

    /// The API address of the current leader, when one is known.
    pub fn leader_address(&self) -> Option<String> {
        let leader = self.status.borrow().leader;
        (leader != 0).then(|| self.peers.api(leader)).flatten()
    }

    /// Hands `input` to the driver and waits for its answer. Refused at the hand-over, nothing
    /// was done; a write handed over and then not answered (a timeout, a driver that stopped)
    /// may have been proposed: its outcome is unknown.
    async fn ask(
        &self,
        input: impl FnOnce(Reply) -> Input,
        timeout: Duration,
        write: bool,
    ) -> Result<(), ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx.try_send(input(reply)).map_err(refused)?;
        let unanswered = |e: ProposeError, why: String| if write { ProposeError::OutcomeUnknown(why) } else { e };
        match tokio::time::timeout(timeout, rx).await {
            Ok(answer) => answer
                .map_err(|_| unanswered(ProposeError::Stopped, "the replica stopped before it answered".into()))?,
            Err(_) => Err(unanswered(ProposeError::Timeout(timeout), format!("no answer came within {timeout:?}"))),
        }
    }

    /// Proposes a command and waits until it is applied.
    pub async fn propose(&self, cmd: Command) -> Result<(), ProposeError> {
        self.ask(|reply| Input::Propose { cmd: Box::new(cmd), reply }, PROPOSE_TIMEOUT, true).await
    }

    pub async fn change_membership(&self, change: MembershipChange) -> Result<(), ProposeError> {
        self.ask(|reply| Input::Membership { change, reply }, PROPOSE_TIMEOUT, true).await
    }

    /// Whether the Raft driver still runs.
    pub fn is_running(&self) -> bool {
        self.status.has_changed().is_ok()
    }

    /// If this replica leads, hands leadership to the most caught-up other voter and waits,
    /// up to `within`, until it no longer leads (a replica about to stop spares the group an
    /// election timeout). Returns the voter chosen.
    pub async fn step_down(&self, within: Duration) -> Option<u64> {
        let status = self.status();
        if !status.is_leader {
            return None;
        }
        let matched = |id: u64| status.matched.iter().find(|(r, _)| *r == id).map_or(0, |(_, m)| *m);
        let to = status.voters.iter().copied().filter(|&v| v != status.id).max_by_key(|&v| matched(v))?;
        self.transfer_leader(to).await.ok()?;
        let deadline = tokio::time::Instant::now() + within;
        while self.status().is_leader && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Some(to)
    }

    /// Asks the leader to hand leadership to `to` (answers once the transfer has started).
    pub async fn transfer_leader(&self, to: u64) -> Result<(), ProposeError> {
        self.ask(|reply| Input::TransferLeader { to, reply }, PROPOSE_TIMEOUT, false).await
    }

    /// Waits until this replica's state reflects every command committed before the call
    /// (Raft's read index), so that a read that follows is linearizable on any replica.
    /// raft-rs drops a read request while no leader is known or the leader has not yet
    /// committed in its term, so a request unanswered for a while is sent again.
    pub async fn read_index(&self) -> Result<(), ProposeError> {
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        loop {
            match self.ask(|reply| Input::ReadIndex { reply }, READ_ATTEMPT, false).await {
                Err(ProposeError::Timeout(_)) if tokio::time::Instant::now() < deadline => continue,
                Err(ProposeError::Timeout(_)) => return Err(ProposeError::Timeout(READ_TIMEOUT)),
                other => return other,
            }
        }
    }

    /// Hands a message from a peer to the driver.
    pub fn step(&self, m: Message) -> Result<(), ProposeError> {
        self.tx.try_send(Input::Step(Box::new(m))).map_err(refused)
    }
}

pub struct RaftConfig {
    pub id: u64,
    /// The voters a fresh store is bootstrapped with; empty to join an existing group.
    pub voters: Vec<u64>,
    /// Addresses of the replicas known from the configuration (this one's included).
    pub peers: AddressBook,
    /// How Raft messages go to the peers.
    pub security: tidal_auth::Security,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Applied entries beyond the last snapshot that trigger a new one (log compaction).
    pub snapshot_entries: u64,
    /// Start a store with Raft state but no watermark to check it against (warning).
    pub accept_unverified_store: bool,
}

/// Opens the durable log in `dir` and starts the driver thread. Must be called within a
/// tokio runtime (the transport's tasks run on it).
pub fn start(cfg: RaftConfig, dir: &Path) -> Result<RaftHandle, StorageError> {
    let (log, state) = open_store(&cfg, dir)?;
    let (tx, rx) = mpsc::sync_channel(INPUT_QUEUE);
    let tx = Arc::new(tx);
    let feedback_tx = Arc::downgrade(&tx);
    let feedback: FeedbackSink = Arc::new(move |f| {
        let Some(tx) = feedback_tx.upgrade() else { return Err(Refused::Closed) };
        match tx.try_send(Input::Transport(f)) {
            Ok(()) => Ok(()),
            Err(mpsc::TrySendError::Full(Input::Transport(f))) => Err(Refused::Full(f)),
            Err(_) => Err(Refused::Closed),
        }
    });
    let outbound = Outbound::new(
        cfg.id,
        cfg.peers.get(cfg.id).unwrap_or_default(),
        cfg.peers.clone(),
        cfg.security.clone(),
        tokio::runtime::Handle::current(),
        feedback,
    );
    let (mut driver, state, status) = Driver::new(&cfg, log, state, Box::new(outbound))?;
    let thread = std::thread::Builder::new()
        .name(format!("raft-{}", cfg.id))
        .spawn(move || {
            let tick = cfg.tick;
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| driver.run(rx, tick))).is_err() {
                // raft-rs panics on a log it cannot trust (a damaged store); a replica without
                // its driver only looks alive, so it exits and its service manager sees it.
                error!("the Raft driver panicked: exiting (status 70) rather than serve without consensus");
                std::process::exit(70);
            }
        })
        .map_err(|e| StorageError::Raft(raft::Error::Io(e)))?;
    let thread = Arc::new(std::sync::Mutex::new(Some(thread)));
    // raft-rs draws each election timeout from [election, 2 × election) ticks; a caller waits
    // out an election and up to two more should votes split.
    let election_timeout = cfg.tick.saturating_mul(3 * 2 * cfg.election_ticks as u32);
    Ok(RaftHandle { tx, state, status, peers: cfg.peers, certificates: Default::default(), election_timeout, thread })
}

/// Opens the durable log and rebuilds the state machine from its snapshot (the entries after
/// it are applied again as raft-rs hands them over); the replicas' addresses the snapshot
/// holds join the address book.
fn open_store(cfg: &RaftConfig, dir: &Path) -> Result<(DurableLog, ClusterState), StorageError> {
    let log = DurableLog::open_with(dir, &cfg.voters, cfg.accept_unverified_store)?;
    log.claim(cfg.id)?;
    let state = state_from(&log.snapshot())?;
    for (id, address) in &state.replicas {
        cfg.peers.set(*id, address);
    }
    Ok((log, state))
}

/// The state machine as a stored snapshot holds it (empty for a store that has none).
fn state_from(snapshot: &Snapshot) -> Result<ClusterState, StorageError> {
    if snapshot.data.is_empty() {
        return Ok(ClusterState::default());
    }
    let data =
        StateSnapshot::decode(snapshot.data.as_ref()).map_err(|e| StorageError::CorruptSnapshot(e.to_string()))?;
    Ok(ClusterState::from_snapshot(data))
}

/// Proposal ids start from the clock so that entries replayed from an earlier run never
/// match a new proposal.
fn seed_id() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
}

/// What a suspended replica answers: no leader here, nothing stepped.
fn refuse(input: Input) {
    let reply = match input {
        Input::Propose { reply, .. }
        | Input::Membership { reply, .. }
        | Input::TransferLeader { reply, .. }
        | Input::ReadIndex { reply } => reply,
        Input::Step(_) | Input::Transport(_) | Input::Stop => return,
    };
    let _ = reply.send(Err(ProposeError::NotLeader(None)));
}

/// Inputs handled before each Ready: proposals that arrive together share one fsync.
const MAX_INPUTS_PER_READY: usize = 256;

/// Inputs that may wait for the Raft driver (calls, peers' messages, transport feedback):
/// about sixteen of its loops' worth. Beyond it a call is refused as busy (UNAVAILABLE) and a
/// peer's message is refused (the peer backs off and Raft sends again), rather than memory
/// growing while the driver falls behind.
pub const INPUT_QUEUE: usize = 16 * MAX_INPUTS_PER_READY;

/// Why an input could not be queued.
fn refused<T>(e: mpsc::TrySendError<T>) -> ProposeError {
    match e {
        mpsc::TrySendError::Full(_) => ProposeError::Busy,
        mpsc::TrySendError::Disconnected(_) => ProposeError::Stopped,
    }
}

/// The state machine, written by the driver alone and read by everyone.
type SharedState = Arc<RwLock<ClusterState>>;

struct Driver {
    node: RawNode<LogView>,
    log: DurableLog,
    state: Arc<RwLock<ClusterState>>,
    status: watch::Sender<RaftStatus>,
    peers: AddressBook,
    network: Box<dyn Network>,
    conf_state: ConfState,
    /// Proposal id → whoever waits for it to be applied.
    pending: HashMap<u64, Reply>,
    /// Read-index context → whoever waits for the read index.
    reads: HashMap<Vec<u8>, Reply>,
    /// (read index, reply) waiting for this replica to apply up to the index.
    waiting_reads: Vec<(u64, Reply)>,
    /// Contexts of reads held back until this new leader commits in its term.
    deferred_reads: Vec<Vec<u8>>,
    next_id: u64,
    snapshot_entries: u64,
    removed: bool,
    /// How the node was made, to make it again from the store after a storage failure.
    raft_cfg: Config,
    logger: slog::Logger,
    /// The store failed: this replica takes no part until a write goes through again (the
    /// ticks since).
    suspended: Option<u64>,
    /// Ticks between probes of a failed store.
    probe_ticks: u64,
    /// A learner was added: snapshot at once, so that it starts from a snapshot holding the
    /// membership (the bootstrap voters are in no log entry) rather than from the first entry.
    compact_soon: bool,
}

/// How often a suspended replica tries its store again.
const STORAGE_PROBE: Duration = Duration::from_secs(1);

impl Driver {
    /// A driver over an opened store; nothing runs until it is driven ([`Driver::run`] on
    /// its thread, or a test's schedule). Returns the state and status it publishes.
    fn new(
        cfg: &RaftConfig,
        log: DurableLog,
        state: ClusterState,
        network: Box<dyn Network>,
    ) -> Result<(Self, SharedState, watch::Receiver<RaftStatus>), StorageError> {
        let raft_cfg = Config {
            id: cfg.id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied: log.snapshot_index(),
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        raft_cfg.validate()?;
        let logger = slog_to_tracing();
        let conf_state = log.conf_state();
        let mut node = RawNode::new(&raft_cfg, log.view.clone(), &logger)?;
        if conf_state.voters == [cfg.id] && conf_state.learners.is_empty() {
            // A single voter need not wait an election timeout to lead.
            node.campaign()?;
        }
        let state = Arc::new(RwLock::new(state));
        let (status, status_rx) = watch::channel(RaftStatus { id: cfg.id, ..Default::default() });
        let tick = cfg.tick.max(Duration::from_millis(1));
        let driver = Driver {
            node,
            log,
            state: state.clone(),
            status,
            peers: cfg.peers.clone(),
            network,
            conf_state,
            pending: HashMap::new(),
            reads: HashMap::new(),
            waiting_reads: Vec::new(),
            deferred_reads: Vec::new(),
            next_id: seed_id(),
            snapshot_entries: cfg.snapshot_entries.max(1),
            removed: false,
            raft_cfg,
            logger,
            suspended: None,
            probe_ticks: (STORAGE_PROBE.as_millis() / tick.as_millis()).max(1) as u64,
            compact_soon: false,
        };
        Ok((driver, state, status_rx))
    }

    /// The driver thread: inputs as they come, a tick every `tick`, a [`Driver::turn`] after
    /// each wake-up.
    fn run(&mut self, rx: mpsc::Receiver<Input>, tick: Duration) {
        let mut last_tick = Instant::now();
        loop {
            let wait = tick.saturating_sub(last_tick.elapsed());
            match rx.recv_timeout(wait) {
                Ok(Input::Stop) => return,
                Ok(input) => {
                    self.input(input);
                    for input in rx.try_iter().take(MAX_INPUTS_PER_READY) {
                        if let Input::Stop = input {
                            return;
                        }
                        self.input(input);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let ticked = last_tick.elapsed() >= tick;
            if ticked {
                last_tick = Instant::now();
            }
            self.turn(ticked);
        }
    }

    /// One input: handled, or refused while the store fails.
    fn input(&mut self, input: Input) {
        if self.suspended.is_some() {
            refuse(input);
        } else {
            self.handle(input);
        }
    }

    /// What follows the inputs: the node ticked (if `ticked`), its Ready handled and the log
    /// compacted if due, the status published. While the store fails, only a probe of it
    /// every [`STORAGE_PROBE`].
    fn turn(&mut self, ticked: bool) {
        if let Some(ticks) = self.suspended.as_mut() {
            if !ticked {
                return;
            }
            *ticks += 1;
            if *ticks % self.probe_ticks != 0 {
                return;
            }
            let after = *ticks;
            match self.resume() {
                Ok(()) => {
                    info!(after_ticks = after, "the store takes writes again; rejoining as a follower");
                    self.suspended = None;
                    self.publish_status();
                }
                Err(e) => debug!(error = %e, "the store still fails"),
            }
            return;
        }
        if ticked && !self.removed {
            self.node.tick();
        }
        self.release_deferred_reads();
        if let Err(e) = self.on_ready().and_then(|()| self.maybe_compact()) {
            self.suspend(e);
        }
        self.publish_status();
    }

    /// Storage failed (a full disk, an I/O error): nothing more can be made durable, so this
    /// replica takes no part — it leads no more, votes for no one, acknowledges nothing —
    /// and the others carry on. Every [`STORAGE_PROBE`] it tries a write; once one goes
    /// through it reloads what the store holds and rejoins as a follower.
    fn suspend(&mut self, e: StorageError) {
        error!(error = %e, "raft storage failed: this replica steps down until its store takes writes again");
        self.suspended = Some(0);
        self.fail_all(
            ProposeError::OutcomeUnknown("this replica's storage failed before it committed".into()),
            ProposeError::NotLeader(None),
        );
    }

    /// Reloads the durable state and makes the node again from it, as a restart would.
    fn resume(&mut self) -> Result<(), StorageError> {
        self.log.reopen()?;
        self.log.probe()?;
        let hs = self.log.hard_state();
        let mut applied = self.state.read().unwrap_or_else(|p| p.into_inner()).applied_index;
        let snapshot = self.log.snapshot();
        if snapshot.get_metadata().index > applied {
            // The store took a snapshot that the state machine never did (the failure came
            // between the two, installing a leader's snapshot): the state starts from it, as
            // after a restart. Raft counts it applied; without this, the entries it covers
            // would be missing from this replica's state for good.
            let restored = state_from(&snapshot)?;
            for (id, address) in &restored.replicas {
                self.peers.set(*id, address);
            }
            applied = restored.applied_index;
            *self.state.write().unwrap_or_else(|p| p.into_inner()) = restored;
        }
        let mut cfg = self.raft_cfg.clone();
        cfg.applied = applied.min(hs.commit).max(self.log.snapshot_index());
        self.node = RawNode::new(&cfg, self.log.view.clone(), &self.logger)?;
        self.conf_state = self.log.conf_state();
        Ok(())
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Propose { cmd, reply } => self.propose(*cmd, reply),
            Input::Membership { change, reply } => self.change_membership(change, reply),
            Input::TransferLeader { to, reply } => {
                if let Some(reply) = self.leader_only(reply) {
                    self.node.transfer_leader(to);
                    let _ = reply.send(Ok(()));
                }
            }
            Input::ReadIndex { reply } => {
                // Requests given up by their callers are forgotten.
                self.reads.retain(|_, r| !r.is_closed());
                let ctx = self.next_proposal_id().to_be_bytes().to_vec();
                self.reads.insert(ctx.clone(), reply);
                if self.leads_without_commit_in_term() {
                    self.deferred_reads.push(ctx);
                } else {
                    self.node.read_index(ctx);
                }
            }
            Input::Step(m) if !self.removed => {
                if let Err(e) = self.node.step(*m) {
                    warn!(error = %e, "raft message refused");
                }
            }
            Input::Step(_) => {}
            // `run` ends at it before handing it here.
            Input::Stop => {}
            Input::Transport(Feedback::Unreachable(id)) => self.node.report_unreachable(id),
            Input::Transport(Feedback::SnapshotSent { to, ok }) => {
                let status = if ok { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
                self.node.report_snapshot(to, status);
            }
        }
    }

    /// Queues messages to their peers. A peer whose queue is full is behind or down: it is
    /// reported unreachable, and a snapshot that did not fit reported failed (raft-rs sends a
    /// follower in snapshot state nothing more until it hears).
    fn send(&mut self, messages: Vec<Message>) {
        for dropped in self.network.send(messages) {
            self.node.report_unreachable(dropped.to);
            if dropped.snapshot {
                self.node.report_snapshot(dropped.to, SnapshotStatus::Failure);
            }
        }
    }

    /// A new leader that has not yet committed an entry of its own term cannot serve a read
    /// index (raft-rs drops the request): such reads wait for that commit.
    fn leads_without_commit_in_term(&self) -> bool {
        let raft = &self.node.raft;
        raft.state == StateRole::Leader && raft.raft_log.term(raft.raft_log.committed).ok() != Some(raft.term)
    }

    fn release_deferred_reads(&mut self) {
        if self.deferred_reads.is_empty() || self.leads_without_commit_in_term() {
            return;
        }
        for ctx in std::mem::take(&mut self.deferred_reads) {
            self.node.read_index(ctx);
        }
    }

    fn next_proposal_id(&mut self) -> u64 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    /// Returns the reply back if this replica leads; otherwise answers it with NotLeader.
    fn leader_only(&self, reply: Reply) -> Option<Reply> {
        if self.node.raft.state == StateRole::Leader && !self.removed {
            return Some(reply);
        }
        let leader = Some(self.node.raft.leader_id).filter(|&l| l != 0);
        let _ = reply.send(Err(ProposeError::NotLeader(leader)));
        None
    }

    fn propose(&mut self, cmd: Command, reply: Reply) {
        if cmd.change.is_none() {
            // It would encode to nothing, which the log reserves for a new leader's entry.
            let _ = reply.send(Err(ProposeError::Rejected("empty command".into())));
            return;
        }
        let Some(reply) = self.leader_only(reply) else { return };
        let id = self.next_proposal_id();
        match self.node.propose(id.to_be_bytes().to_vec(), cmd.encode_to_vec()) {
            Ok(()) => {
                self.pending.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(ProposeError::Raft(e.to_string())));
            }
        }
    }

    fn change_membership(&mut self, change: MembershipChange, reply: Reply) {
        let Some(reply) = self.leader_only(reply) else { return };
        if self.node.raft.has_pending_conf() {
            let _ = reply.send(Err(ProposeError::Rejected("another membership change is in progress".into())));
            return;
        }
        let mut cc = ConfChange::default();
        match &change {
            MembershipChange::AddLearner { id, address } | MembershipChange::Add { id, address } => {
                let learner = matches!(change, MembershipChange::AddLearner { .. });
                cc.set_change_type(if learner { ConfChangeType::AddLearnerNode } else { ConfChangeType::AddNode });
                cc.node_id = *id;
                cc.context = address.clone().into_bytes().into();
            }
            MembershipChange::Remove { id } => {
                cc.set_change_type(ConfChangeType::RemoveNode);
                cc.node_id = *id;
            }
        }
        let id = self.next_proposal_id();
        match self.node.propose_conf_change(id.to_be_bytes().to_vec(), cc) {
            Ok(()) => {
                self.pending.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(ProposeError::Raft(e.to_string())));
            }
        }
    }

    /// Handles one Ready in the order raft-rs requires: messages a leader may send at once;
    /// then the snapshot, the entries and the hard state made durable; only then the messages
    /// that promise them (votes, append acknowledgements); then what became committed.
    fn on_ready(&mut self) -> Result<(), StorageError> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut ready = self.node.ready();
        self.send(ready.take_messages());
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone())?;
        }
        self.apply_committed(ready.take_committed_entries())?;
        self.log.persist(ready.entries(), ready.hs())?;
        self.send(ready.take_persisted_messages());
        for rs in ready.take_read_states() {
            if let Some(reply) = self.reads.remove(rs.request_ctx.as_slice()) {
                self.waiting_reads.push((rs.index, reply));
            }
        }
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.log.set_commit(commit)?;
        }
        self.send(light.take_messages());
        self.apply_committed(light.take_committed_entries())?;
        self.node.advance_apply();
        self.release_reads();
        Ok(())
    }

    fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<(), StorageError> {
        let meta = snapshot.get_metadata();
        let data = StateSnapshot::decode(snapshot.data.as_ref()).unwrap_or_else(|e| {
            error!(index = meta.index, error = %e, "undecodable snapshot state; starting from an empty state");
            StateSnapshot::default()
        });
        self.log.install_snapshot(&snapshot)?;
        self.conf_state = meta.get_conf_state().clone();
        let restored = ClusterState::from_snapshot(StateSnapshot { applied_index: meta.index, ..data });
        for (id, address) in &restored.replicas {
            self.peers.set(*id, address);
        }
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = restored;
        info!(index = meta.index, term = meta.term, "installed a snapshot from the leader");
        Ok(())
    }

    fn apply_committed(&mut self, entries: Vec<Entry>) -> Result<(), StorageError> {
        // After a suspension the node may deliver again entries the state already holds.
        let applied = self.state.read().unwrap_or_else(|p| p.into_inner()).applied_index;
        for entry in entries.into_iter().filter(|e| e.index > applied) {
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {
                    // A new leader's empty entry.
                    self.state.write().unwrap_or_else(|p| p.into_inner()).applied_index = entry.index;
                }
                EntryType::EntryNormal => self.apply_command(&entry),
                EntryType::EntryConfChange => self.apply_conf_change(&entry)?,
                EntryType::EntryConfChangeV2 => {
                    warn!(index = entry.index, "joint-consensus membership changes are not used; entry ignored");
                }
            }
        }
        Ok(())
    }

    fn answer(&mut self, entry: &Entry, result: Result<(), String>) {
        if let Ok(bytes) = <[u8; 8]>::try_from(entry.context.as_ref()) {
            if let Some(reply) = self.pending.remove(&u64::from_be_bytes(bytes)) {
                let _ = reply.send(result.map_err(ProposeError::Rejected));
            }
        }
    }

    fn apply_command(&mut self, entry: &Entry) {
        let result = match Command::decode(entry.data.as_ref()) {
            Ok(cmd) => self.state.write().unwrap_or_else(|p| p.into_inner()).apply(entry.index, &cmd),
            Err(e) => Err(format!("undecodable command at index {}: {e}", entry.index)),
        };
        if let Err(reason) = &result {
            info!(index = entry.index, %reason, "command refused by the state machine");
        }
        self.answer(entry, result);
    }

    fn apply_conf_change(&mut self, entry: &Entry) -> Result<(), StorageError> {
        let cc = match ConfChange::parse_from_bytes(entry.data.as_ref()) {
            Ok(cc) => cc,
            Err(e) => {
                error!(index = entry.index, error = %e, "undecodable membership change; ignored");
                self.answer(entry, Err(e.to_string()));
                return Ok(());
            }
        };
        let cs = match self.node.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(e) => {
                warn!(index = entry.index, error = %e, "membership change refused");
                self.answer(entry, Err(e.to_string()));
                return Ok(());
            }
        };
        self.log.set_conf_state(&cs)?;
        self.conf_state = cs;
        let address = match cc.get_change_type() {
            ConfChangeType::RemoveNode => None,
            _ => Some(String::from_utf8_lossy(cc.context.as_ref()).into_owned()),
        };
        if let Some(a) = address.as_deref().filter(|a| !a.is_empty()) {
            self.peers.set(cc.node_id, a);
        }
        self.state.write().unwrap_or_else(|p| p.into_inner()).apply_membership(entry.index, cc.node_id, address);
        self.compact_soon |= cc.get_change_type() == ConfChangeType::AddLearnerNode;
        info!(index = entry.index, change = ?cc.get_change_type(), replica = cc.node_id, voters = ?self.conf_state.voters, "membership changed");
        if cc.get_change_type() == ConfChangeType::RemoveNode && cc.node_id == self.node.raft.id {
            warn!("this replica was removed from the group; it no longer takes part (stop it)");
            self.removed = true;
        }
        self.answer(entry, Ok(()));
        Ok(())
    }

    fn applied(&self) -> u64 {
        self.node.raft.raft_log.applied
    }

    fn release_reads(&mut self) {
        let applied = self.applied();
        let (ready, waiting): (Vec<_>, Vec<_>) = self.waiting_reads.drain(..).partition(|(index, _)| *index <= applied);
        self.waiting_reads = waiting;
        for (_, reply) in ready {
            let _ = reply.send(Ok(()));
        }
    }

    /// Takes a snapshot of the applied state once enough entries have piled up since the last.
    fn maybe_compact(&mut self) -> Result<(), StorageError> {
        let due = self.applied() >= self.log.snapshot_index() + self.snapshot_entries;
        if !due && !std::mem::take(&mut self.compact_soon) {
            return Ok(());
        }
        self.compact()
    }

    /// Snapshots the applied state and drops the log it covers.
    fn compact(&mut self) -> Result<(), StorageError> {
        let applied = self.applied();
        if applied <= self.log.snapshot_index() {
            return Ok(());
        }
        let term = self.log.view.term(applied)?;
        let data = self.state.read().unwrap_or_else(|p| p.into_inner()).to_snapshot().encode_to_vec();
        let mut snapshot = Snapshot { data: data.into(), ..Default::default() };
        let meta = snapshot.mut_metadata();
        meta.index = applied;
        meta.term = term;
        meta.set_conf_state(self.conf_state.clone());
        self.log.compact(&snapshot)?;
        info!(index = applied, term, bytes = snapshot.data.len(), "compacted the log into a snapshot");
        Ok(())
    }

    /// Answers every proposal under way with `proposed`, and every read with `e`.
    fn fail_all(&mut self, proposed: ProposeError, e: ProposeError) {
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(proposed.clone()));
        }
        for (_, reply) in self.reads.drain() {
            let _ = reply.send(Err(e.clone()));
        }
        for (_, reply) in self.waiting_reads.drain(..) {
            let _ = reply.send(Err(e.clone()));
        }
    }

    fn publish_status(&mut self) {
        let raft = &self.node.raft;
        let suspended = self.suspended.is_some();
        let is_leader = raft.state == StateRole::Leader && !self.removed && !suspended;
        let status = RaftStatus {
            id: raft.id,
            term: raft.term,
            // A suspended replica knows no leader: it may have been the one.
            leader: if suspended { 0 } else { raft.leader_id },
            is_leader,
            commit: raft.raft_log.committed,
            last_index: raft.raft_log.last_index(),
            applied: raft.raft_log.applied,
            snapshot_index: self.log.snapshot_index(),
            voters: self.conf_state.voters.clone(),
            learners: self.conf_state.learners.clone(),
            matched: if is_leader {
                let mut m: Vec<(u64, u64)> = raft.prs().iter().map(|(id, p)| (*id, p.matched)).collect();
                m.sort_unstable();
                m
            } else {
                Vec::new()
            },
            removed: self.removed,
        };
        let was_leader = self.status.borrow().is_leader;
        if was_leader && !status.is_leader {
            // Lost leadership: what was proposed here may commit under the next leader, or never.
            let lost = format!("this replica lost leadership (to {}) before it committed", status.leader);
            for (_, reply) in self.pending.drain() {
                let _ = reply.send(Err(ProposeError::OutcomeUnknown(lost.clone())));
            }
        }
        self.status.send_if_modified(|current| {
            if (current.term, current.leader, current.is_leader) != (status.term, status.leader, status.is_leader) {
                info!(term = status.term, leader = status.leader, is_leader = status.is_leader, "raft status");
            }
            let changed = *current != status;
            *current = status;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group of one, on a fast tick.
    fn one_replica() -> RaftConfig {
        RaftConfig {
            id: 1,
            voters: vec![1],
            peers: AddressBook::new([(1, "127.0.0.1:1/127.0.0.1:2".to_string())]),
            security: tidal_auth::Security::plaintext(),
            tick: Duration::from_millis(10),
            election_ticks: 8,
            heartbeat_ticks: 2,
            snapshot_entries: 100,
            accept_unverified_store: false,
        }
    }

    /// A driver thread belongs to its handles: with the last one gone, it ends (its status
    /// sender is dropped). The transport's feedback used to hold the input queue open, and the
    /// thread ran on for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_driver_ends_when_its_last_handle_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let raft = start(one_replica(), dir.path()).unwrap();
        let mut status = raft.watch();
        let leads =
            tokio::time::timeout(Duration::from_secs(5), status.wait_for(|s| s.is_leader)).await.map(|r| r.is_ok());
        assert_eq!(leads, Ok(true), "a group of one leads at once");
        let clone = raft.clone();
        drop(raft);
        assert!(clone.is_running(), "a handle left keeps the driver");
        drop(clone);
        let ended =
            tokio::time::timeout(Duration::from_secs(5), async { while status.changed().await.is_ok() {} }).await;
        assert!(ended.is_ok(), "the driver thread still runs with no handle left");
    }

    /// A daemon that stops ends its driver and joins the thread, whatever handles remain.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_driver_is_joined_while_handles_remain() {
        let dir = tempfile::tempdir().unwrap();
        let raft = start(one_replica(), dir.path()).unwrap();
        let clone = raft.clone();
        let thread = raft.thread.lock().unwrap().as_ref().map(|t| t.thread().id());
        assert!(thread.is_some() && clone.is_running());
        tokio::time::timeout(Duration::from_secs(5), raft.stop()).await.expect("the driver did not stop");
        assert!(raft.thread.lock().unwrap().is_none(), "the thread was joined");
        assert!(!clone.is_running(), "every handle sees the driver gone");
        let refused = clone.propose(Command::default()).await;
        assert!(refused.is_err(), "{refused:?}");
    }
}
