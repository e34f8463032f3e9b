//! The openraft type configuration and how nodes are identified.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandResponse};

/// Raft node id. Derived from the node's name (see [`node_id_for_name`]) so that every
/// node computes the same id for a name without coordination.
pub type NodeId = u64;

/// What Raft needs to reach a member: stored in every membership entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The operator's name for the node; unique in a cluster.
    pub name: String,
    /// `host:port` of the authenticated node-to-node transport (Raft RPCs).
    pub raft_addr: String,
    /// `host:port` of the admin HTTP API.
    pub api_addr: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (raft {}, api {})",
            self.name, self.raft_addr, self.api_addr
        )
    }
}

openraft::declare_raft_types!(
    /// Rampart's Raft types: the log carries [`Command`]s, snapshots are in-memory buffers.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeInfo>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeInfo>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, NodeInfo>;

/// The node id for a node name: the first 53 bits of its blake3 hash, so that ids are
/// stable across restarts and re-installs and survive JSON consumers that read numbers
/// as doubles.
pub fn node_id_for_name(name: &str) -> NodeId {
    let hash = blake3::hash(name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first) & ((1u64 << 53) - 1)
}

/// Checks a name of a node, module, token or register. Names end up in paths, XML
/// and URLs: 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'.
/// `what` names the kind of thing in the error.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} name '{name}': use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_stable_and_distinct() {
        assert_eq!(node_id_for_name("n1"), node_id_for_name("n1"));
        assert_ne!(node_id_for_name("n1"), node_id_for_name("n2"));
        assert!(node_id_for_name("n1") < 1u64 << 53);
    }
}
