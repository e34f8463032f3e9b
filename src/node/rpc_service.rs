//! Answers node-to-node RPCs: Raft's own, and the leader operations.

use std::sync::Arc;

use rampart_raft::transport::{Rpc, RpcHandler, RpcReply};

use super::NodeContext;

pub struct RpcService {
    context: Arc<NodeContext>,
}

impl RpcService {
    pub fn new(context: Arc<NodeContext>) -> Self {
        RpcService { context }
    }
}

impl RpcHandler for RpcService {
    async fn handle(&self, rpc: Rpc) -> RpcReply {
        let raft = &self.context.raft;
        match rpc {
            Rpc::AppendEntries(request) => {
                RpcReply::AppendEntries(raft.append_entries(request).await)
            }
            Rpc::Vote(request) => RpcReply::Vote(raft.vote(request).await),
            Rpc::InstallSnapshot(request) => {
                RpcReply::InstallSnapshot(raft.install_snapshot(request).await)
            }
            Rpc::Leader(op) => RpcReply::Leader(self.context.handle_as_leader(op).await),
        }
    }
}
