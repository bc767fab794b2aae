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
//!
//! Damage is detected when the store opens, not served: every record carries a CRC32 of its
//! bytes ([`seal`]), the log must run without a gap from the snapshot on, and a small file
//! beside sled's ([`Watermark`]) remembers the highest term and commit index ever made
//! durable — both only grow — so a store that lost its tail (sled treats a damaged tail as a
//! torn write and silently drops it) is refused with [`StorageError::Damaged`] instead of
//! starting without writes it acknowledged. Such a replica is rebuilt from its peers (see
//! the README: remove it, empty its directory, add it back).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
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
    #[error(
        "the store in {dir} is damaged: {what}. Do not start this replica on it: remove it from the group \
         (`tidalctl controller remove --id ID --keep-certificate`), empty the directory, start it with --join and add it back \
         (`tidalctl controller add`); it copies the state from its peers"
    )]
    Damaged { dir: PathBuf, what: String },
    #[error(
        "the store in {dir} belongs to replica {found}, not {id}: each replica needs a data directory of its own \
         (start it with its own --data-dir, or --id {found})"
    )]
    OtherReplica { dir: PathBuf, found: u64, id: u64 },
    #[error("the store in {0} is closed (it failed to reopen)")]
    Closed(PathBuf),
    #[error("the watermark file {path}: {source}")]
    Watermark { path: PathBuf, source: std::io::Error },
    #[error(
        "the store in {0} holds Raft state but neither copy of its watermark (tidal-watermark, \
         tidal-watermark.copy), so whether it lost acknowledged writes cannot be told. Rebuild it from its \
         peers (`tidalctl controller remove`, empty the directory, --join, `tidalctl controller add`), or, \
         for a group of one with no other copy, start it with --accept-unverified-store"
    )]
    Unverified(PathBuf),
}

/// Marks a sealed record: no protobuf message starts with these bytes (field 10 with the
/// end-group wire type), so records written before sealing still read as they are.
const MAGIC: [u8; 4] = *b"TDL\x01";

/// A record as stored: [`MAGIC`], the CRC32 of `payload` (little-endian), `payload`.
fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The payload of a stored record, checked; `None` when its checksum does not match.
fn unseal(record: &[u8]) -> Option<&[u8]> {
    let Some(rest) = record.strip_prefix(&MAGIC) else {
        return Some(record); // written before records were sealed
    };
    let (crc, payload) = rest.split_at_checked(4)?;
    (crc32fast::hash(payload).to_le_bytes() == crc).then_some(payload)
}

/// The highest term and commit index this store ever made durable, kept in a file of its own
/// beside sled's, written after every flush that raises them. Both only grow, so a store
/// found below its watermark has lost durable writes. (Written without an fsync of its own:
/// after a power loss it may lag, which weakens the check but never raises a false alarm.)
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Watermark {
    term: u64,
    commit: u64,
}

/// Two copies, written alike: losing one is noticed (and repaired from the other); a store
/// with Raft state and neither is not trusted (see [`StorageError::Unverified`]).
const WATERMARK_FILES: [&str; 2] = ["tidal-watermark", "tidal-watermark.copy"];

impl Watermark {
    fn read(path: &Path) -> Result<Option<Self>, StorageError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StorageError::Watermark { path: path.into(), source }),
        };
        let record = unseal(&bytes).filter(|p| p.len() == 16 && bytes.starts_with(&MAGIC));
        let Some(p) = record else {
            // A torn write of the watermark itself: the check is skipped, the records' own
            // checksums still stand.
            tracing::warn!(path = %path.display(), "unreadable watermark; not checked");
            return Ok(None);
        };
        let word = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().unwrap_or_default());
        Ok(Some(Self { term: word(0), commit: word(8) }))
    }

    fn write(&self, file: &File, path: &Path) -> Result<(), StorageError> {
        let mut payload = self.term.to_le_bytes().to_vec();
        payload.extend_from_slice(&self.commit.to_le_bytes());
        file.write_all_at(&seal(&payload), 0).map_err(|source| StorageError::Watermark { path: path.into(), source })
    }
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

