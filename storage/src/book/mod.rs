//! Replication bookkeeping of one mirrored directory, in its own RocksDB database.
//!
//! What must survive a crash of either node so that reintegration never scans what did
//! not change (DESIGN "Mirror data plane"):
//!
//! - **intent** marks: zones (and namespace paths) with a change in flight — recorded
//!   *before* the local apply, cleared lazily once the peer durably holds the change.
//!   A node that crashed as PRIM must have these overwritten when it returns.
//! - **dirty** marks: zones and paths changed while the peer was absent, not
//!   acknowledging, or failed to apply them. Cleared one by one as reintegration lands.
//! - the **journal**: renames and hard links made while the peer was absent, replayed
//!   first on reintegration so that renamed data is moved, not copied.
//! - the **sync point**: the id of the last state both copies shared; incremental
//!   reintegration is allowed only between copies holding the same one.
//!
//! A zone is `zone_size` bytes of one file (the size is the engine's setting). Paths are
//! relative to the replicated directory, `/`-separated bytes without NUL; the empty
//! path is the directory itself.
//!
//! Durability: every method that *adds* marks, moves them, or records the sync point has
//! them on disk (WAL synced) when it returns; clearing is not synced (a lost clear only
//! resends a zone), except as part of adopting a sync point, which is one synced write.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rocksdb::statistics::{StatsLevel, Ticker};
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, DB};
use serde::{Deserialize, Serialize};

use crate::db::{cf, synced};

const CF_INTENT: &str = "intent";
const CF_DIRTY: &str = "dirty";
const CF_JOURNAL: &str = "journal";
const CF_META: &str = "meta";
const KEY_SYNC_POINT: &[u8] = b"sync_point";
/// The oldest mirror epoch this node accepts a PRIM of (SECOND's fence).
const KEY_MIN_EPOCH: &[u8] = b"min_epoch";
/// Files a failed sync covered on SECOND, to be removed before the next session.
const KEY_DAMAGED: &[u8] = b"damaged";
const KEY_JOURNAL_OVERFLOW: &[u8] = b"journal_overflow";

/// Journal entries kept at most; beyond, the journal is dropped and the next
/// reintegration compares both trees in full: marks alone cannot tell which data a
/// name holds on SECOND once renames are unknown.
pub const JOURNAL_LIMIT: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum BookError {
    #[error("cannot open the replication book at {path}: {source}")]
    Open {
        path: String,
        source: rocksdb::Error,
    },
    #[error("replication book i/o: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("replication book record is unreadable: {0}")]
    Corrupt(String),
}

/// Which set of marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkKind {
    Intent,
    Dirty,
}

impl MarkKind {
    fn family(self) -> &'static str {
        match self {
            MarkKind::Intent => CF_INTENT,
            MarkKind::Dirty => CF_DIRTY,
        }
    }
}

/// A set of marks: zones per file, and paths whose existence, type or attributes
/// changed. Ordered, so plans built from it are deterministic.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marks {
    pub zones: BTreeMap<Vec<u8>, BTreeSet<u64>>,
    pub paths: BTreeSet<Vec<u8>>,
}

impl Marks {
    pub fn is_empty(&self) -> bool {
        self.zones.is_empty() && self.paths.is_empty()
    }

    pub fn zone_count(&self) -> usize {
        self.zones.values().map(BTreeSet::len).sum()
    }

    pub fn add_zone(&mut self, path: &[u8], zone: u64) {
        self.zones.entry(path.to_vec()).or_default().insert(zone);
    }

    pub fn add_path(&mut self, path: &[u8]) {
        self.paths.insert(path.to_vec());
    }

    /// Adds every mark of `other`.
    pub fn extend(&mut self, other: &Marks) {
        for (path, zones) in &other.zones {
            self.zones
                .entry(path.clone())
                .or_default()
                .extend(zones.iter().copied());
        }
        self.paths.extend(other.paths.iter().cloned());
    }

