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
mod mount;
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
use crate::{AckMode, MirrorError};

/// The default of [`PrimConfig::park_timeout`]: far beyond a failover decision.
pub const PARK_TIMEOUT: Duration = Duration::from_secs(60);

/// The default of [`PrimConfig::dispatch_threads`].
pub const DISPATCH_THREADS: usize = 4;

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
    /// An application call waiting for a decision about a lost peer (continue alone
    /// or stop), or for the reintegration that repairs what it changed, fails with
    /// `EIO` after this long.
    pub park_timeout: Duration,
    /// Threads that take requests from the kernel and answer them, each on its own
    /// clone of the FUSE connection: reads, lookups and attribute requests run beside
    /// a change that waits for the disk, the book or the send window. Changes still
    /// apply and stream one at a time, in one order (the engine's order lock).
    pub dispatch_threads: usize,
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
            park_timeout: PARK_TIMEOUT,
            dispatch_threads: DISPATCH_THREADS,
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
    /// Bytes sent and not yet acknowledged as received.
    pub bytes_in_flight: u64,
    /// Application calls parked (waiting for a decision about the peer, or for the
    /// reintegration), and how long the oldest has waited, in milliseconds.
    pub parked: u64,
    pub oldest_parked_ms: Option<u64>,
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
            bytes_in_flight: 0,
            parked: 0,
            oldest_parked_ms: None,
        }
    }
}

/// What the caller (the mirror module) is told. `session` numbers increase: a session
/// is numbered when it starts, its loss with the next number, which
/// [`Primary::go_alone`] takes so that a decision about one loss never applies to a
/// later one.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    PeerConnected {
        session: u64,
        incremental: bool,
        peer: String,
    },
    /// The peer stopped acknowledging, or failed to apply a change (its copy is not up
    /// to date); writes wait until [`Primary::go_alone`] with this `session`, or
    /// [`Primary::fence`], or the park timeout.
    PeerLost { session: u64, reason: String },
    /// No session for the link timeout since this PRIM started (the peer never came);
    /// writes wait as after [`Event::PeerLost`], and `session` is what
    /// [`Primary::go_alone`] takes.
    PeerAbsent { session: u64 },
    /// SECOND could not apply or sync a change on `path` in `session`: its copy is not
    /// up to date. The session ends with it ([`Event::PeerLost`] follows, no
    /// [`Event::Synced`] of that session does); the next session repairs it.
    NotUpToDate {
        session: u64,
        path: String,
        error: String,
    },
    /// The peer holds everything: it is up to date again.
    Synced {
        session: u64,
        bytes_sent: u64,
        examined: u64,
    },
    /// Reintegration stopped with the session still up; it runs again with the next.
    ResyncFailed { session: u64, reason: String },
    /// This node no longer acts as PRIM: every waiting and later change fails.
    Fenced { reason: String },
}

/// How long [`Primary::stop`] lets applications close their files after the unmount
/// before it aborts the FUSE connection.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// Proof that a stopped PRIM closed its book.
#[derive(Debug)]
pub struct BookReleased {
    pub book: PathBuf,
}