/// sled's handles: the database and its two trees. After an I/O error sled refuses every
/// later write through the same handles, so a store that recovers is opened afresh.
struct Sled {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
}

/// sled's page cache (its default is 1 GiB): the log is read back only by followers catching
/// up and after a restart, so a small cache costs little and bounds the replica's memory.
const SLED_CACHE_BYTES: u64 = 64 << 20;

/// Opens sled in `dir`. A store just closed (by this process: a reopen, a restart in place)
/// can still be locked for a moment by sled's background flusher, which holds the database
/// until it notices; that lock is waited out, up to 5 s. sled 0.34 says a lock is held only in
/// its error's text (an `ErrorKind::Other` made in `Config::open`), so the text is matched.
fn open_sled(dir: &Path) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::Config::new().path(dir).cache_capacity(SLED_CACHE_BYTES).open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

impl Sled {
    fn open(dir: &Path) -> Result<Self, StorageError> {
        let db = open_sled(dir)?;
        let log = db.open_tree("raft_log")?;
        let meta = db.open_tree("raft_meta")?;
        Ok(Self { db, log, meta })
    }
}

pub struct DurableLog {
    dir: PathBuf,
    /// None only between closing and reopening (see [`DurableLog::reopen`]).
    sled: Option<Sled>,
    /// Each copy of the watermark, open for writing.
    watermark_files: Vec<(PathBuf, File)>,
    watermark: std::sync::Mutex<Watermark>,
    pub view: LogView,
    /// A test's switch: while set, every flush fails as a full disk would.
    #[cfg(test)]
    pub(crate) failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

const HARD_STATE: &[u8] = b"hard_state";
const CONF_STATE: &[u8] = b"conf_state";
const SNAPSHOT: &[u8] = b"snapshot";
const REPLICA_ID: &[u8] = b"replica_id";

impl DurableLog {
    /// Opens (or creates) the store at `dir`. A new store is bootstrapped with `voters`; with
    /// none, the replica waits to be added to an existing group (its first snapshot or
    /// append from the leader tells it the membership).
    pub fn open(dir: &Path, voters: &[u64]) -> Result<Self, StorageError> {
        Self::open_with(dir, voters, false)
    }

    /// [`Self::open`]; `accept_unverified` starts a store with Raft state and no watermark at
    /// all (warning), which is otherwise refused.
    pub fn open_with(dir: &Path, voters: &[u64], accept_unverified: bool) -> Result<Self, StorageError> {
        let sled = Sled::open(dir)?;
        let mut marks = Vec::new();
        let mut watermark_files = Vec::new();
        for name in WATERMARK_FILES {
            let path = dir.join(name);
            marks.push(Watermark::read(&path)?);
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|source| StorageError::Watermark { path: path.clone(), source })?;
            watermark_files.push((path, file));
        }
        let mark = marks
            .iter()
            .flatten()
            .copied()
            .reduce(|a, b| Watermark { term: a.term.max(b.term), commit: a.commit.max(b.commit) });
        let this = Self {
            dir: dir.to_path_buf(),
            sled: Some(sled),
            watermark_files,
            watermark: std::sync::Mutex::new(mark.unwrap_or_default()),
            view: LogView::default(),
            #[cfg(test)]
            failing: Default::default(),
        };
        match this.s()?.meta.get(CONF_STATE)? {
            Some(bytes) => this.restore(&bytes)?,
            None if voters.is_empty() => {}
            None => {
                let cs = ConfState::from((voters.to_vec(), vec![]));
                this.set_conf_state(&cs)?;
            }
        }
        if mark.is_none() && this.holds_state() {
            if !accept_unverified {
                return Err(StorageError::Unverified(this.dir.clone()));
            }
            tracing::warn!(dir = %this.dir.display(), "no watermark: starting an unverified store (--accept-unverified-store)");
        }
        this.check_watermark(mark)?;
        if marks.iter().any(Option::is_none) {
            if mark.is_some() {
                tracing::warn!(dir = %this.dir.display(), "a copy of the watermark was missing or unreadable; written again from the other");
            }
            // Both copies exist from the first open on, so that only their loss leaves none.
            this.write_watermark(&this.watermark.lock().unwrap_or_else(|p| p.into_inner()))?;
        }
        Ok(this)
    }

