//! Durable Raft storage in sled: the log, the hard state and the configuration.
//!
//! raft-rs reads through its `Storage` trait; Tidal serves those reads from raft-rs's
//! `MemStorage` and makes every change durable in sled first (written and flushed before the
//! Ready's messages are sent), so that on restart the in-memory copy is rebuilt from sled and
//! nothing acknowledged is lost.

use std::path::Path;

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState};
use raft::storage::MemStorage;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt raft record {what}: {source}")]
    Decode { what: String, source: protobuf::ProtobufError },
    #[error("raft storage: {0}")]
    Raft(#[from] raft::Error),
}

pub struct DurableLog {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    pub mem: MemStorage,
}

const HARD_STATE: &[u8] = b"hard_state";
const CONF_STATE: &[u8] = b"conf_state";

impl DurableLog {
    /// Opens (or creates) the store at `dir`. A new store is bootstrapped with `voters`.
    pub fn open(dir: &Path, voters: &[u64]) -> Result<Self, StorageError> {
        let db = sled::open(dir)?;
        let log = db.open_tree("raft_log")?;
        let meta = db.open_tree("raft_meta")?;
        let mem = MemStorage::new();
        let this = Self { db, log, meta, mem };
        match this.meta.get(CONF_STATE)? {
            Some(bytes) => this.restore(&bytes)?,
            None => {
                let cs = ConfState::from((voters.to_vec(), vec![]));
                this.meta.insert(CONF_STATE, cs.write_to_bytes().map_err(|e| decode("conf state", e))?)?;
                this.db.flush()?;
                this.mem.wl().set_conf_state(cs);
            }
        }
        Ok(this)
    }

    fn restore(&self, conf_state: &[u8]) -> Result<(), StorageError> {
        let cs = ConfState::parse_from_bytes(conf_state).map_err(|e| decode("conf state", e))?;
        let mut core = self.mem.wl();
        core.set_conf_state(cs);
        if let Some(bytes) = self.meta.get(HARD_STATE)? {
            core.set_hardstate(HardState::parse_from_bytes(&bytes).map_err(|e| decode("hard state", e))?);
        }
        let mut entries = Vec::new();
        for kv in self.log.iter() {
            let (key, bytes) = kv?;
            entries.push(Entry::parse_from_bytes(&bytes).map_err(|e| decode(&format!("entry {key:?}"), e))?);
        }
        core.append(&entries)?;
        Ok(())
    }

    /// Appends entries, replacing any conflicting suffix, durably.
    pub fn append(&self, entries: &[Entry]) -> Result<(), StorageError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let mut batch = sled::Batch::default();
        for kv in self.log.range(first.index.to_be_bytes()..) {
            batch.remove(kv?.0);
        }
        for e in entries {
            batch.insert(&e.index.to_be_bytes(), e.write_to_bytes().map_err(|err| decode("entry", err))?);
        }
        self.log.apply_batch(batch)?;
        self.db.flush()?;
        self.mem.wl().append(entries)?;
        Ok(())
    }

    pub fn set_hard_state(&self, hs: &HardState) -> Result<(), StorageError> {
        self.meta.insert(HARD_STATE, hs.write_to_bytes().map_err(|e| decode("hard state", e))?)?;
        self.db.flush()?;
        self.mem.wl().set_hardstate(hs.clone());
        Ok(())
    }

    pub fn set_commit(&self, commit: u64) -> Result<(), StorageError> {
        let mut hs = self.mem.rl().hard_state().clone();
        hs.commit = commit;
        self.set_hard_state(&hs)
    }

    pub fn set_conf_state(&self, cs: &ConfState) -> Result<(), StorageError> {
        self.meta.insert(CONF_STATE, cs.write_to_bytes().map_err(|e| decode("conf state", e))?)?;
        self.db.flush()?;
        self.mem.wl().set_conf_state(cs.clone());
        Ok(())
    }
}

fn decode(what: &str, source: protobuf::ProtobufError) -> StorageError {
    StorageError::Decode { what: what.to_string(), source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: vec![index as u8].into(), ..Default::default() }
    }

    #[test]
    fn the_log_and_hard_state_survive_a_reopen_and_conflicts_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = DurableLog::open(dir.path(), &[1]).unwrap();
            log.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]).unwrap();
            log.append(&[entry(3, 2)]).unwrap(); // conflicting suffix from a new term
            log.set_hard_state(&HardState { term: 2, vote: 1, commit: 3, ..Default::default() }).unwrap();
        }
        let log = DurableLog::open(dir.path(), &[9]).unwrap();
        let state = log.mem.initial_state().unwrap();
        assert_eq!(state.hard_state.commit, 3);
        assert_eq!(state.hard_state.term, 2);
        assert_eq!(state.conf_state.voters, vec![1], "the bootstrap voters are not reapplied");
        assert_eq!(log.mem.last_index().unwrap(), 3);
        assert_eq!(log.mem.term(3).unwrap(), 2);
    }
}
