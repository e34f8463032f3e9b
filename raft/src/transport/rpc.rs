//! Messages on the node-to-node channel: one [`Rpc`] per request frame, one
//! [`RpcReply`] per reply frame, encoded with [`crate::codec`].

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandResponse, NodeRecord};
use crate::types::{NodeId, NodeInfo, TypeConfig};

#[derive(Debug, Serialize, Deserialize)]
pub enum Rpc {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// Something only the leader can do; a non-leader answers with
    /// [`LeaderError::NotLeader`] naming the leader it knows.
    Leader(LeaderOp),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LeaderOp {
    /// Commit a command; sent by a node that received a write.
    Write(Command),
    /// Make the described node a voting member; sent by the joining node.
    Join { record: NodeRecord, info: NodeInfo },
    /// Remove a member from the voters and forget its record.
    Remove { id: NodeId },
    /// Read a register after confirming leadership (a linearizable read).
    ReadRegister { key: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaderReply {
    Written(WriteReceipt),
    MembershipChanged,
    Register(Option<u64>),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RpcReply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Leader(Result<LeaderReply, LeaderError>),
}

/// What the leader answers once a forwarded command is committed and applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteReceipt {
    pub log_index: u64,
    pub response: CommandResponse,
}

/// Why a request that needs the leader did not go through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum LeaderError {
    /// This node is not the leader; `leader` is the one it knows of, if any.
    #[error("not the leader (leader: {})", leader.as_ref().map_or("unknown".to_string(), |l| l.name.clone()))]
    NotLeader { leader: Option<NodeInfo> },
    /// The request is invalid; retrying will not help.
    #[error("{0}")]
    Invalid(String),
    /// The leader tried and failed (lost leadership, timeout, storage...).
    #[error("{0}")]
    Failed(String),
}
