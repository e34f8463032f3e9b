//! SECOND: receives the replication stream and applies it to its copy.
//!
//! One session at a time, from a PRIM of an epoch at least as new as any seen. Three
//! parts per session:
//! - the reader task reads frames, checks their epoch, queues them and acknowledges
//!   *receipt* (what `write` mode waits for), itself when the writer is idle;
//! - the applier thread applies them in order to the [`Tree`], answers reintegration
//!   requests, syncs what it applied (at once in `durable` mode and on an fsync,
//!   within [`SecondConfig::sync_every`] otherwise) and advances the *durable*
//!   watermark PRIM clears its intents by;
//! - the writer task sends `Failed`, answers and coalesced acks, in that order of
//!   priority, so a `Failed` always precedes the ack that makes its sequence durable
//!   (the reader's acks repeat the durable mark last sent).
//!
//! The directory itself is bind-mounted read-only over itself while SECOND runs:
//! applications see the copy but cannot change it; the applier writes through the
//! descriptor it opened before.

mod applier;
mod replay;
mod session;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use rampart_raft::transport::{ClusterKey, FrameWriter, SecureChannel};
use rampart_storage::{MarkKind, Marks, ReplicationBook};
use tokio::net::TcpListener;
use tokio::sync::{mpsc as amps, Notify};

use crate::io_thread::IoThread;
use crate::protocol::{self, Down, Up};
use crate::tree::Tree;
use crate::{AckMode, MirrorError};
use applier::{apply_loop, Backlog, Work};
pub use session::pending_overwrite;
use session::{accept_loop, Watermarks};

/// How often SECOND tells PRIM it is alive while its reader waits for the applier.
const KEEPALIVE_EVERY: Duration = Duration::from_millis(100);
/// An applier that took no frame for this long is stuck: SECOND goes quiet.
const STUCK_AFTER: Duration = Duration::from_secs(10);

/// The default of [`SecondConfig::sync_every`]: the interval at which a local file system
/// commits (ext4's default `commit=5`).
pub const SYNC_EVERY: Duration = Duration::from_secs(5);
/// How often the applier, when idle, checks whether to sync or stop.
const APPLIER_POLL: Duration = Duration::from_millis(50);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How SECOND is set up.
pub struct SecondConfig {
    /// The replicated directory (SECOND's copy).
    pub dir: PathBuf,
    /// Where the replication book lives (outside `dir`).
    pub book: PathBuf,
    pub key: ClusterKey,
    pub zone_size: u64,
    pub ack: AckMode,
    /// In `write` and `fsync` modes, applied changes are synced at least this often
    /// (an fsync from PRIM syncs at once; `durable` mode syncs before each ack).
    /// Nothing waits for these syncs (they run beside the applier, which goes on
    /// applying): they advance the durable watermark, by which PRIM clears its intents
    /// (which it keeps for 5 s after their last write anyway), and `write` mode
    /// promises SECOND's receipt, not its disk. Syncing more often buys nothing but
    /// disk bandwidth taken from the application on SECOND's disk (and from PRIM's,
    /// where the two share one).
    pub sync_every: Duration,
    /// Bind-mount `dir` read-only over itself while running.
    pub protect: bool,
}

/// What SECOND reports.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SecondStatus {
    pub connected: bool,
    pub peer: Option<String>,
    /// Newest epoch accepted.
    pub epoch: u64,
    pub received: u64,
    /// The last sequence applied to the copy, and the last one synced to its disk.
    pub applied: u64,
    pub durable: u64,
    pub bytes_applied: u64,
    /// Received and not yet applied: held in memory, at most about 64 MiB.
    pub backlog_bytes: u64,
    pub failures: u64,
    pub last_error: Option<String>,
}

struct Shared {
    tree: Tree,
    book: ReplicationBook,
    config: SecondConfig,
    /// Frames from an older epoch are refused. Raised by sessions and by the caller,
    /// and kept in the book across restarts.
    min_epoch: AtomicU64,
    /// Bumped to end the current session: a newer one takes over, or a fence.
    generation: tokio::sync::watch::Sender<u64>,
    /// The current session's epoch (0 when none).
    session_epoch: AtomicU64,
    /// Held while a new session takes over from the current one.
    handover: tokio::sync::Mutex<()>,
    /// Files a failed sync covered: removed before the next session (see
    /// `SyncFailure::report`); the book keeps the list across restarts.
    damaged: Mutex<std::collections::BTreeSet<crate::protocol::RelPath>>,
    status: Mutex<SecondStatus>,
    /// The current session's applier; whoever ends first (the session or the drop of
    /// [`Secondary`]) joins it, so that the book is never written during process exit.
    applier: Mutex<Option<(u64, std::thread::JoinHandle<()>)>>,
    /// The current session's frames waiting for the applier.
    backlog: Mutex<Arc<Backlog>>,
}

