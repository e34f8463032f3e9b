//! openraft's storage conformance suite on the RocksDB store, and a restart test.
// openraft's StorageError is large by its design; the suite returns it as is.
#![allow(clippy::result_large_err)]

use openraft::testing::{StoreBuilder, Suite};
use rampart_raft::types::StorageError;
use rampart_raft::TypeConfig;
use rampart_storage::{LogStore, StateMachineStore};
use tempfile::TempDir;

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = TempDir::new().expect("a temporary directory");
        let (log, sm) = rampart_storage::open(dir.path()).expect("a fresh database opens");
        Ok((dir, log, sm))
    }
}

#[test]
fn rocksdb_store_passes_openraft_conformance_suite() -> Result<(), StorageError> {
    Suite::test_all(RocksBuilder)
}

mod restart {
    use openraft::storage::{RaftLogStorage, RaftStateMachine};
    use openraft::{CommittedLeaderId, EntryPayload, RaftSnapshotBuilder};
    use rampart_raft::command::{LanAddress, NodeAdmin, NodeRecord, NodeRole};
    use rampart_raft::types::{Entry, LogId, Vote};
    use rampart_raft::{node_id_for_name, Command};

    fn upsert(index: u64, name: &str) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::UpsertNode(NodeRecord {
                id: node_id_for_name(name),
                name: name.into(),
                lans: vec![LanAddress {
                    lan: "default".into(),
                    addr: "127.0.0.1".into(),
                }],
                role: NodeRole::Voter,
                admin: NodeAdmin::Active,
            })),
        }
    }

    /// What was acknowledged before a stop is there after reopening: the vote, and the
    /// state as of the last snapshot. (Log entries surviving a kill -9 are shown by the
    /// cluster tests, where openraft drives `append`.)
    #[tokio::test]
    async fn a_reopened_store_has_its_vote_log_and_snapshot() {
        let dir = tempfile::TempDir::new().unwrap();
        {
            let (mut log, mut sm) = rampart_storage::open(dir.path()).unwrap();
            log.save_vote(&Vote::new(3, 1)).await.unwrap();
            sm.apply(vec![upsert(1, "a"), upsert(2, "b")])
                .await
                .unwrap();
            sm.get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
        }
        let (mut log, mut sm) = rampart_storage::open(dir.path()).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(2));
        let names: Vec<String> = sm
            .view()
            .read(|s| s.cluster.nodes.values().map(|n| n.name.clone()).collect());
        assert_eq!(names.len(), 2);
        assert!(names.contains(&"a".to_string()) && names.contains(&"b".to_string()));
    }
}
