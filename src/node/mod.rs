//! The node agent: opens storage, starts Raft, the transport and the admin API, and
//! stops them in order.
//!
//! - [`context`]: what every part of a running node shares.
//! - [`cluster_ops`]: cluster-wide operations (writes, init, join, leave), each routed
//!   to the Raft leader wherever the request arrives.
//! - [`rpc_service`]: answers the node-to-node RPCs.

pub mod cluster_ops;
pub mod context;
mod rpc_service;

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use rampart_raft::transport::{self, ClusterKey, Network};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::api;
use crate::config::ClusterConfig;
pub use cluster_ops::ClusterError;
pub use context::NodeContext;

/// A started node. Dropping it does not stop it: call [`RunningNode::stop`].
pub struct RunningNode {
    pub context: Arc<NodeContext>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// Starts the node named `name` (or the one whose address is local) of `config`.
pub async fn start(config: ClusterConfig, name: Option<&str>) -> anyhow::Result<RunningNode> {
    let me = config.local_node(name).map_err(anyhow::Error::msg)?.clone();
    let secret = config.read_secret().map_err(anyhow::Error::msg)?;
    claim_data_dir(&me.data_dir, &me.name)?;

    let (log_store, state_machine) = rampart_storage::open(&me.data_dir.join("raft"))
        .with_context(|| format!("opening the store of node '{}'", me.name))?;
    let view = state_machine.view();
    let raft_config = openraft::Config {
        cluster_name: "rampart".into(),
        heartbeat_interval: config.timing.heartbeat_ms,
        election_timeout_min: config.timing.election_timeout_min_ms,
        election_timeout_max: config.timing.election_timeout_max_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(
            config.timing.snapshot_every_entries,
        ),
        // Purge everything a snapshot covers: a lagging node gets the snapshot.
        max_in_snapshot_log_to_keep: 0,
        ..Default::default()
    }
    .validate()
    .context("validating the Raft configuration")?;
    let key = ClusterKey::from_secret(&secret);

    // Bind both ports before starting Raft, so a port conflict fails start-up cleanly.
    let raft_listener = TcpListener::bind(me.raft_addr())
        .await
        .with_context(|| format!("binding the Raft port {}", me.raft_addr()))?;
    let api_listener = TcpListener::bind(me.api_addr())
        .await
        .with_context(|| format!("binding the API port {}", me.api_addr()))?;

    let raft = rampart_raft::Raft::new(
        me.id,
        Arc::new(raft_config),
        Network::new(key.clone()),
        log_store,
        state_machine,
    )
    .await
    .context("starting Raft")?;

    let shutdown = CancellationToken::new();
    let context = Arc::new(NodeContext::new(
        config,
        me,
        raft,
        view,
        key,
        &secret,
        shutdown.clone(),
    ));
    let tasks = TaskTracker::new();
    tasks.spawn(transport::serve(
        raft_listener,
        context.key.clone(),
        Arc::new(rpc_service::RpcService::new(context.clone())),
        shutdown.clone(),
    ));
    tasks.spawn(api::serve(api_listener, context.clone(), shutdown.clone()));
    tasks.spawn(
        context
            .modules
            .clone()
            .run(context.view.clone(), shutdown.clone()),
    );
    info!(
        node = %context.me.name,
        id = context.me.id,
        raft = %context.me.raft_addr(),
        api = %context.me.api_addr(),
        "node started"
    );
    Ok(RunningNode {
        context,
        shutdown,
        tasks,
    })
}

impl RunningNode {
    /// Stops serving, then stops Raft. Everything committed is already on disk; this
    /// only makes the stop quick and releases the ports.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        if let Err(e) = self.context.raft.shutdown().await {
            tracing::warn!(error = %e, "Raft did not shut down cleanly");
        }
        info!(node = %self.context.me.name, "node stopped");
    }
}

/// Runs a node until SIGTERM or SIGINT.
pub async fn run(config: ClusterConfig, name: Option<&str>) -> anyhow::Result<()> {
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let node = start(config, name).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut metrics = node.context.raft.metrics();
    // Raft stops for good on a storage error (a full disk, say): exit, so that the
    // supervisor restarts the node once the cause is fixed, rather than linger as a
    // node that answers but never takes part.
    let raft_failed = async {
        loop {
            if let Err(fatal) = &metrics.borrow().running_state {
                return fatal.to_string();
            }
            if metrics.changed().await.is_err() {
                return "Raft stopped".to_string();
            }
        }
    };
    let failure = tokio::select! {
        _ = term.recv() => { info!("SIGTERM: stopping"); None }
        _ = tokio::signal::ctrl_c() => { info!("SIGINT: stopping"); None }
        reason = raft_failed => Some(reason),
    };
    node.stop().await;
    match failure {
        None => Ok(()),
        Some(reason) => {
            tracing::error!(%reason, "Raft stopped on an unrecoverable error; exiting");
            bail!("Raft stopped: {reason}")
        }
    }
}

/// Records which node owns a data directory, and refuses to start another node on it:
/// two nodes sharing one Raft store would corrupt both.
fn claim_data_dir(dir: &Path, name: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    let marker = dir.join("node-name");
    match std::fs::read_to_string(&marker) {
        Ok(owner) if owner.trim() == name => Ok(()),
        Ok(owner) => bail!(
            "the data directory {} belongs to node '{}', not '{name}'",
            dir.display(),
            owner.trim()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&marker, name).with_context(|| format!("writing {}", marker.display()))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", marker.display())),
    }
}