    /// Removes every mark of `other`.
    pub fn remove(&mut self, other: &Marks) {
        for (path, zones) in &other.zones {
            if let Some(known) = self.zones.get_mut(path) {
                zones.iter().for_each(|zone| {
                    known.remove(zone);
                });
                if known.is_empty() {
                    self.zones.remove(path);
                }
            }
        }
        for path in &other.paths {
            self.paths.remove(path);
        }
    }

    /// These marks without those of `other`.
    pub fn without(&self, other: &Marks) -> Marks {
        let mut rest = self.clone();
        rest.remove(other);
        rest
    }
}

/// A namespace change that moves data, replayed on reintegration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JournalEntry {
    /// `renameat2(from, to, flags)`.
    Rename {
        from: Vec<u8>,
        to: Vec<u8>,
        flags: u32,
    },
    /// A new hard link `to` of `from`.
    Link { from: Vec<u8>, to: Vec<u8> },
}

/// The last state both copies shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncPoint {
    /// Random, fresh at every completed synchronisation.
    pub id: u128,
    /// Mirror epoch under which it was reached.
    pub epoch: u64,
}

/// The bookkeeping database of one mirrored directory on one node.
pub struct ReplicationBook {
    db: DB,
    /// The options it was opened with, which hold its statistics.
    options: Options,
}

fn zone_key(path: &[u8], zone: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(path.len() + 9);
    key.extend_from_slice(path);
    key.push(0);
    key.extend_from_slice(&zone.to_be_bytes());
    key
}

/// Path marks are keyed by the path alone: no NUL, so they never collide with zones.
fn split_key(key: &[u8]) -> Result<(Vec<u8>, Option<u64>), BookError> {
    match key.iter().position(|b| *b == 0) {
        None => Ok((key.to_vec(), None)),
        Some(nul) => {
            let zone: [u8; 8] = key[nul + 1..]
                .try_into()
                .map_err(|_| BookError::Corrupt("zone key is not path\\0u64".into()))?;
            Ok((key[..nul].to_vec(), Some(u64::from_be_bytes(zone))))
        }
    }
}

/// True when `path` is `root` or lies under it.
pub fn is_within(path: &[u8], root: &[u8]) -> bool {
    root.is_empty()
        || (path.starts_with(root) && (path.len() == root.len() || path[root.len()] == b'/'))
}

/// `path` with its leading `from` replaced by `to` (`path` must be within `from`).
pub fn reroot(path: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut moved = to.to_vec();
    let rest = &path[from.len()..];
    if to.is_empty() {
        moved.extend_from_slice(rest.strip_prefix(b"/").unwrap_or(rest));
    } else {
        moved.extend_from_slice(rest);
    }
    moved
}

