//! Node-to-node transport.
//!
//! - [`channel`]: a TCP stream on which both ends proved they know the cluster secret,
//!   and whose every frame is authenticated; reused by the mirror replication stream.
//! - [`rpc`]: the request and reply messages exchanged on it.
//! - [`client`]: openraft's network factory over the channel, and one-shot calls.
//! - [`server`]: the accept loop that hands requests to an [`server::RpcHandler`].

pub mod channel;
pub mod client;
pub mod rpc;
pub mod server;

pub use channel::{ChannelError, ClusterKey, FrameReader, FrameWriter, SecureChannel};
pub use client::{call, CallError, Network};
pub use rpc::{LeaderError, LeaderOp, LeaderReply, Rpc, RpcReply, WriteReceipt};
pub use server::{serve, RpcHandler};