    /// Whether the store holds any Raft state beyond its membership (a term, a commit, entries).
    fn holds_state(&self) -> bool {
        let core = self.view.rl();
        core.hard_state.term > 0 || core.hard_state.commit > 0 || core.last_index() > 0
    }

    fn write_watermark(&self, mark: &Watermark) -> Result<(), StorageError> {
        for (path, file) in &self.watermark_files {
            mark.write(file, path)?;
        }
        Ok(())
    }

    /// Records that this store is replica `id`'s, or checks that it is: a replica started on
    /// another's data directory would speak with that replica's log and votes as its own. (A
    /// store made before the id was recorded is claimed by the first replica that opens it.)
    pub fn claim(&self, id: u64) -> Result<(), StorageError> {
        let sled = self.s()?;
        match sled.meta.get(REPLICA_ID)? {
            Some(bytes) => {
                let found = <[u8; 8]>::try_from(bytes.as_ref()).map(u64::from_le_bytes).map_err(|_| {
                    StorageError::Damaged { dir: self.dir.clone(), what: "the replica id record is malformed".into() }
                })?;
                if found != id {
                    return Err(StorageError::OtherReplica { dir: self.dir.clone(), found, id });
                }
            }
            None => {
                sled.meta.insert(REPLICA_ID, &id.to_le_bytes())?;
                sled.db.flush()?;
            }
        }
        Ok(())
    }

