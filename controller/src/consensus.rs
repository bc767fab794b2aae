//! The Raft driver: one OS thread per replica owns the raft-rs `RawNode`, ticks it, feeds it
//! proposals, persists each Ready in sled before acting on it, and applies committed commands
//! to the state machine. Async callers talk to it through a channel and get their answer when
//! their command is applied (or refused).
//!
//! A thread rather than a tokio task, because sled's flush is a blocking fsync and the runtime
//! must not block.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use prost::Message as _;
use raft::prelude::{Entry, EntryType};
use raft::{Config, RawNode, StateRole};
use thiserror::Error;
use tidal_proto::v1::Command;
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use crate::logging::slog_to_tracing;
use crate::state::ClusterState;
use crate::storage::{DurableLog, StorageError};

#[derive(Debug, Error, Clone, PartialEq)]
pub enum ProposeError {
    #[error("this replica is not the leader (leader: {0:?})")]
    NotLeader(Option<u64>),
    #[error("the command was refused: {0}")]
    Rejected(String),
    #[error("the replica is shutting down")]
    Stopped,
    #[error("raft: {0}")]
    Raft(String),
}

/// What the rest of the controller may read about consensus.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RaftStatus {
    pub id: u64,
    pub term: u64,
    pub leader: u64,
    pub is_leader: bool,
}

struct Proposal {
    cmd: Command,
    reply: oneshot::Sender<Result<(), ProposeError>>,
}

#[derive(Clone)]
pub struct RaftHandle {
    tx: mpsc::Sender<Proposal>,
    pub state: Arc<RwLock<ClusterState>>,
    status: Arc<RwLock<RaftStatus>>,
}

impl RaftHandle {
    pub fn status(&self) -> RaftStatus {
        *self.status.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        f(&self.state.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Proposes a command and waits until it is applied.
    pub async fn propose(&self, cmd: Command) -> Result<(), ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Proposal { cmd, reply }).map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }
}

pub struct RaftConfig {
    pub id: u64,
    pub voters: Vec<u64>,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
}

/// Opens the durable log in `dir` and starts the driver thread.
pub fn start(cfg: RaftConfig, dir: &Path) -> Result<RaftHandle, StorageError> {
    let log = DurableLog::open(dir, &cfg.voters)?;
    let raft_cfg = Config {
        id: cfg.id,
        election_tick: cfg.election_ticks,
        heartbeat_tick: cfg.heartbeat_ticks,
        ..Default::default()
    };
    raft_cfg.validate()?;
    let logger = slog_to_tracing();
    let mut node = RawNode::new(&raft_cfg, log.mem.clone(), &logger)?;
    if cfg.voters == [cfg.id] {
        // A single voter need not wait an election timeout to lead.
        node.campaign()?;
    }
    let (tx, rx) = mpsc::channel();
    let state = Arc::new(RwLock::new(ClusterState::default()));
    let status = Arc::new(RwLock::new(RaftStatus { id: cfg.id, ..Default::default() }));
    let mut driver =
        Driver { node, log, state: state.clone(), status: status.clone(), pending: HashMap::new(), next_id: seed_id() };
    std::thread::Builder::new()
        .name(format!("raft-{}", cfg.id))
        .spawn(move || driver.run(rx, cfg.tick))
        .map_err(|e| StorageError::Raft(raft::Error::Io(e)))?;
    Ok(RaftHandle { tx, state, status })
}

/// Proposal ids start from the clock so that entries replayed from an earlier run never
/// match a new proposal.
fn seed_id() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
}

struct Driver {
    node: RawNode<raft::storage::MemStorage>,
    log: DurableLog,
    state: Arc<RwLock<ClusterState>>,
    status: Arc<RwLock<RaftStatus>>,
    pending: HashMap<u64, oneshot::Sender<Result<(), ProposeError>>>,
    next_id: u64,
}

