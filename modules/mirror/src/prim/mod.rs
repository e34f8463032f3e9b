//! PRIM: the FUSE interception over the replicated directory, the replication engine and
//! reintegration of a returning SECOND.
//!
//! - [`engine`]: ordering, bookkeeping, acknowledgements, link state.
//! - [`fs`]: the FUSE file system that turns application calls into engine changes.
//! - [`link`]: connection and session tasks.
//! - [`resync`]: reintegration (incremental or full) beside the live stream.

pub mod engine;
mod fs;
mod link;
pub mod resync;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rampart_raft::transport::ClusterKey;
use rampart_storage::ReplicationBook;
use tokio::sync::mpsc as amps;

pub use engine::Phase;
pub use resync::ResyncProgress;

use crate::protocol::RelPath;
use crate::tree::Tree;
use crate::{AckMode, MirrorError};

/// How PRIM is set up.
#[derive(Clone, Debug)]
pub struct PrimConfig {
    /// The replicated directory; the FUSE mount goes over it.
    pub dir: PathBuf,
    /// Where the replication book lives (outside `dir`).
    pub book: PathBuf,
    /// SECOND's replication address (`host:port`).
    pub peer: String,
    pub key: ClusterKey,
    /// The mirror epoch this node is PRIM for; every frame carries it.
    pub epoch: u64,
    /// Bytes per zone of the bookkeeping; both sides must agree.
    pub zone_size: u64,
    pub ack: AckMode,
    /// A peer silent this long (or failing) is lost.
    pub link_timeout: Duration,
    /// Bytes sent and not yet received beyond which changes wait.
    pub window_bytes: usize,
    /// Reintegration bytes per second; `None` for unlimited.
    pub resync_rate: Option<u64>,
    /// Paths (relative, with everything beneath) that are not replicated.
    pub not_replicated: Vec<RelPath>,
    /// Continue alone as soon as the peer is lost (tools and tests). The mirror module
    /// instead commits "SECOND not up to date" first, then calls [`Primary::go_alone`].
    pub continue_alone: bool,
    /// Serve read-only opens through FUSE passthrough when the kernel allows it.
    pub passthrough: bool,
}

impl PrimConfig {
    /// Defaults for everything but the places and the peer.
    pub fn new(dir: PathBuf, book: PathBuf, peer: String, key: ClusterKey, epoch: u64) -> Self {
        PrimConfig {
            dir,
            book,
            peer,
            key,
            epoch,
            zone_size: 1 << 20,
            ack: AckMode::Write,
            link_timeout: Duration::from_secs(2),
            window_bytes: 64 << 20,
            resync_rate: None,
            not_replicated: Vec::new(),
            continue_alone: false,
            passthrough: true,
        }
    }
}

/// What PRIM reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PrimStatus {
    pub phase: Phase,
    pub connected: bool,
    /// Highest sequence SECOND received / holds durably.
    pub acked: u64,
    pub durable: u64,
    pub resync: Option<ResyncProgress>,
    pub last_error: Option<String>,
}

impl Default for PrimStatus {
    fn default() -> Self {
        PrimStatus {
            phase: Phase::Stalled,
            connected: false,
            acked: 0,
            durable: 0,
            resync: None,
            last_error: None,
        }
    }
}

/// What the caller (the mirror module) is told.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    PeerConnected {
        incremental: bool,
        peer: String,
    },
    /// The peer stopped acknowledging; writes wait until [`Primary::go_alone`] or
    /// [`Primary::fence`].
    PeerLost {
        reason: String,
    },
    /// The peer holds everything: it is up to date again.
    Synced {
        bytes_sent: u64,
        examined: u64,
    },
    /// SECOND failed to apply a change on `path`; it is being reconciled.
    Diverged {
        path: String,
        error: String,
    },
}

/// A running PRIM. Dropping it unmounts and stops streaming.
pub struct Primary {
    engine: Arc<engine::Engine>,
    session: Option<fuser::BackgroundSession>,
    stop: tokio::sync::watch::Sender<bool>,
    link: crate::io_thread::IoThread,
    dir: PathBuf,
}

impl Primary {
    /// Opens the real directory, mounts the interception over it and starts streaming
    /// to the peer (reintegrating it first) from a thread of its own.
    pub fn start(
        config: PrimConfig,
    ) -> Result<(Primary, amps::UnboundedReceiver<Event>), MirrorError> {
        let tree = Tree::open(&config.dir).map_err(MirrorError::io("open the replicated dir"))?;
        let book = ReplicationBook::open(&config.book)?;
        let (events_tx, events) = amps::unbounded_channel();
        let dir = config.dir.clone();
        let engine = Arc::new(engine::Engine::new(tree, book, config, events_tx)?);
        let mut options = fuser::Config::default();
        options.mount_options = vec![
            fuser::MountOption::FSName("rampart-mirror".into()),
            fuser::MountOption::Subtype("rampart".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::Suid,
            fuser::MountOption::Dev,
        ];
        options.acl = fuser::SessionACL::All;
        options.n_threads = Some(1);
        let fs = fs::MirrorFs::new(engine.clone());
        let notifier = fs.notifier_slot();
        let session = fuser::spawn_mount(fs, &dir, &options)
            .map_err(MirrorError::io("mount the interception file system"))?;
        let _ = notifier.set(session.notifier());
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let link =
            crate::io_thread::IoThread::spawn("mirror-link", link::run(engine.clone(), stop_rx))
                .map_err(MirrorError::io("start the replication link"))?;
        Ok((
            Primary {
                engine,
                session: Some(session),
                stop,
                link,
                dir,
            },
            events,
        ))
    }

    pub fn status(&self) -> PrimStatus {
        self.engine.status.lock().expect("status lock").clone()
    }

    /// Continue without the peer (after recording that it is not up to date).
    pub fn go_alone(&self) {
        self.engine.go_alone()
    }

    /// Stop acting as PRIM: waiting and later changes fail.
    pub fn fence(&self) {
        self.engine.fence()
    }

    pub fn book(&self) -> &ReplicationBook {
        &self.engine.book
    }

    /// Unmounts and stops. Applications still holding files get errors from then on.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        self.link.stop();
        if let Some(session) = self.session.take() {
            // Detach: a busy mount must not keep the node from stopping.
            if let Err(e) = rustix::mount::unmount(&self.dir, rustix::mount::UnmountFlags::DETACH) {
                tracing::warn!(dir = %self.dir.display(), "unmounting the interception: {e}");
            }
            let _ = session.join();
        }
        self.engine.fence();
        // The copier and the aborted tasks hold the engine.
        crate::wait_for_sole_owner(&self.engine);
    }
}

impl Drop for Primary {
    fn drop(&mut self) {
        self.shutdown();
    }
}
