//! Rampart's replicated control plane, as a library that knows no disk and no node agent.
//!
//! - [`types`]: the openraft type configuration and node identity.
//! - [`command`]: everything that can be written to the Raft log, and the replies.
//! - [`state`]: the cluster state machine; `apply` is a pure, deterministic function.
//! - [`codec`]: the one place that chooses the binary encoding (log entries, snapshots, wire).
//! - [`transport`]: the authenticated node-to-node channel and the Raft RPCs over it.
#![allow(clippy::result_large_err)]

pub mod codec;
pub mod command;
pub mod state;
pub mod transport;
pub mod types;

pub use command::{Command, CommandResponse};
pub use state::ClusterState;
pub use types::{node_id_for_name, validate_name, NodeId, NodeInfo, Raft, TypeConfig};
