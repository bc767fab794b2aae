//! Durable Raft storage in sled: the log, the hard state, the configuration and the latest
//! snapshot.
//!
//! raft-rs reads through its `Storage` trait; [`LogView`] serves those reads from memory. Every
//! change is written to sled and flushed *before* it reaches the in-memory copy, and the
//! driver sends the messages that depend on it only afterwards, so on restart the copy is
//! rebuilt from sled and nothing acknowledged is lost.
//!
//! A snapshot replaces the log prefix it covers: taking one (compaction) or receiving one from
//! the leader deletes the entries up to its index, in memory and in sled.

use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt raft record {what}: {source}")]
    Decode { what: String, source: protobuf::ProtobufError },
    #[error("raft storage: {0}")]
    Raft(#[from] raft::Error),
    #[error("corrupt snapshot state: {0}")]
    CorruptSnapshot(String),
    #[error("snapshot at {snapshot} is older than the log's first index {first}")]
    StaleSnapshot { snapshot: u64, first: u64 },
}

/// The in-memory image of what sled holds.
#[derive(Default)]
struct Core {
    hard_state: HardState,
    conf_state: ConfState,
    /// The latest snapshot; the log starts right after its index.
    snapshot: Snapshot,
    entries: Vec<Entry>,
}

impl Core {
    fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    fn first_index(&self) -> u64 {
        self.entries.first().map_or(self.snapshot_index() + 1, |e| e.index)
    }

    fn last_index(&self) -> u64 {
        self.entries.last().map_or(self.snapshot_index(), |e| e.index)
    }

    fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let keep = first.index.saturating_sub(self.first_index()) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
    }
}

/// raft-rs's read-only view of the log (shared with the driver, which writes through
/// [`DurableLog`]).
#[derive(Clone, Default)]
pub struct LogView(Arc<RwLock<Core>>);