/// A running SECOND. Dropping it stops it and removes the read-only mount.
pub struct Secondary {
    shared: Arc<Shared>,
    listener: IoThread,
    addr: std::net::SocketAddr,
    mounted: bool,
}

impl Secondary {
    /// Opens the copy and the book, protects the directory and listens on `listen`.
    pub fn start(config: SecondConfig, listen: &str) -> Result<Secondary, MirrorError> {
        // The book first: its lock proves no live SECOND serves this copy.
        let book = ReplicationBook::open(&config.book)?;
        let book_min_epoch = book.min_epoch()?;
        let book_damaged = book.damaged()?;
        let tree = crate::leftovers::open_tree_for_role(&config.dir)?;
        // Bound here, for the error; registered with the I/O thread's runtime there.
        let listener =
            std::net::TcpListener::bind(listen).map_err(MirrorError::io("listen for PRIM"))?;
        listener
            .set_nonblocking(true)
            .map_err(MirrorError::io("listen for PRIM"))?;
        let addr = listener
            .local_addr()
            .map_err(MirrorError::io("read the listening address"))?;
        let mounted = config.protect;
        if mounted {
            protect(&config.dir).map_err(MirrorError::io("bind-mount the copy read-only"))?;
        }
        let shared = Arc::new(Shared {
            tree,
            book,
            config,
            min_epoch: AtomicU64::new(book_min_epoch),
            generation: tokio::sync::watch::channel(0).0,
            session_epoch: AtomicU64::new(0),
            handover: tokio::sync::Mutex::new(()),
            damaged: Mutex::new(book_damaged.into_iter().collect()),
            status: Mutex::new(SecondStatus::default()),
            applier: Mutex::new(None),
            backlog: Mutex::new(Arc::new(Backlog::new())),
        });
        let accepting = shared.clone();
        let listener = IoThread::spawn("mirror-second", async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => accept_loop(accepting, listener).await,
                Err(e) => tracing::error!("cannot listen for PRIM: {e}"),
            }
        })
        .map_err(MirrorError::io("start the replication listener"))?;
        Ok(Secondary {
            shared,
            listener,
            addr,
            mounted,
        })
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Raises the oldest epoch accepted (the caller learnt of a newer PRIM), on disk
    /// before it returns, and ends a session of an older epoch.
    pub fn fence(&self, epoch: u64) -> Result<(), MirrorError> {
        self.shared.book.raise_min_epoch(epoch)?;
        self.shared.min_epoch.fetch_max(epoch, Ordering::SeqCst);
        if self.shared.session_epoch.load(Ordering::SeqCst) < epoch {
            self.shared.generation.send_modify(|g| *g += 1);
        }
        Ok(())
    }

    pub fn status(&self) -> SecondStatus {
        let mut status = self.shared.status.lock().expect("status lock").clone();
        status.backlog_bytes = self.shared.backlog.lock().expect("backlog lock").queued() as u64;
        status
    }

    pub fn book(&self) -> &ReplicationBook {
        &self.shared.book
    }
}

impl Secondary {
    /// Stops taking frames, then applies and syncs everything already received (and so
    /// acknowledged to PRIM) before returning: what a promotion of this node starts
    /// from. Removes the read-only mount.
    pub fn stop_and_drain(mut self) -> Drained {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Drained {
        // Drops the session: the reader stops, and the applier, once it has taken
        // every frame already queued, syncs and returns.
        self.listener.stop();
        let applier = self.shared.applier.lock().expect("applier lock").take();
        if let Some((_, applier)) = applier {
            let _ = applier.join();
        }
        if std::mem::take(&mut self.mounted) {
            if let Err(e) = unprotect(&self.shared.config.dir) {
                tracing::warn!(dir = %self.shared.config.dir.display(), "cannot remove the read-only mount: {e}");
            }
        }
        let status = self.status();
        Drained {
            applied: status.applied,
            durable: status.durable,
        }
    }
}

/// What a drained SECOND holds: the last sequence applied, and the last one on its
/// disk (lower only when a sync failed, which PRIM was told).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Drained {
    pub applied: u64,
    pub durable: u64,
}

impl Drop for Secondary {
    fn drop(&mut self) {
        self.shutdown();
        crate::wait_for_sole_owner(&self.shared);
    }
}

/// Bind-mounts `dir` read-only over itself.
fn protect(dir: &Path) -> io::Result<()> {
    use rustix::mount::{mount_bind, mount_remount, MountFlags};
    mount_bind(dir, dir).map_err(|e| io::Error::from_raw_os_error(e.raw_os_error()))?;
    mount_remount(dir, MountFlags::BIND | MountFlags::RDONLY, "")
        .map_err(|e| io::Error::from_raw_os_error(e.raw_os_error()))
}

fn unprotect(dir: &Path) -> io::Result<()> {
    rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH)
        .map_err(|e| io::Error::from_raw_os_error(e.raw_os_error()))
}
