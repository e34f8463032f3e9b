//! Everything that can be written to the Raft log, and what applying it answers.
//!
//! A command is a request to change the cluster state. Whether it is accepted is decided
//! by [`crate::state::ClusterState::apply`] on every node identically; a rejected command
//! is still a committed log entry, it just changes nothing.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// Number of hash buckets a farm module's traffic is split into.
pub const FARM_BUCKETS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Adds a node record, or replaces the record of the node with this id.
    UpsertNode(NodeRecord),
    /// Forgets a node. Refused while a module assignment still names it.
    RemoveNode {
        id: NodeId,
    },
    SetNodeAdmin {
        id: NodeId,
        admin: NodeAdmin,
    },
    /// Installs (or replaces) a module package. `digest` is the blake3 of `package`.
    InstallModule {
        name: String,
        kind: ModuleKind,
        digest: String,
        package: Vec<u8>,
    },
    UninstallModule {
        name: String,
    },
    /// Turns automatic failover of the module on or off.
    SetModuleFailover {
        name: String,
        failover: bool,
    },
    /// Starts or stops the module on one node (SafeKit's per-node start/stop). A light
    /// module runs on one node at a time: starting it on a second node is refused.
    SetModuleStarted {
        name: String,
        node: NodeId,
        started: bool,
    },
    SetModuleNodeEnabled {
        name: String,
        node: NodeId,
        enabled: bool,
    },
    /// A new mirror assignment; accepted only with an epoch above the current one.
    AssignMirror {
        module: String,
        assignment: MirrorAssignment,
    },
    /// A new farm bucket assignment; accepted only with an epoch above the current one.
    AssignFarm {
        module: String,
        assignment: FarmAssignment,
    },
    /// Records an operator request so that the controller acts on it exactly once.
    RecordIntent {
        module: String,
        request_id: String,
        intent: OperatorIntent,
    },
    ClearIntent {
        module: String,
        request_id: String,
    },
    /// Adds an API token. Only the blake3 hash of the token is stored.
    AddApiToken {
        name: String,
        role: ApiRole,
        token_hash: String,
    },
    RevokeApiToken {
        name: String,
    },
    /// Sets a register: a small cluster-wide value for operators' scripts, and the
    /// object of the control plane's linearizability tests.
    RegisterWrite {
        key: String,
        value: u64,
    },
    /// Sets a register to `new` only if it holds `expected` (`None`: absent).
    RegisterCas {
        key: String,
        expected: Option<u64>,
        new: u64,
    },
}

impl Command {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::UpsertNode(_) => "upsert_node",
            Command::RemoveNode { .. } => "remove_node",
            Command::SetNodeAdmin { .. } => "set_node_admin",
            Command::InstallModule { .. } => "install_module",
            Command::UninstallModule { .. } => "uninstall_module",
            Command::SetModuleFailover { .. } => "set_module_failover",
            Command::SetModuleStarted { .. } => "set_module_started",
            Command::SetModuleNodeEnabled { .. } => "set_module_node_enabled",
            Command::AssignMirror { .. } => "assign_mirror",
            Command::AssignFarm { .. } => "assign_farm",
            Command::RecordIntent { .. } => "record_intent",
            Command::ClearIntent { .. } => "clear_intent",
            Command::AddApiToken { .. } => "add_api_token",
            Command::RevokeApiToken { .. } => "revoke_api_token",
            Command::RegisterWrite { .. } => "register_write",
            Command::RegisterCas { .. } => "register_cas",
        }
    }
}

/// What applying one log entry answered. Deterministic: every node computes the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    Applied,
    /// The command was committed but changed nothing; the reason is for the requester.
    Rejected(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub name: String,
    /// One address per heartbeat LAN, in the order of cluster.xml.
    pub lans: Vec<LanAddress>,
    pub role: NodeRole,
    pub admin: NodeAdmin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LanAddress {
    pub lan: String,
    pub addr: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Votes and runs applications.
    Voter,
    /// Votes, runs no application: the third voter of a two-server cluster.
    Witness,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeAdmin {
    Active,
    /// Operator took the node out of service: it keeps voting but runs no module.
    Maintenance,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleKind {
    Mirror,
    Farm,
    Light,
}

/// Which node is PRIM and SECOND of a mirror module, decided under `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorAssignment {
    /// Strictly increasing per module; every side effect of this assignment carries it.
    pub epoch: u64,
    pub prim: Option<NodeId>,
    pub second: Option<NodeId>,
    /// Nodes whose copy holds every acknowledged write. Only these may be promoted.
    pub uptodate: BTreeSet<NodeId>,
    pub phase: SyncPhase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncPhase {
    /// PRIM and SECOND are synchronised; writes are acknowledged by both.
    Synced,
    /// SECOND is being brought up to date (reintegration).
    Resyncing,
    /// PRIM runs without a SECOND; only PRIM is up to date.
    Alone,
}

/// Owner of each hash bucket of a farm module, decided under `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FarmAssignment {
    /// Strictly increasing per module.
    pub epoch: u64,
    pub members_up: BTreeSet<NodeId>,
    /// `buckets[b]` owns bucket `b`; exactly [`FARM_BUCKETS`] entries, each owner in
    /// `members_up` (or `None` when no member is up).
    pub buckets: Vec<Option<NodeId>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperatorIntent {
    Swap,
    Prim { node: NodeId, fullsync: bool },
    Second { node: NodeId, fullsync: bool },
    PrimForce { node: NodeId },
    Stop { node: Option<NodeId> },
    Start { node: Option<NodeId> },
    Failover { on: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiRole {
    /// Reads state.
    Monitor,
    /// Reads state and runs module operations (start, stop, swap...).
    Control,
    /// Everything, including membership, packages and tokens.
    Admin,
}

impl ApiRole {
    pub fn allows(self, needed: ApiRole) -> bool {
        self >= needed
    }
}

impl std::str::FromStr for ApiRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "monitor" => Ok(ApiRole::Monitor),
            "control" => Ok(ApiRole::Control),
            "admin" => Ok(ApiRole::Admin),
            other => Err(format!(
                "unknown role '{other}': expected monitor, control or admin"
            )),
        }
    }
}