impl LogView {
    fn rl(&self) -> RwLockReadGuard<'_, Core> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    fn wl(&self) -> RwLockWriteGuard<'_, Core> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl Storage for LogView {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let core = self.rl();
        Ok(RaftState::new(core.hard_state.clone(), core.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let core = self.rl();
        if low < core.first_index() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if high > core.last_index() + 1 {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        let offset = core.first_index();
        let mut entries = core.entries[(low - offset) as usize..(high - offset) as usize].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let core = self.rl();
        let snap = core.snapshot.get_metadata();
        if idx == snap.index {
            return Ok(snap.term);
        }
        if idx < core.first_index() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if idx > core.last_index() {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        Ok(core.entries[(idx - core.first_index()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.rl().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.rl().last_index())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let core = self.rl();
        if core.snapshot_index() < request_index || core.snapshot_index() == 0 {
            // Compaction has not caught up with what the follower needs yet.
            return Err(raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(core.snapshot.clone())
    }
}

pub struct DurableLog {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    pub view: LogView,
}

const HARD_STATE: &[u8] = b"hard_state";
const CONF_STATE: &[u8] = b"conf_state";
const SNAPSHOT: &[u8] = b"snapshot";

impl DurableLog {
    /// Opens (or creates) the store at `dir`. A new store is bootstrapped with `voters`; with
    /// none, the replica waits to be added to an existing group (its first snapshot or
    /// append from the leader tells it the membership).
    pub fn open(dir: &Path, voters: &[u64]) -> Result<Self, StorageError> {
        let db = sled::open(dir)?;
        let log = db.open_tree("raft_log")?;
        let meta = db.open_tree("raft_meta")?;
        let this = Self { db, log, meta, view: LogView::default() };
        match this.meta.get(CONF_STATE)? {
            Some(bytes) => this.restore(&bytes)?,
            None if voters.is_empty() => {}
            None => {
                let cs = ConfState::from((voters.to_vec(), vec![]));
                this.set_conf_state(&cs)?;
            }
        }
        Ok(this)
    }

    /// True when the store holds no Raft state at all (a fresh directory).
    pub fn is_fresh(&self) -> bool {
        let core = self.view.rl();
        core.conf_state.voters.is_empty() && core.conf_state.learners.is_empty() && core.last_index() == 0
    }

    fn restore(&self, conf_state: &[u8]) -> Result<(), StorageError> {
        let mut core = self.view.wl();
        core.conf_state = ConfState::parse_from_bytes(conf_state).map_err(|e| decode("conf state", e))?;
        if let Some(bytes) = self.meta.get(HARD_STATE)? {
            core.hard_state = HardState::parse_from_bytes(&bytes).map_err(|e| decode("hard state", e))?;
        }
        if let Some(bytes) = self.meta.get(SNAPSHOT)? {
            core.snapshot = Snapshot::parse_from_bytes(&bytes).map_err(|e| decode("snapshot", e))?;
        }
        let first = core.snapshot_index() + 1;
        for kv in self.log.range(first.to_be_bytes()..) {
            let (key, bytes) = kv?;
            core.entries.push(Entry::parse_from_bytes(&bytes).map_err(|e| decode(&format!("entry {key:?}"), e))?);
        }
        Ok(())
    }

    /// The latest snapshot (empty metadata when none was taken).
    pub fn snapshot(&self) -> Snapshot {
        self.view.rl().snapshot.clone()
    }

    /// The latest snapshot's index (0 when none), without copying its data.
    pub fn snapshot_index(&self) -> u64 {
        self.view.rl().snapshot_index()
    }

    pub fn conf_state(&self) -> ConfState {
        self.view.rl().conf_state.clone()
    }

    pub fn hard_state(&self) -> HardState {
        self.view.rl().hard_state.clone()
    }

    /// Durably appends `entries` (replacing any conflicting suffix) and records `hard_state`,
    /// with one flush.
    pub fn persist(&self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<(), StorageError> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        if let Some(first) = entries.first() {
            let mut batch = sled::Batch::default();
            for kv in self.log.range(first.index.to_be_bytes()..) {
                batch.remove(kv?.0);
            }
            for e in entries {
                batch.insert(&e.index.to_be_bytes(), e.write_to_bytes().map_err(|err| decode("entry", err))?);
            }
            self.log.apply_batch(batch)?;
        }
        if let Some(hs) = hard_state {
            self.meta.insert(HARD_STATE, hs.write_to_bytes().map_err(|e| decode("hard state", e))?)?;
        }
        self.db.flush()?;
        let mut core = self.view.wl();
        core.append(entries);
        if let Some(hs) = hard_state {
            core.hard_state = hs.clone();
        }
        Ok(())
    }

    pub fn set_commit(&self, commit: u64) -> Result<(), StorageError> {
        let mut hs = self.hard_state();
        hs.commit = commit;
        self.persist(&[], Some(&hs))
    }

    pub fn set_conf_state(&self, cs: &ConfState) -> Result<(), StorageError> {
        self.meta.insert(CONF_STATE, cs.write_to_bytes().map_err(|e| decode("conf state", e))?)?;
        self.db.flush()?;
        self.view.wl().conf_state = cs.clone();
        Ok(())
    }

    /// Installs a snapshot received from the leader: it replaces the whole log.
    pub fn install_snapshot(&self, snapshot: &Snapshot) -> Result<(), StorageError> {
        let meta = snapshot.get_metadata();
        let first = self.view.rl().first_index();
        if meta.index < first.saturating_sub(1) {
            return Err(StorageError::StaleSnapshot { snapshot: meta.index, first });
        }
        let mut hs = self.hard_state();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        self.write_snapshot(snapshot, None, &hs)?;
        let mut core = self.view.wl();
        core.entries.clear();
        core.hard_state = hs;
        core.conf_state = meta.get_conf_state().clone();
        core.snapshot = snapshot.clone();
        Ok(())
    }

    /// Compaction: records a snapshot of the applied state and drops the entries it covers.
    pub fn compact(&self, snapshot: &Snapshot) -> Result<(), StorageError> {
        let index = snapshot.get_metadata().index;
        let hs = self.hard_state();
        self.write_snapshot(snapshot, Some(index), &hs)?;
        let mut core = self.view.wl();
        let drop = ((index + 1).saturating_sub(core.first_index()) as usize).min(core.entries.len());
        core.entries.drain(..drop);
        core.snapshot = snapshot.clone();
        Ok(())
    }

    /// Writes `snapshot` and then deletes the log up to `upto` (the whole log when `None`).
    /// The snapshot is flushed before any entry goes, so a crash in between leaves a
    /// snapshot and a log that overlaps it, never a gap.
    fn write_snapshot(&self, snapshot: &Snapshot, upto: Option<u64>, hs: &HardState) -> Result<(), StorageError> {
        let meta = snapshot.get_metadata();
        self.meta.insert(SNAPSHOT, snapshot.write_to_bytes().map_err(|e| decode("snapshot", e))?)?;
        self.meta.insert(HARD_STATE, hs.write_to_bytes().map_err(|e| decode("hard state", e))?)?;
        if upto.is_none() {
            let cs = meta.get_conf_state();
            self.meta.insert(CONF_STATE, cs.write_to_bytes().map_err(|e| decode("conf state", e))?)?;
        }
        self.db.flush()?;
        let mut batch = sled::Batch::default();
        let keys = match upto {
            Some(index) => self.log.range(..=index.to_be_bytes()),
            None => self.log.range::<&[u8], _>(..),
        };
        for kv in keys {
            batch.remove(kv?.0);
        }
        self.log.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }
}

fn decode(what: &str, source: protobuf::ProtobufError) -> StorageError {
    StorageError::Decode { what: what.to_string(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: vec![index as u8].into(), ..Default::default() }
    }

    fn snapshot(index: u64, term: u64, voters: Vec<u64>) -> Snapshot {
        let mut s = Snapshot::default();
        s.mut_metadata().index = index;
        s.mut_metadata().term = term;
        s.mut_metadata().set_conf_state(ConfState::from((voters, vec![])));
        s.data = b"state".to_vec().into();
        s
    }

    #[test]
    fn the_log_and_hard_state_survive_a_reopen_and_conflicts_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = DurableLog::open(dir.path(), &[1]).unwrap();
            log.persist(&[entry(1, 1), entry(2, 1), entry(3, 1)], None).unwrap();
            // A conflicting suffix from a new term.
            log.persist(&[entry(3, 2)], Some(&HardState { term: 2, vote: 1, commit: 3, ..Default::default() }))
                .unwrap();
        }
        let log = DurableLog::open(dir.path(), &[9]).unwrap();
        let state = log.view.initial_state().unwrap();
        assert_eq!(state.hard_state.commit, 3);
        assert_eq!(state.hard_state.term, 2);
        assert_eq!(state.conf_state.voters, vec![1], "the bootstrap voters are not reapplied");
        assert_eq!(log.view.last_index().unwrap(), 3);
        assert_eq!(log.view.term(3).unwrap(), 2);
    }

    #[test]
    fn compaction_keeps_the_tail_and_the_snapshot_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = DurableLog::open(dir.path(), &[1, 2, 3]).unwrap();
            log.persist(&(1..=10).map(|i| entry(i, 1)).collect::<Vec<_>>(), None).unwrap();
            assert!(log.view.snapshot(0, 2).is_err(), "no snapshot taken yet");
            log.compact(&snapshot(6, 1, vec![1, 2, 3])).unwrap();
            assert_eq!(log.view.first_index().unwrap(), 7);
            assert_eq!(log.view.term(6).unwrap(), 1, "the snapshot's own index still has a term");
            assert!(log.view.entries(5, 8, None, GetEntriesContext::empty(false)).is_err());
        }
        let log = DurableLog::open(dir.path(), &[]).unwrap();
        assert_eq!(log.view.first_index().unwrap(), 7);
        assert_eq!(log.view.last_index().unwrap(), 10);
        let entries = log.view.entries(7, 11, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(entries.iter().map(|e| e.index).collect::<Vec<_>>(), vec![7, 8, 9, 10]);
        assert_eq!(log.view.snapshot(0, 2).unwrap().get_metadata().index, 6);
    }

    #[test]
    fn an_installed_snapshot_replaces_the_log_and_the_membership() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = DurableLog::open(dir.path(), &[]).unwrap();
            assert!(log.is_fresh());
            log.persist(&[entry(1, 1), entry(2, 1)], None).unwrap();
            log.install_snapshot(&snapshot(20, 3, vec![1, 2, 4])).unwrap();
            assert_eq!(log.view.last_index().unwrap(), 20);
        }
        let log = DurableLog::open(dir.path(), &[]).unwrap();
        assert!(!log.is_fresh());
        assert_eq!(log.conf_state().voters, vec![1, 2, 4]);
        assert_eq!(log.hard_state().commit, 20);
        assert_eq!(log.view.first_index().unwrap(), 21);
        assert_eq!(log.snapshot().data.as_ref(), b"state");
    }
}