/// A running PRIM. Dropping it unmounts and stops streaming.
pub struct Primary {
    engine: Arc<engine::Engine>,
    session: Option<fuser::BackgroundSession>,
    /// The FUSE connection's number, to abort it when stopping.
    connection: Option<u64>,
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
        // The book first: its lock proves no live PRIM serves this directory.
        let book = ReplicationBook::open(&config.book)?;
        // Beneath what a killed predecessor left: the bare directory is never shown.
        let tree = crate::leftovers::open_tree_beneath_leftovers(&config.dir)?;
        let (events_tx, events) = amps::unbounded_channel();
        let dir = config.dir.clone();
        let engine = Arc::new(engine::Engine::new(tree, book, config, events_tx)?);
        let fs = fs::MirrorFs::new(engine.clone());
        let notifier = fs.notifier_slot();
        let threads = engine.config.dispatch_threads.max(1);
        let session = mount::mount_interception(fs, &dir, engine.tree.root(), threads)
            .map_err(MirrorError::io("mount the interception file system"))?;
        let _ = notifier.set(session.notifier());
        let connection = mount::fuse_connection(&dir);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let link = match crate::io_thread::IoThread::spawn(
            "mirror-link",
            link::run(engine.clone(), stop_rx),
        ) {
            Ok(link) => link,
            Err(e) => {
                // Nothing stays mounted and served by a PRIM that did not start.
                engine.fence("PRIM did not start");
                let _ = rustix::mount::unmount(&dir, rustix::mount::UnmountFlags::DETACH);
                if let Some(connection) = connection {
                    let _ = mount::abort_fuse_connection(connection);
                }
                let _ = session.join();
                return Err(MirrorError::io("start the replication link")(e));
            }
        };
        Ok((
            Primary {
                engine,
                session: Some(session),
                connection,
                stop,
                link,
                dir,
            },
            events,
        ))
    }

    pub fn status(&self) -> PrimStatus {
        let mut status = self.engine.status.lock().expect("status lock").clone();
        let (parked, oldest) = self.engine.parked();
        status.parked = parked as u64;
        status.oldest_parked_ms = oldest.map(|age| age.as_millis() as u64);
        status.bytes_in_flight = self.engine.bytes_in_flight() as u64;
        status
    }

    /// Continue without the peer (after recording that it is not up to date).
    /// Continue without the peer after the loss numbered `session` (from
    /// [`Event::PeerLost`] or [`Event::PeerAbsent`]), once the caller recorded that the
    /// peer is not up to date. Parked writes return. Refused when that loss is no
    /// longer the current state (the peer came back, or was lost again since).
    pub fn go_alone(&self, session: u64) -> Result<(), MirrorError> {
        self.engine.go_alone(session)
    }

    /// Stop acting as PRIM: waiting and later changes fail. Never waits for a change in
    /// progress: what it sets is checked on every acknowledgement.
    pub fn fence(&self, reason: &str) {
        self.engine.fence(reason)
    }

    /// No change is acknowledged at or after `deadline` (the PRIM lease): past it the
    /// engine fences itself. `None` for no lease.
    pub fn set_lease_deadline(&self, deadline: Option<std::time::Instant>) {
        self.engine.set_lease_deadline(deadline)
    }

    /// Takes a new mirror epoch: the current session ends and the next one, at once,
    /// says `epoch` in its Hello and every frame.
    pub fn set_epoch(&self, epoch: u64) {
        self.engine.set_epoch(epoch)
    }

    pub fn book(&self) -> &ReplicationBook {
        &self.engine.book
    }

    /// Fences, unmounts and stops. Applications still holding files get errors from
    /// then on; returns within [`STOP_GRACE`] and a little more, however many files
    /// they hold open.
    ///
    /// Returns once the book is closed, so that this node can open it again (as
    /// SECOND, on failback) in the same process.
    pub fn stop(mut self) -> Result<BookReleased, MirrorError> {
        self.shutdown();
        let book = self.engine.config.book.clone();
        // The engine and its book are dropped with `self` if nothing else holds them.
        // (The engine's own threads, which share the book, stop with it.)
        let sole = Arc::strong_count(&self.engine) == 1;
        drop(self);
        if !sole {
            return Err(MirrorError::Protocol(format!(
                "the book at {} is still in use after the stop",
                book.display()
            )));
        }
        Ok(BookReleased { book })
    }

    fn shutdown(&mut self) {
        let durable = self.engine.durable_in_session();
        // First: nothing is acknowledged from here on, whatever the link does next.
        self.engine.fence("PRIM stopped");
        // What the peer durably holds need not be sent again, whoever is PRIM next.
        if let Some(durable) = durable {
            self.engine.clear_settled_after_stop(durable);
        }
        let _ = self.stop.send(true);
        self.link.stop();
        if let Some(session) = self.session.take() {
            let connection = self.connection;
            // Detach: a busy mount must not keep the node from stopping.
            if let Err(e) = rustix::mount::unmount(&self.dir, rustix::mount::UnmountFlags::DETACH) {
                tracing::warn!(dir = %self.dir.display(), "unmounting the interception: {e}");
            }
            // A detached mount lives on while applications hold files in it, and the
            // session with it: past the grace, abort the connection, which fails every
            // access and ends the session.
            let deadline = std::time::Instant::now() + STOP_GRACE;
            while !session.guard.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !session.guard.is_finished() {
                let aborted = connection
                    .ok_or_else(|| std::io::Error::other("its connection number is unknown"))
                    .and_then(mount::abort_fuse_connection);
                match aborted {
                    Ok(()) => tracing::warn!(
                        dir = %self.dir.display(),
                        "files still open {STOP_GRACE:?} after the unmount: connection aborted"
                    ),
                    Err(e) => tracing::error!(
                        dir = %self.dir.display(),
                        "cannot abort the interception's connection; waiting for its files \
                         to be closed: {e}"
                    ),
                }
            }
            let _ = session.join();
            // What a killed predecessor left beneath the interception is on top now.
            if let Err(e) = crate::leftovers::remove_leftover_mounts(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), "{e}");
            }
        }
        // The copier and the aborted tasks hold the engine.
        crate::wait_for_sole_owner(&self.engine);
    }
}

impl Drop for Primary {
    fn drop(&mut self) {
        self.shutdown();
    }
}