impl ReplicationBook {
    /// Opens (creating if needed) the book at `path`.
    pub fn open(path: &Path) -> Result<Self, BookError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_max_open_files(128);
        options.set_keep_log_file_num(4);
        options.enable_statistics();
        options.set_statistics_level(StatsLevel::ExceptTimers);
        let families = [CF_INTENT, CF_DIRTY, CF_JOURNAL, CF_META]
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
        let db = DB::open_cf_descriptors(&options, path, families).map_err(|source| {
            BookError::Open {
                path: path.display().to_string(),
                source,
            }
        })?;
        Ok(ReplicationBook { db, options })
    }

    /// How many times the book synced its write-ahead log since it was opened: a synced
    /// write costs one, and concurrent synced writes share one (RocksDB writes them as
    /// a group).
    pub fn wal_syncs(&self) -> u64 {
        self.options.get_ticker_count(Ticker::WalFileSynced)
    }

    /// Opens an existing book for reading only, also while the node that owns it runs
    /// (no lock is taken): what it shows is the book as of the moment of opening.
    pub fn open_read_only(path: &Path) -> Result<Self, BookError> {
        let families = [CF_INTENT, CF_DIRTY, CF_JOURNAL, CF_META];
        let options = Options::default();
        let db = DB::open_cf_for_read_only(&options, path, families, false).map_err(|source| {
            BookError::Open {
                path: path.display().to_string(),
                source,
            }
        })?;
        Ok(ReplicationBook { db, options })
    }

    /// Records marks; on disk when this returns.
    pub fn add(&self, kind: MarkKind, marks: &Marks) -> Result<(), BookError> {
        if marks.is_empty() {
            return Ok(());
        }
        let family = cf(&self.db, kind.family());
        let mut batch = WriteBatch::default();
        for (path, zones) in &marks.zones {
            for zone in zones {
                batch.put_cf(family, zone_key(path, *zone), []);
            }
        }
        for path in &marks.paths {
            batch.put_cf(family, path, []);
        }
        Ok(self.db.write_opt(batch, &synced())?)
    }

    /// Forgets marks. Not synced: a clear lost in a crash only resends data.
    pub fn clear(&self, kind: MarkKind, marks: &Marks) -> Result<(), BookError> {
        if marks.is_empty() {
            return Ok(());
        }
        let family = cf(&self.db, kind.family());
        let mut batch = WriteBatch::default();
        for (path, zones) in &marks.zones {
            for zone in zones {
                batch.delete_cf(family, zone_key(path, *zone));
            }
        }
        for path in &marks.paths {
            batch.delete_cf(family, path);
        }
        Ok(self.db.write(batch)?)
    }

    /// Every mark of one kind.
    pub fn marks(&self, kind: MarkKind) -> Result<Marks, BookError> {
        Ok(self.marks_within(kind, usize::MAX)?.unwrap_or_default())
    }

    /// The marks of `kind`, unless their keys take more than `budget` bytes: then
    /// `None`, having read only about that much (a book can hold millions).
    pub fn marks_within(&self, kind: MarkKind, budget: usize) -> Result<Option<Marks>, BookError> {
        let mut marks = Marks::default();
        let mut used = 0;
        for item in self
            .db
            .iterator_cf(cf(&self.db, kind.family()), IteratorMode::Start)
        {
            let (key, _) = item?;
            used = key.len().saturating_add(used);
            if used > budget {
                return Ok(None);
            }
            match split_key(&key)? {
                (path, Some(zone)) => marks.add_zone(&path, zone),
                (path, None) => marks.add_path(&path),
            }
        }
        Ok(Some(marks))
    }

    /// Moves every intent into the dirty set (the peer stopped acknowledging: what was
    /// in flight may never have reached it). On disk when this returns.
    pub fn intents_to_dirty(&self) -> Result<Marks, BookError> {
        let intents = self.marks(MarkKind::Intent)?;
        if intents.is_empty() {
            return Ok(intents);
        }
        let (intent, dirty) = (cf(&self.db, CF_INTENT), cf(&self.db, CF_DIRTY));
        let mut batch = WriteBatch::default();
        for item in self.db.iterator_cf(intent, IteratorMode::Start) {
            let (key, _) = item?;
            batch.put_cf(dirty, &key, []);
            batch.delete_cf(intent, &key);
        }
        self.db.write_opt(batch, &synced())?;
        Ok(intents)
    }

    /// Renames the marks of `from` and everything under it to `to`, in both sets, so
    /// that marks follow the data. On disk when this returns.
    pub fn rename(&self, from: &[u8], to: &[u8]) -> Result<(), BookError> {
        self.reroot_marks(from, to, false)
    }

    /// Copies the marks of `from` and everything under it to `to`, in both sets: taken
    /// before a rename is applied, so that a crash before [`ReplicationBook::rename`]
    /// still finds the data's marks under the name it has by then. On disk when this
    /// returns.
    pub fn copy_marks(&self, from: &[u8], to: &[u8]) -> Result<(), BookError> {
        self.reroot_marks(from, to, true)
    }

    fn reroot_marks(&self, from: &[u8], to: &[u8], keep: bool) -> Result<(), BookError> {
        let mut batch = WriteBatch::default();
        for kind in [MarkKind::Intent, MarkKind::Dirty] {
            let family = cf(&self.db, kind.family());
            let iter = self
                .db
                .iterator_cf(family, IteratorMode::From(from, Direction::Forward));
            for item in iter {
                let (key, _) = item?;
                if !key.starts_with(from) {
                    break;
                }
                let (path, zone) = split_key(&key)?;
                if !is_within(&path, from) {
                    continue;
                }
                let moved = reroot(&path, from, to);
                if !keep {
                    batch.delete_cf(family, &key);
                }
                match zone {
                    Some(zone) => batch.put_cf(family, zone_key(&moved, zone), []),
                    None => batch.put_cf(family, &moved, []),
                }
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        Ok(self.db.write_opt(batch, &synced())?)
    }

    /// Appends to the journal; on disk when this returns. Past [`JOURNAL_LIMIT`] the
    /// journal is dropped and marked overflowed ([`ReplicationBook::journal`]).
    pub fn journal_push(&self, entry: &JournalEntry) -> Result<(), BookError> {
        self.journal_push_within(entry, JOURNAL_LIMIT)
    }

    fn journal_push_within(&self, entry: &JournalEntry, limit: u64) -> Result<(), BookError> {
        let family = cf(&self.db, CF_JOURNAL);
        let next = match self.db.iterator_cf(family, IteratorMode::End).next() {
            Some(item) => {
                let (key, _) = item?;
                let seq: [u8; 8] = key[..]
                    .try_into()
                    .map_err(|_| BookError::Corrupt("journal key is not u64".into()))?;
                u64::from_be_bytes(seq) + 1
            }
            None => 0,
        };
        if next >= limit || self.journal_overflowed()? {
            self.journal_clear()?;
            return Ok(self.db.put_cf_opt(
                cf(&self.db, CF_META),
                KEY_JOURNAL_OVERFLOW,
                [1],
                &synced(),
            )?);
        }
        let bytes = bincode::serde::encode_to_vec(entry, bincode::config::standard())
            .expect("journal entries always encode");
        Ok(self
            .db
            .put_cf_opt(family, next.to_be_bytes(), bytes, &synced())?)
    }

    fn journal_overflowed(&self) -> Result<bool, BookError> {
        Ok(self
            .db
            .get_cf(cf(&self.db, CF_META), KEY_JOURNAL_OVERFLOW)?
            .is_some())
    }

    /// The journal in order; `None` when it overflowed, and some renames since the
    /// last sync point are unknown.
    pub fn journal(&self) -> Result<Option<Vec<JournalEntry>>, BookError> {
        if self.journal_overflowed()? {
            return Ok(None);
        }
        let mut entries = Vec::new();
        for item in self
            .db
            .iterator_cf(cf(&self.db, CF_JOURNAL), IteratorMode::Start)
        {
            let (_, value) = item?;
            let (entry, _) = bincode::serde::decode_from_slice(&value, bincode::config::standard())
                .map_err(|e| BookError::Corrupt(format!("journal entry: {e}")))?;
            entries.push(entry);
        }
        Ok(Some(entries))
    }

    /// Empties the journal (after it was replayed, or when the peer is in sync).
    pub fn journal_clear(&self) -> Result<(), BookError> {
        let family = cf(&self.db, CF_JOURNAL);
        let mut batch = WriteBatch::default();
        for item in self.db.iterator_cf(family, IteratorMode::Start) {
            let (key, _) = item?;
            batch.delete_cf(family, key);
        }
        batch.delete_cf(cf(&self.db, CF_META), KEY_JOURNAL_OVERFLOW);
        Ok(self.db.write_opt(batch, &synced())?)
    }

    pub fn sync_point(&self) -> Result<Option<SyncPoint>, BookError> {
        let Some(bytes) = self.db.get_cf(cf(&self.db, CF_META), KEY_SYNC_POINT)? else {
            return Ok(None);
        };
        let (point, _) = bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
            .map_err(|e| BookError::Corrupt(format!("sync point: {e}")))?;
        Ok(Some(point))
    }

    /// The oldest epoch SECOND accepts frames of; 0 when never fenced.
    pub fn min_epoch(&self) -> Result<u64, BookError> {
        match self.db.get_cf(cf(&self.db, CF_META), KEY_MIN_EPOCH)? {
            None => Ok(0),
            Some(bytes) => {
                let bytes: [u8; 8] = bytes[..]
                    .try_into()
                    .map_err(|_| BookError::Corrupt("min epoch is not a u64".into()))?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }

    /// Records the oldest epoch accepted; on disk when this returns. Never lowers it.
    pub fn raise_min_epoch(&self, epoch: u64) -> Result<u64, BookError> {
        let current = self.min_epoch()?;
        if epoch > current {
            self.db.put_cf_opt(
                cf(&self.db, CF_META),
                KEY_MIN_EPOCH,
                epoch.to_be_bytes(),
                &synced(),
            )?;
        }
        Ok(current.max(epoch))
    }

    /// The files SECOND recorded as damaged by a failed sync.
    pub fn damaged(&self) -> Result<Vec<Vec<u8>>, BookError> {
        let Some(bytes) = self.db.get_cf(cf(&self.db, CF_META), KEY_DAMAGED)? else {
            return Ok(Vec::new());
        };
        let (paths, _) = bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
            .map_err(|e| BookError::Corrupt(format!("damaged files: {e}")))?;
        Ok(paths)
    }

    /// Replaces the list of damaged files; on disk when this returns.
    pub fn set_damaged(&self, paths: &[Vec<u8>]) -> Result<(), BookError> {
        let family = cf(&self.db, CF_META);
        if paths.is_empty() {
            return Ok(self.db.delete_cf_opt(family, KEY_DAMAGED, &synced())?);
        }
        let bytes = bincode::serde::encode_to_vec(paths, bincode::config::standard())
            .expect("paths always encode");
        Ok(self.db.put_cf_opt(family, KEY_DAMAGED, bytes, &synced())?)
    }

    /// This copy now holds the state named `point`: forgets every mark of either kind
    /// (what it changed on its own has been overwritten) and records the point, in one
    /// write, on disk when this returns. Reads each set's first and last key, never
    /// the marks between (a book can hold millions).
    pub fn adopt_sync_point(&self, point: SyncPoint) -> Result<(), BookError> {
        let mut batch = WriteBatch::default();
        for kind in [MarkKind::Intent, MarkKind::Dirty] {
            let family = cf(&self.db, kind.family());
            let end = |mode| self.db.iterator_cf(family, mode).next().transpose();
            let (Some((first, _)), Some((last, _))) =
                (end(IteratorMode::Start)?, end(IteratorMode::End)?)
            else {
                continue;
            };
            // A range tombstone covers [first, last); the last key goes by itself.
            batch.delete_range_cf(family, &first, &last);
            batch.delete_cf(family, &last);
        }
        let bytes = bincode::serde::encode_to_vec(point, bincode::config::standard())
            .expect("sync points always encode");
        batch.put_cf(cf(&self.db, CF_META), KEY_SYNC_POINT, bytes);
        Ok(self.db.write_opt(batch, &synced())?)
    }

    /// Records (or with `None` forgets) the sync point; on disk when this returns.
    pub fn set_sync_point(&self, point: Option<SyncPoint>) -> Result<(), BookError> {
        let family = cf(&self.db, CF_META);
        match point {
            Some(point) => {
                let bytes = bincode::serde::encode_to_vec(point, bincode::config::standard())
                    .expect("sync points always encode");
                self.db
                    .put_cf_opt(family, KEY_SYNC_POINT, bytes, &synced())?
            }
            None => self.db.delete_cf_opt(family, KEY_SYNC_POINT, &synced())?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
