//! Request and response bodies of the admin API. The CLI reads the same types.

use rampart_raft::command::{ApiRole, ModuleKind, NodeAdmin, NodeRole};
use rampart_raft::NodeId;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable machine-readable code (`bad_request`, `unauthorized`, ...).
    pub error: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub node: String,
    pub status: String,
}

/// The cluster as the answering node sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Name of the node that answered.
    pub node: String,
    pub initialized: bool,
    /// Raft role of the answering node: Leader, Follower, Candidate or Learner.
    pub raft_state: String,
    pub leader: Option<String>,
    pub term: u64,
    pub commit_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub last_log_index: Option<u64>,
    /// Last log index covered by this node's snapshot.
    pub snapshot_index: Option<u64>,
    /// Last log index purged from this node's log (covered by the snapshot).
    pub purged_index: Option<u64>,
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub name: String,
    pub raft_addr: String,
    pub api_addr: String,
    /// Voter in the current Raft membership (a learner otherwise).
    pub voter: bool,
    pub leader: bool,
    /// From the node's record: voter or witness (absent until the record is committed).
    pub role: Option<NodeRole>,
    pub admin: Option<NodeAdmin>,
    /// Addresses per heartbeat LAN, `lan=addr`.
    pub lans: Vec<String>,
    /// Highest log index known replicated to this member; only when the answering
    /// node is the leader.
    pub matched_index: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleSummary {
    pub name: String,
    pub kind: ModuleKind,
    pub digest: String,
    /// Names of the nodes the module is started on.
    pub started_on: Vec<String>,
    pub failover: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    /// Raft address (`host:port`) of any member of the cluster to join.
    pub seed: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewToken {
    pub name: String,
    pub role: ApiRole,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenSummary {
    pub name: String,
    pub role: ApiRole,
}

/// Returned once, when a token is created: the token itself is never stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedToken {
    pub name: String,
    pub role: ApiRole,
    pub token: String,
}

/// Where a write landed in the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Committed {
    pub log_index: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterValue {
    pub key: String,
    /// `None` when the register was never written.
    pub value: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterWrite {
    pub value: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterCas {
    pub expected: Option<u64>,
    pub new: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleDetail {
    pub name: String,
    pub kind: ModuleKind,
    pub digest: String,
    /// Earlier package versions kept, newest first.
    pub previous_digests: Vec<String>,
    pub failover: bool,
    /// Names of the nodes the module is started on.
    pub started_on: Vec<String>,
    /// Settings of the package's configuration that were accepted but mean nothing
    /// here, each with the reason (filled when a package is installed or edited).
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogPage {
    pub entries: Vec<crate::module::log::LogEntry>,
    /// Pass as `offset` to read on.
    pub next_offset: usize,
}
