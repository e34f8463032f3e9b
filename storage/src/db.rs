//! Opening the node's RocksDB database.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, DB};

use crate::log_store::LogStore;
use crate::state_machine::StateMachineStore;

/// Raft log entries, keyed by big-endian log index so that keys sort by index.
pub(crate) const CF_LOG: &str = "raft_log";
/// Small Raft records: vote, last purged log id, committed log id.
pub(crate) const CF_RAFT_META: &str = "raft_meta";
/// The current state machine snapshot.
pub(crate) const CF_SNAPSHOT: &str = "snapshot";

const COLUMN_FAMILIES: [&str; 3] = [CF_LOG, CF_RAFT_META, CF_SNAPSHOT];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database at {path}: {source}")]
    Open {
        path: String,
        source: rocksdb::Error,
    },
    #[error("the stored snapshot in {path} is unreadable: {reason}")]
    CorruptSnapshot { path: String, reason: String },
}

/// Opens (creating if needed) the database at `path` and returns the two openraft
/// stores that share it.
pub fn open(path: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    // Small records, few of them: keep the footprint small.
    options.set_max_open_files(256);
    options.set_keep_log_file_num(4);
    let families = COLUMN_FAMILIES
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
    let db =
        DB::open_cf_descriptors(&options, path, families).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
    let db = Arc::new(db);
    let state_machine =
        StateMachineStore::restore(db.clone()).map_err(|reason| StoreError::CorruptSnapshot {
            path: path.display().to_string(),
            reason,
        })?;
    Ok((LogStore::new(db), state_machine))
}

/// Handle of a column family that [`open`] created.
pub(crate) fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name)
        .expect("open() creates every column family")
}

/// Write options for records that must be on disk when the call returns.
pub(crate) fn synced() -> rocksdb::WriteOptions {
    let mut options = rocksdb::WriteOptions::default();
    options.set_sync(true);
    options
}
