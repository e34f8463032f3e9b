//! Client side of the transport: openraft's [`RaftNetworkFactory`] and one-shot calls.

use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::channel::{ChannelError, ClusterKey, SecureChannel};
use super::rpc::{Rpc, RpcReply};
use crate::codec;
use crate::types::{NodeId, NodeInfo, TypeConfig};

/// How long connecting and authenticating may take before a peer counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach {addr}: {source}")]
    Connect { addr: String, source: ChannelError },
    #[error("{addr}: {source}")]
    Channel { addr: String, source: ChannelError },
    #[error("{addr}: no reply within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("{addr}: undecodable reply: {source}")]
    Codec {
        addr: String,
        source: codec::CodecError,
    },
}

impl CallError {
    pub fn is_authentication(&self) -> bool {
        match self {
            CallError::Connect { source, .. } | CallError::Channel { source, .. } => {
                source.is_authentication()
            }
            _ => false,
        }
    }
}

/// A connection to one peer, opened lazily and re-opened after any failure.
pub struct PeerConnection {
    addr: String,
    key: ClusterKey,
    channel: Option<SecureChannel>,
}

impl PeerConnection {
    pub fn new(addr: String, key: ClusterKey) -> Self {
        PeerConnection {
            addr,
            key,
            channel: None,
        }
    }

    /// Sends `rpc` and waits for its reply, all within `timeout`. On any failure the
    /// connection is dropped, so the next call starts from a fresh handshake.
    pub async fn call(&mut self, rpc: &Rpc, timeout: Duration) -> Result<RpcReply, CallError> {
        let addr = self.addr.clone();
        let request = codec::encode(rpc).map_err(|source| CallError::Codec {
            addr: addr.clone(),
            source,
        })?;
        if self.channel.is_none() {
            let channel =
                SecureChannel::connect(&self.addr, &self.key, CONNECT_TIMEOUT.min(timeout))
                    .await
                    .map_err(|source| CallError::Connect {
                        addr: addr.clone(),
                        source,
                    })?;
            self.channel = Some(channel);
        }
        let channel = self.channel.as_mut().expect("connected just above");
        let exchange = async {
            channel.send(request).await?;
            channel.recv().await
        };
        let result = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => Err(CallError::Timeout {
                addr: addr.clone(),
                timeout,
            }),
            Ok(Err(source)) => Err(CallError::Channel {
                addr: addr.clone(),
                source,
            }),
            Ok(Ok(bytes)) => codec::decode(&bytes).map_err(|source| CallError::Codec {
                addr: addr.clone(),
                source,
            }),
        };
        if result.is_err() {
            self.channel = None;
        }
        result
    }
}

/// One request to `addr` on a fresh connection.
pub async fn call(
    addr: &str,
    key: &ClusterKey,
    rpc: &Rpc,
    timeout: Duration,
) -> Result<RpcReply, CallError> {
    PeerConnection::new(addr.to_string(), key.clone())
        .call(rpc, timeout)
        .await
}

/// openraft's network factory: one [`RaftPeer`] per replication target.
#[derive(Clone)]
pub struct Network {
    key: ClusterKey,
}

impl Network {
    pub fn new(key: ClusterKey) -> Self {
        Network { key }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = RaftPeer;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Self::Network {
        RaftPeer {
            target,
            connection: PeerConnection::new(node.raft_addr.clone(), self.key.clone()),
        }
    }
}

pub struct RaftPeer {
    target: NodeId,
    connection: PeerConnection,
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

impl RaftPeer {
    async fn exchange<E: std::error::Error>(
        &mut self,
        rpc: Rpc,
        option: &RPCOption,
    ) -> Result<RpcReply, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>> {
        match self.connection.call(&rpc, option.hard_ttl()).await {
            Ok(reply) => Ok(reply),
            // Unreachable makes openraft back off instead of retrying at once.
            Err(e @ CallError::Connect { .. }) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    fn remote<T, E: std::error::Error>(
        &self,
        result: Result<T, RaftError<NodeId, E>>,
    ) -> Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>> {
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

fn unexpected<E: std::error::Error>(
    reply: &RpcReply,
) -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
    let message = format!("unexpected reply to a Raft request: {reply:?}");
    RPCError::Network(NetworkError::new(&std::io::Error::other(message)))
}

impl RaftNetwork<TypeConfig> for RaftPeer {
    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        match self.exchange(Rpc::AppendEntries(request), &option).await? {
            RpcReply::AppendEntries(result) => self.remote(result),
            other => Err(unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        request: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self
            .exchange(Rpc::InstallSnapshot(request), &option)
            .await?
        {
            RpcReply::InstallSnapshot(result) => self.remote(result),
            other => Err(unexpected(&other)),
        }
    }

    async fn vote(
        &mut self,
        request: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        match self.exchange(Rpc::Vote(request), &option).await? {
            RpcReply::Vote(result) => self.remote(result),
            other => Err(unexpected(&other)),
        }
    }
}
