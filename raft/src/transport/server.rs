//! Server side of the transport: accept, authenticate, and answer requests in order.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::channel::{ChannelError, ClusterKey, SecureChannel};
use super::rpc::{Rpc, RpcReply};
use crate::codec;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers requests that arrive on authenticated channels.
pub trait RpcHandler: Send + Sync + 'static {
    fn handle(&self, rpc: Rpc) -> impl Future<Output = RpcReply> + Send;
}

/// Accepts connections until `shutdown` is cancelled. Each connection is served by its
/// own task, one request at a time, so replies come back in request order.
pub async fn serve<H: RpcHandler>(
    listener: TcpListener,
    key: ClusterKey,
    handler: Arc<H>,
    shutdown: CancellationToken,
) {
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "raft transport: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let key = key.clone();
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let channel = match SecureChannel::accept(stream, &key, HANDSHAKE_TIMEOUT).await {
                Ok(channel) => channel,
                Err(e) if e.is_authentication() => {
                    warn!(%peer, error = %e, "raft transport: refused a peer");
                    return;
                }
                Err(e) => {
                    debug!(%peer, error = %e, "raft transport: handshake failed");
                    return;
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => {}
                result = serve_connection(channel, &*handler) => {
                    if let Err(e) = result {
                        debug!(%peer, error = %e, "raft transport: connection closed");
                    }
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}

async fn serve_connection<H: RpcHandler>(
    mut channel: SecureChannel,
    handler: &H,
) -> Result<(), ChannelError> {
    loop {
        let request = channel.recv().await?;
        let rpc: Rpc = match codec::decode(&request) {
            Ok(rpc) => rpc,
            Err(e) => {
                // An authenticated peer sent something this version cannot read: a
                // version skew, not an attack. Close; the peer will see the error.
                warn!(peer = %channel.peer, error = %e, "raft transport: undecodable request");
                return Ok(());
            }
        };
        let reply = handler.handle(rpc).await;
        let bytes = codec::encode(&reply).expect("replies are always encodable");
        channel.send(bytes).await?;
    }
}