impl Driver {
    fn run(&mut self, rx: mpsc::Receiver<Proposal>, tick: Duration) {
        let mut last_tick = Instant::now();
        loop {
            let wait = tick.saturating_sub(last_tick.elapsed());
            match rx.recv_timeout(wait) {
                Ok(p) => self.propose(p),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if last_tick.elapsed() >= tick {
                self.node.tick();
                last_tick = Instant::now();
            }
            if let Err(e) = self.on_ready() {
                // Storage failed: nothing can be made durable, so stop rather than diverge.
                error!(error = %e, "raft storage failed; the replica stops");
                for (_, reply) in self.pending.drain() {
                    let _ = reply.send(Err(ProposeError::Raft(e.to_string())));
                }
                return;
            }
            self.publish_status();
        }
    }

    fn propose(&mut self, p: Proposal) {
        if self.node.raft.state != StateRole::Leader {
            let leader = Some(self.node.raft.leader_id).filter(|&l| l != 0);
            let _ = p.reply.send(Err(ProposeError::NotLeader(leader)));
            return;
        }
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        match self.node.propose(id.to_be_bytes().to_vec(), p.cmd.encode_to_vec()) {
            Ok(()) => {
                self.pending.insert(id, p.reply);
            }
            Err(e) => {
                let _ = p.reply.send(Err(ProposeError::Raft(e.to_string())));
            }
        }
    }

    fn on_ready(&mut self) -> Result<(), StorageError> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut ready = self.node.ready();
        // Single-replica transport: no peers to send messages to yet.
        if !ready.snapshot().is_empty() {
            self.log.mem.wl().apply_snapshot(ready.snapshot().clone())?;
        }
        self.apply_committed(ready.take_committed_entries())?;
        self.log.append(ready.entries())?;
        if let Some(hs) = ready.hs() {
            self.log.set_hard_state(hs)?;
        }
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.log.set_commit(commit)?;
        }
        self.apply_committed(light.take_committed_entries())?;
        self.node.advance_apply();
        Ok(())
    }

    fn apply_committed(&mut self, entries: Vec<Entry>) -> Result<(), StorageError> {
        for entry in entries {
            if entry.data.is_empty() {
                continue; // a new leader's empty entry
            }
            match entry.get_entry_type() {
                EntryType::EntryNormal => self.apply_command(&entry),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    warn!(index = entry.index, "membership changes are not supported yet; entry ignored");
                }
            }
        }
        Ok(())
    }

    fn apply_command(&mut self, entry: &Entry) {
        let result = match Command::decode(entry.data.as_ref()) {
            Ok(cmd) => self.state.write().unwrap_or_else(|p| p.into_inner()).apply(entry.index, &cmd),
            Err(e) => Err(format!("undecodable command at index {}: {e}", entry.index)),
        };
        if let Err(reason) = &result {
            info!(index = entry.index, %reason, "command refused by the state machine");
        }
        if entry.context.len() == 8 {
            let id = u64::from_be_bytes(entry.context[..8].try_into().unwrap_or_default());
            if let Some(reply) = self.pending.remove(&id) {
                let _ = reply.send(result.map_err(ProposeError::Rejected));
            }
        }
    }

    fn publish_status(&mut self) {
        let raft = &self.node.raft;
        let status = RaftStatus {
            id: raft.id,
            term: raft.term,
            leader: raft.leader_id,
            is_leader: raft.state == StateRole::Leader,
        };
        let mut current = self.status.write().unwrap_or_else(|p| p.into_inner());
        if current.is_leader && !status.is_leader {
            // Lost leadership: what was proposed may never commit here.
            for (_, reply) in self.pending.drain() {
                let _ = reply.send(Err(ProposeError::NotLeader(Some(status.leader).filter(|&l| l != 0))));
            }
        }
        if *current != status {
            info!(term = status.term, leader = status.leader, is_leader = status.is_leader, "raft status");
        }
        *current = status;
    }
}