    /// Makes what was written durable.
    fn flush(&self) -> Result<(), StorageError> {
        #[cfg(test)]
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(StorageError::Sled(sled::Error::Io(std::io::Error::other(
                "injected: no space left on device",
            ))));
        }
        self.s()?.db.flush()?;
        Ok(())
    }

    fn s(&self) -> Result<&Sled, StorageError> {
        self.sled.as_ref().ok_or_else(|| StorageError::Closed(self.dir.clone()))
    }

    /// Opens sled afresh (after an I/O error) and reads everything back, checked.
    pub fn reopen(&mut self) -> Result<(), StorageError> {
        self.sled = None; // releases sled's lock on the directory
        self.sled = Some(Sled::open(&self.dir)?);
        self.reload()?;
        let mark = *self.watermark.lock().unwrap_or_else(|p| p.into_inner());
        self.check_watermark(Some(mark))
    }

    fn damaged(&self, what: String) -> StorageError {
        StorageError::Damaged { dir: self.dir.clone(), what }
    }

    /// A store below its watermark lost writes it had made durable.
    fn check_watermark(&self, mark: Option<Watermark>) -> Result<(), StorageError> {
        let Some(mark) = mark else { return Ok(()) };
        let core = self.view.rl();
        let (hs, last) = (&core.hard_state, core.last_index());
        if hs.term < mark.term || hs.commit < mark.commit || last < mark.commit {
            return Err(self.damaged(format!(
                "it holds term {}, commit {} and the log to {last}, but term {} and commit {} were made durable \
                 (acknowledged writes are missing)",
                hs.term, hs.commit, mark.term, mark.commit
            )));
        }
        Ok(())
    }

    /// Raises the watermark to `hs` (after `hs` was flushed).
    fn raise_watermark(&self, hs: &HardState) -> Result<(), StorageError> {
        let mut mark = self.watermark.lock().unwrap_or_else(|p| p.into_inner());
        if hs.term <= mark.term && hs.commit <= mark.commit {
            return Ok(());
        }
        *mark = Watermark { term: mark.term.max(hs.term), commit: mark.commit.max(hs.commit) };
        self.write_watermark(&mark)
    }

    /// A record's payload, or the damage its checksum shows.
    fn payload<'a>(&self, what: &str, record: &'a [u8]) -> Result<&'a [u8], StorageError> {
        unseal(record).ok_or_else(|| self.damaged(format!("the checksum of the {what} does not match its bytes")))
    }

    /// Writes a small record and flushes: whether the disk takes writes again.
    pub fn probe(&self) -> Result<(), StorageError> {
        self.s()?.meta.insert(b"probe", seal(b"probe"))?;
        self.flush()?;
        Ok(())
    }

    /// True when the store holds no Raft state at all (a fresh directory).
    pub fn is_fresh(&self) -> bool {
        let core = self.view.rl();
        core.conf_state.voters.is_empty() && core.conf_state.learners.is_empty() && core.last_index() == 0
    }

    /// Reads everything back, checking each record's checksum and that the log runs from the
    /// snapshot on without a gap.
    fn restore(&self, conf_state: &[u8]) -> Result<(), StorageError> {
        let mut core = self.view.wl();
        let conf_state = self.payload("membership", conf_state)?;
        core.conf_state = ConfState::parse_from_bytes(conf_state).map_err(|e| decode("conf state", e))?;
        if let Some(bytes) = self.s()?.meta.get(HARD_STATE)? {
            let bytes = self.payload("hard state", &bytes)?;
            core.hard_state = HardState::parse_from_bytes(bytes).map_err(|e| decode("hard state", e))?;
        }
        if let Some(bytes) = self.s()?.meta.get(SNAPSHOT)? {
            let bytes = self.payload("snapshot", &bytes)?;
            core.snapshot = Snapshot::parse_from_bytes(bytes).map_err(|e| decode("snapshot", e))?;
        }
        let first = core.snapshot_index() + 1;
        for kv in self.s()?.log.range(first.to_be_bytes()..) {
            let (key, bytes) = kv?;
            let index = key.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            let bytes = self.payload(&format!("log entry {index}"), &bytes)?;
            let entry = Entry::parse_from_bytes(bytes).map_err(|e| decode(&format!("entry {index}"), e))?;
            let expected = core.last_index() + 1;
            if entry.index != expected || index != expected {
                return Err(self.damaged(format!("the log skips from index {} to {index}", expected - 1)));
            }
            core.entries.push(entry);
        }
        Ok(())
    }

    /// Reads the in-memory image again from sled (after a failed write, sled and the image
    /// may differ on what never became durable).
    pub fn reload(&self) -> Result<(), StorageError> {
        *self.view.wl() = Core::default();
        match self.s()?.meta.get(CONF_STATE)? {
            Some(bytes) => self.restore(&bytes),
            None => Ok(()),
        }
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
            for kv in self.s()?.log.range(first.index.to_be_bytes()..) {
                batch.remove(kv?.0);
            }
            for e in entries {
                batch.insert(&e.index.to_be_bytes(), seal(&e.write_to_bytes().map_err(|err| decode("entry", err))?));
            }
            self.s()?.log.apply_batch(batch)?;
        }
        if let Some(hs) = hard_state {
            self.s()?.meta.insert(HARD_STATE, seal(&hs.write_to_bytes().map_err(|e| decode("hard state", e))?))?;
        }
        self.flush()?;
        if let Some(hs) = hard_state {
            self.raise_watermark(hs)?;
        }
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
        self.s()?.meta.insert(CONF_STATE, seal(&cs.write_to_bytes().map_err(|e| decode("conf state", e))?))?;
        self.flush()?;
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
        self.s()?.meta.insert(SNAPSHOT, seal(&snapshot.write_to_bytes().map_err(|e| decode("snapshot", e))?))?;
        self.s()?.meta.insert(HARD_STATE, seal(&hs.write_to_bytes().map_err(|e| decode("hard state", e))?))?;
        if upto.is_none() {
            let cs = meta.get_conf_state();
            self.s()?.meta.insert(CONF_STATE, seal(&cs.write_to_bytes().map_err(|e| decode("conf state", e))?))?;
        }
        self.flush()?;
        self.raise_watermark(hs)?;
        let mut batch = sled::Batch::default();
        let keys = match upto {
            Some(index) => self.s()?.log.range(..=index.to_be_bytes()),
            None => self.s()?.log.range::<&[u8], _>(..),
        };
        for kv in keys {
            batch.remove(kv?.0);
        }
        self.s()?.log.apply_batch(batch)?;
        self.flush()?;
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
    fn a_store_is_one_replicas_own() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = DurableLog::open(dir.path(), &[1, 2, 3]).unwrap();
            log.claim(2).unwrap();
            log.claim(2).unwrap();
        }
        let log = DurableLog::open(dir.path(), &[1, 2, 3]).unwrap();
        log.claim(2).expect("its own replica, again after a restart");
        let err = log.claim(3).expect_err("another replica is refused");
        assert!(matches!(err, StorageError::OtherReplica { found: 2, id: 3, .. }), "{err}");
        assert!(err.to_string().contains("belongs to replica 2"), "{err}");
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

    /// Entries 1..=n, each persisted with the commit moved to it (as a replica's Readys do).
    fn committed_log(dir: &Path, n: u64) {
        let log = DurableLog::open(dir, &[1]).unwrap();
        for i in 1..=n {
            let hs = HardState { term: 1, vote: 1, commit: i, ..Default::default() };
            log.persist(&[entry(i, 1)], Some(&hs)).unwrap();
        }
    }

    #[test]
    fn a_record_whose_bytes_changed_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        committed_log(dir.path(), 5);
        {
            let db = open_sled(dir.path()).unwrap();
            let tree = db.open_tree("raft_log").unwrap();
            let mut record = tree.get(2u64.to_be_bytes()).unwrap().unwrap().to_vec();
            *record.last_mut().unwrap() ^= 0x40;
            tree.insert(2u64.to_be_bytes(), record).unwrap();
            db.flush().unwrap();
        }
        let err = DurableLog::open(dir.path(), &[]).err().expect("damage is refused");
        assert!(matches!(err, StorageError::Damaged { .. }), "{err}");
        assert!(err.to_string().contains("log entry 2"), "{err}");
    }

    #[test]
    fn a_lost_watermark_copy_is_written_again_and_losing_both_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        committed_log(dir.path(), 5);
        let [first, copy] = WATERMARK_FILES.map(|f| dir.path().join(f));
        std::fs::remove_file(&first).unwrap();
        drop(DurableLog::open(dir.path(), &[]).expect("one copy left: checked against it"));
        assert_eq!(Watermark::read(&first).unwrap(), Watermark::read(&copy).unwrap(), "the lost copy is back");
        assert_eq!(Watermark::read(&copy).unwrap(), Some(Watermark { term: 1, commit: 5 }));

        // With one copy left, a store that lost writes is still caught.
        std::fs::remove_file(&copy).unwrap();
        {
            let db = open_sled(dir.path()).unwrap();
            let (log, meta) = (db.open_tree("raft_log").unwrap(), db.open_tree("raft_meta").unwrap());
            log.remove(5u64.to_be_bytes()).unwrap();
            let hs = HardState { term: 1, vote: 1, commit: 4, ..Default::default() };
            meta.insert(HARD_STATE, seal(&hs.write_to_bytes().unwrap())).unwrap();
            db.flush().unwrap();
        }
        let err = DurableLog::open(dir.path(), &[]).err().expect("the loss is refused with one copy");
        assert!(err.to_string().contains("commit 5 were made durable"), "{err}");

        // Neither copy: whether writes were lost cannot be told.
        std::fs::remove_file(&first).unwrap();
        let _ = std::fs::remove_file(&copy);
        let err = DurableLog::open(dir.path(), &[]).err().expect("an unverifiable store is refused");
        assert!(matches!(err, StorageError::Unverified(_)), "{err}");
        assert!(err.to_string().contains("--accept-unverified-store"), "{err}");
        DurableLog::open_with(dir.path(), &[], true).expect("started when the operator accepts it");
    }

    #[test]
    fn a_fresh_store_writes_both_copies_at_once() {
        let dir = tempfile::tempdir().unwrap();
        drop(DurableLog::open(dir.path(), &[1]).unwrap());
        for f in WATERMARK_FILES {
            assert_eq!(Watermark::read(&dir.path().join(f)).unwrap(), Some(Watermark::default()), "{f}");
        }
    }

    #[test]
    fn a_store_that_lost_acknowledged_writes_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        committed_log(dir.path(), 5);
        {
            // What sled does with a damaged tail: the last writes are gone, the rest is consistent.
            let db = open_sled(dir.path()).unwrap();
            let (log, meta) = (db.open_tree("raft_log").unwrap(), db.open_tree("raft_meta").unwrap());
            log.remove(4u64.to_be_bytes()).unwrap();
            log.remove(5u64.to_be_bytes()).unwrap();
            let hs = HardState { term: 1, vote: 1, commit: 3, ..Default::default() };
            meta.insert(HARD_STATE, seal(&hs.write_to_bytes().unwrap())).unwrap();
            db.flush().unwrap();
        }
        let err = DurableLog::open(dir.path(), &[]).err().expect("the loss is refused");
        assert!(err.to_string().contains("commit 5 were made durable"), "{err}");
    }

    #[test]
    fn a_gap_in_the_log_is_refused_and_unsealed_records_still_read() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Records as versions before sealing wrote them.
            let db = open_sled(dir.path()).unwrap();
            let (log, meta) = (db.open_tree("raft_log").unwrap(), db.open_tree("raft_meta").unwrap());
            meta.insert(CONF_STATE, ConfState::from((vec![1], vec![])).write_to_bytes().unwrap()).unwrap();
            for i in [1u64, 2, 4] {
                log.insert(i.to_be_bytes(), entry(i, 1).write_to_bytes().unwrap()).unwrap();
            }
            db.flush().unwrap();
        }
        let err = DurableLog::open(dir.path(), &[]).err().expect("a gap is damage");
        assert!(err.to_string().contains("skips from index 2 to 4"), "{err}");
        open_sled(dir.path()).unwrap().open_tree("raft_log").unwrap().remove(4u64.to_be_bytes()).unwrap();
        // Those versions wrote no watermark either: such a store starts only when accepted.
        let err = DurableLog::open(dir.path(), &[]).err().expect("no watermark, no start");
        assert!(matches!(err, StorageError::Unverified(_)), "{err}");
        let log = DurableLog::open_with(dir.path(), &[], true).unwrap();
        assert_eq!(log.view.last_index().unwrap(), 2, "unsealed records read as they are");
    }

    /// The damage the issue reported: random bytes over the last 8–64 KiB of a stopped
    /// replica's `db` file. The store either refuses to open or holds every committed entry.
    #[test]
    fn random_bytes_over_the_tail_never_start_a_store_without_its_writes() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut refused = 0;
        for kib in [8u64, 16, 32, 64, 8, 16, 32, 64] {
            let dir = tempfile::tempdir().unwrap();
            committed_log(dir.path(), 300);
            let path = dir.path().join("db");
            let len = std::fs::metadata(&path).unwrap().len();
            let n = (kib * 1024).min(len);
            let noise: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            std::fs::OpenOptions::new().write(true).open(&path).unwrap().write_all_at(&noise, len - n).unwrap();
            match DurableLog::open(dir.path(), &[]) {
                Err(e) => {
                    eprintln!("{kib} KiB: {e}");
                    refused += 1
                }
                Ok(log) => {
                    assert!(log.hard_state().commit >= 300, "{kib} KiB: started without committed writes");
                    assert_eq!(log.view.last_index().unwrap(), 300, "{kib} KiB");
                }
            }
        }
        eprintln!("{refused} of 8 damaged stores refused (the others lost nothing)");
    }
}
