//! What every part of a running node shares.

use rampart_raft::command::ApiRole;
use rampart_raft::transport::ClusterKey;
use rampart_raft::{NodeId, NodeInfo, Raft};
use rampart_storage::StateView;

use std::sync::Arc;

use crate::config::{ClusterConfig, NodeConfig};
use crate::module::manager::ModuleManager;

pub struct NodeContext {
    pub config: ClusterConfig,
    /// This node's entry in `config`.
    pub me: NodeConfig,
    pub raft: Raft,
    /// The applied cluster state.
    pub view: StateView,
    /// Authenticates node-to-node channels.
    pub key: ClusterKey,
    /// The modules of this node.
    pub modules: Arc<ModuleManager>,
    /// Cancelled when the node stops: long-lived responses (event streams) end on it.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// blake3 of the admin token derived from the cluster secret.
    admin_token_hash: String,
}

/// The admin API token of a cluster: derived from its secret, so that anyone who can
/// read the secret on a node (root) can administer the cluster without further setup.
pub fn admin_token(secret: &[u8]) -> String {
    hex(&blake3::derive_key("rampart admin api token v1", secret))
}

pub fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `len` random bytes, hex-encoded: for new secrets and tokens.
pub fn random_hex(len: usize) -> String {
    use rand::RngCore;
    let mut bytes = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex(&bytes)
}

impl NodeContext {
    pub fn new(
        config: ClusterConfig,
        me: NodeConfig,
        raft: Raft,
        view: StateView,
        key: ClusterKey,
        secret: &[u8],
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        let modules = ModuleManager::new(me.name.clone(), me.id, me.data_dir.clone());
        NodeContext {
            config,
            me,
            raft,
            view,
            key,
            modules,
            shutdown,
            admin_token_hash: token_hash(&admin_token(secret)),
        }
    }

    /// The role an API token grants, if any.
    pub fn role_of_token(&self, token: &str) -> Option<ApiRole> {
        let hash = token_hash(token);
        if hash == self.admin_token_hash {
            return Some(ApiRole::Admin);
        }
        self.view.read(|s| s.cluster.token_role(&hash))
    }

    /// The current leader's id and address, as this node knows them.
    pub fn leader(&self) -> Option<(NodeId, NodeInfo)> {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        let info = metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .cloned()?;
        Some((leader, info))
    }
}
