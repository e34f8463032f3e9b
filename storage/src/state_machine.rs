//! The applied cluster state and its snapshots.
//!
//! The state lives in memory ([`AppliedState`]); what is durable is the latest snapshot
//! (in RocksDB) plus the Raft log. After a restart the state is the stored snapshot,
//! and openraft re-applies the committed entries that follow it.

use std::io::Cursor;
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError};
use rampart_raft::codec;
use rampart_raft::types::{Entry, LogId, SnapshotMeta, StorageError, StoredMembership};
use rampart_raft::{ClusterState, CommandResponse, TypeConfig};
use rocksdb::DB;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::db::{cf, synced, CF_SNAPSHOT};

const KEY_SNAPSHOT: &[u8] = b"current";
const KEY_SNAPSHOT_SEQ: &[u8] = b"seq";

/// The state machine as of `last_applied`.
#[derive(Debug, Clone, Default)]
pub struct AppliedState {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
    pub cluster: ClusterState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    /// `codec`-encoded [`ClusterState`].
    data: Vec<u8>,
}

/// openraft's state machine. Clones share the state.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<DB>,
    state: Arc<RwLock<AppliedState>>,
    /// Index of the last applied entry, for tasks that react to changes.
    applied: watch::Sender<u64>,
}

/// A read-only handle on the applied state, for the node agent and its API.
#[derive(Clone)]
pub struct StateView {
    state: Arc<RwLock<AppliedState>>,
    applied: watch::Receiver<u64>,
}

impl StateView {
    /// Runs `f` on the current state. Keep `f` short: apply waits for it.
    pub fn read<T>(&self, f: impl FnOnce(&AppliedState) -> T) -> T {
        f(&self.state.read().expect("state lock is never poisoned"))
    }

    /// Notified each time entries are applied; the value is the last applied index.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }
}

fn snapshot_err(meta: Option<&SnapshotMeta>, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_snapshot(meta.map(|m| m.signature()), &e).into()
}

fn read_snapshot_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_snapshot(None, &e).into()
}

impl StateMachineStore {
    /// Loads the stored snapshot, if any, as the starting state.
    pub(crate) fn restore(db: Arc<DB>) -> Result<Self, String> {
        let mut state = AppliedState::default();
        if let Some(stored) = load_snapshot(&db).map_err(|e| e.to_string())? {
            state = AppliedState {
                last_applied: stored.meta.last_log_id,
                last_membership: stored.meta.last_membership.clone(),
                cluster: codec::decode(&stored.data).map_err(|e| e.to_string())?,
            };
        }
        let index = state.last_applied.map_or(0, |l| l.index);
        Ok(StateMachineStore {
            db,
            state: Arc::new(RwLock::new(state)),
            applied: watch::channel(index).0,
        })
    }

    pub fn view(&self) -> StateView {
        StateView {
            state: self.state.clone(),
            applied: self.applied.subscribe(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, AppliedState> {
        self.state.write().expect("state lock is never poisoned")
    }
}

fn load_snapshot(db: &DB) -> Result<Option<StoredSnapshot>, StorageError> {
    let bytes = db
        .get_cf(cf(db, CF_SNAPSHOT), KEY_SNAPSHOT)
        .map_err(read_snapshot_err)?;
    bytes
        .map(|b| codec::decode(&b).map_err(read_snapshot_err))
        .transpose()
}

/// Stores `snapshot` as the current one; on disk (synced) when this returns.
fn save_snapshot(db: &DB, snapshot: &StoredSnapshot) -> Result<(), StorageError> {
    let bytes = codec::encode(snapshot).map_err(|e| snapshot_err(Some(&snapshot.meta), e))?;
    db.put_cf_opt(cf(db, CF_SNAPSHOT), KEY_SNAPSHOT, bytes, &synced())
        .map_err(|e| snapshot_err(Some(&snapshot.meta), e))
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let state = self.state.read().expect("state lock is never poisoned");
        Ok((state.last_applied, state.last_membership.clone()))
    }

    /// Applies in memory. Durability comes from the log: entries applied here are
    /// committed, hence already synced by [`crate::LogStore::append`].
    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
    {
        let mut replies = Vec::new();
        let last = {
            let mut state = self.write();
            for entry in entries {
                state.last_applied = Some(entry.log_id);
                let reply = match entry.payload {
                    EntryPayload::Blank => CommandResponse::Applied,
                    EntryPayload::Normal(command) => state.cluster.apply(&command),
                    EntryPayload::Membership(membership) => {
                        state.last_membership =
                            StoredMembership::new(Some(entry.log_id), membership);
                        CommandResponse::Applied
                    }
                };
                replies.push(reply);
            }
            state.last_applied.map_or(0, |l| l.index)
        };
        self.applied.send_replace(last);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            state: self.state.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    /// Decodes and stores the snapshot (synced) before replacing the in-memory state,
    /// so a crash leaves either the old or the new state, never a mix.
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let cluster: ClusterState = codec::decode(&data).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e))
        })?;
        save_snapshot(
            &self.db,
            &StoredSnapshot {
                meta: meta.clone(),
                data,
            },
        )?;
        let index = {
            let mut state = self.write();
            *state = AppliedState {
                last_applied: meta.last_log_id,
                last_membership: meta.last_membership.clone(),
                cluster,
            };
            meta.last_log_id.map_or(0, |l| l.index)
        };
        self.applied.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(load_snapshot(&self.db)?.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

/// Builds a snapshot of the state as it is when [`RaftSnapshotBuilder::build_snapshot`]
/// runs.
pub struct SnapshotBuilder {
    db: Arc<DB>,
    state: Arc<RwLock<AppliedState>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    /// On disk (synced) when this returns.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (last_applied, last_membership, data) = {
            let state = self.state.read().expect("state lock is never poisoned");
            let data = codec::encode(&state.cluster).map_err(|e| snapshot_err(None, e))?;
            (state.last_applied, state.last_membership.clone(), data)
        };
        let seq = self.next_seq()?;
        let snapshot_id = match last_applied {
            Some(log_id) => format!("{}-{}-{seq}", log_id.leader_id, log_id.index),
            None => format!("--{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id,
        };
        save_snapshot(
            &self.db,
            &StoredSnapshot {
                meta: meta.clone(),
                data: data.clone(),
            },
        )?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl SnapshotBuilder {
    /// A per-node counter that makes snapshot ids unique even for the same log id.
    fn next_seq(&self) -> Result<u64, StorageError> {
        let column = cf(&self.db, CF_SNAPSHOT);
        let current = match self
            .db
            .get_cf(column, KEY_SNAPSHOT_SEQ)
            .map_err(read_snapshot_err)?
        {
            Some(bytes) => codec::decode::<u64>(&bytes).map_err(read_snapshot_err)?,
            None => 0,
        };
        let next = current + 1;
        let bytes = codec::encode(&next).map_err(|e| snapshot_err(None, e))?;
        self.db
            .put_cf(column, KEY_SNAPSHOT_SEQ, bytes)
            .map_err(|e| snapshot_err(None, e))?;
        Ok(next)
    }
}
