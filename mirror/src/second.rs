//! SECOND: receives the replication stream and applies it to its copy.
//!
//! One session at a time, from a PRIM of an epoch at least as new as any seen. Three
//! parts per session:
//! - the reader task reads frames, checks their epoch, acknowledges *receipt*
//!   (what `write` mode waits for) and queues them;
//! - the applier thread applies them in order to the [`Tree`], answers reintegration
//!   requests, syncs what it applied (at once in `durable` mode, within
//!   [`SYNC_EVERY`] otherwise) and advances the *durable* watermark PRIM clears its
//!   intents by;
//! - the writer task sends `Failed`, answers and coalesced acks, in that order of
//!   priority, so a `Failed` always precedes the ack that makes its sequence durable.
//!
//! The directory itself is bind-mounted read-only over itself while SECOND runs:
//! applications see the copy but cannot change it; the applier writes through the
//! descriptor it opened before.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rampart_raft::transport::{ClusterKey, SecureChannel};
use rampart_storage::{MarkKind, Marks, ReplicationBook};
use rustix::fs::OFlags;
use tokio::net::TcpListener;
use tokio::sync::{mpsc as amps, Notify};

use crate::protocol::{self, Answer, Down, Op, RelPath, Request, Up};
use crate::tree::{kind_of, Tree};
use crate::{AckMode, MirrorError};

/// In `write` and `fsync` modes, applied changes are synced at least this often.
pub const SYNC_EVERY: Duration = Duration::from_millis(200);
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
    pub durable: u64,
    pub bytes_applied: u64,
    pub failures: u64,
    pub last_error: Option<String>,
}

struct Shared {
    tree: Tree,
    book: ReplicationBook,
    config: SecondConfig,
    /// Frames from an older epoch are refused. Raised by sessions and by the caller.
    min_epoch: AtomicU64,
    status: Mutex<SecondStatus>,
    stopping: AtomicBool,
    /// The current session's applier; whoever ends first (the session or the drop of
    /// [`Secondary`]) joins it, so that the book is never written during process exit.
    applier: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A running SECOND. Dropping it stops it and removes the read-only mount.
pub struct Secondary {
    shared: Arc<Shared>,
    listener_task: tokio::task::JoinHandle<()>,
    addr: std::net::SocketAddr,
    mounted: bool,
}

impl Secondary {
    /// Opens the copy and the book, protects the directory and listens on `listen`.
    pub async fn start(config: SecondConfig, listen: &str) -> Result<Secondary, MirrorError> {
        let tree = Tree::open(&config.dir).map_err(MirrorError::io("open the replicated dir"))?;
        let book = ReplicationBook::open(&config.book)?;
        let listener = TcpListener::bind(listen)
            .await
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
            min_epoch: AtomicU64::new(0),
            status: Mutex::new(SecondStatus::default()),
            stopping: AtomicBool::new(false),
            applier: Mutex::new(None),
        });
        let listener_task = tokio::spawn(accept_loop(shared.clone(), listener));
        Ok(Secondary {
            shared,
            listener_task,
            addr,
            mounted,
        })
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Raises the oldest epoch accepted (the caller learnt of a newer PRIM).
    pub fn fence(&self, epoch: u64) {
        self.shared.min_epoch.fetch_max(epoch, Ordering::SeqCst);
    }

    pub fn status(&self) -> SecondStatus {
        self.shared.status.lock().expect("status lock").clone()
    }

    pub fn book(&self) -> &ReplicationBook {
        &self.shared.book
    }
}

impl Drop for Secondary {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.listener_task.abort();
        // The applier sees `stopping` within a quarter of SYNC_EVERY, syncs and returns.
        let applier = self.shared.applier.lock().expect("applier lock").take();
        if let Some(applier) = applier {
            let _ = applier.join();
        }
        if self.mounted {
            if let Err(e) = unprotect(&self.shared.config.dir) {
                tracing::warn!(dir = %self.shared.config.dir.display(), "cannot remove the read-only mount: {e}");
            }
        }
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

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("accepting a PRIM connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let channel =
            match SecureChannel::accept(stream, &shared.config.key, HANDSHAKE_TIMEOUT).await {
                Ok(channel) => channel,
                Err(e) => {
                    tracing::warn!(%from, "refused a replication connection: {e}");
                    continue;
                }
            };
        // One session at a time: a new PRIM connection replaces the old one only after
        // it ends (the old PRIM's socket fails or its epoch is fenced).
        if let Err(e) = session(&shared, channel).await {
            tracing::warn!(%from, "replication session ended: {e}");
            shared.status.lock().expect("status lock").last_error = Some(e.to_string());
        }
        let mut status = shared.status.lock().expect("status lock");
        status.connected = false;
        status.peer = None;
    }
}

/// Work for the applier thread, in stream order.
enum Work {
    Frame(Down, Vec<u8>, usize),
    /// Reader ended; finish and stop.
    End,
}

async fn session(shared: &Arc<Shared>, channel: SecureChannel) -> Result<(), MirrorError> {
    let SecureChannel {
        mut reader,
        mut writer,
        peer,
    } = channel;
    let frame = reader.recv().await?;
    let (hello, _) = protocol::decode::<Down>(&frame)?;
    let Down::Hello {
        epoch,
        zone_size,
        sync_point: _,
    } = hello
    else {
        return Err(MirrorError::Protocol("first message is not Hello".into()));
    };
    let refuse = if epoch < shared.min_epoch.load(Ordering::SeqCst) {
        Some(format!(
            "epoch {epoch} is older than epoch {} already seen",
            shared.min_epoch.load(Ordering::SeqCst)
        ))
    } else if zone_size != shared.config.zone_size {
        Some(format!(
            "zone size {zone_size} differs from this node's {}",
            shared.config.zone_size
        ))
    } else {
        None
    };
    if let Some(reason) = refuse {
        writer
            .send(&protocol::encode(
                &Up::Refused {
                    reason: reason.clone(),
                },
                &[],
            ))
            .await?;
        return Err(MirrorError::Refused(reason));
    }
    shared.min_epoch.fetch_max(epoch, Ordering::SeqCst);
    let mut overwrite = shared.book.marks(MarkKind::Intent)?;
    overwrite.extend(&shared.book.marks(MarkKind::Dirty)?);
    let welcome = Up::Welcome {
        sync_point: shared.book.sync_point()?,
        overwrite,
    };
    writer.send(&protocol::encode(&welcome, &[])).await?;
    {
        let mut status = shared.status.lock().expect("status lock");
        status.connected = true;
        status.peer = Some(peer.clone());
        status.epoch = epoch;
        status.last_error = None;
    }
    tracing::info!(%peer, epoch, "PRIM connected");

    let watermarks = Arc::new(Watermarks::default());
    let (up_tx, mut up_rx) = amps::unbounded_channel::<Up>();
    let (work_tx, work_rx) = mpsc::channel::<Work>();
    {
        let shared_for_applier = shared.clone();
        let watermarks = watermarks.clone();
        let up_tx = up_tx.clone();
        let applier = std::thread::Builder::new()
            .name("mirror-applier".into())
            .spawn(move || apply_loop(&shared_for_applier, work_rx, &watermarks, &up_tx))
            .map_err(MirrorError::io("start the applier thread"))?;
        *shared.applier.lock().expect("applier lock") = Some(applier);
    }

    let writer_task = {
        let watermarks = watermarks.clone();
        tokio::spawn(async move {
            let mut sent = (0, 0);
            loop {
                tokio::select! {
                    biased;
                    message = up_rx.recv() => match message {
                        Some(message) => writer.write(&protocol::encode(&message, &[])).await?,
                        None => return Ok::<(), MirrorError>(()),
                    },
                    _ = watermarks.changed.notified() => {}
                }
                let now = watermarks.get();
                if now != sent || watermarks.ping.swap(false, Ordering::SeqCst) {
                    sent = now;
                    let ack = Up::Ack {
                        received: now.0,
                        durable: now.1,
                    };
                    writer.write(&protocol::encode(&ack, &[])).await?;
                }
                writer.flush().await?;
            }
        })
    };

    let read_result: Result<(), MirrorError> = async {
        loop {
            let frame = reader.recv().await?;
            let (message, data_at) = protocol::decode::<Down>(&frame)?;
            let (frame_epoch, seq) = match &message {
                Down::Op { epoch, seq, .. }
                | Down::Ask { epoch, seq, .. }
                | Down::SyncPoint { epoch, seq, .. } => (*epoch, Some(*seq)),
                Down::Replay { epoch, .. } => (*epoch, None),
                Down::Ping => {
                    watermarks.ping.store(true, Ordering::SeqCst);
                    watermarks.changed.notify_one();
                    continue;
                }
                Down::Hello { .. } => {
                    return Err(MirrorError::Protocol("Hello in the middle of a session".into()))
                }
            };
            let fence = shared.min_epoch.load(Ordering::SeqCst);
            if frame_epoch != epoch || frame_epoch < fence {
                return Err(MirrorError::Refused(format!(
                    "frame of epoch {frame_epoch} in a session of epoch {epoch} (oldest accepted {fence})"
                )));
            }
            if work_tx.send(Work::Frame(message, frame, data_at)).is_err() {
                return Err(MirrorError::Protocol("the applier stopped".into()));
            }
            if let Some(seq) = seq {
                watermarks.received.store(seq, Ordering::SeqCst);
                watermarks.changed.notify_one();
            }
        }
    }
    .await;
    let _ = work_tx.send(Work::End);
    let applier = shared.applier.lock().expect("applier lock").take();
    if let Some(applier) = applier {
        let _ = tokio::task::spawn_blocking(move || applier.join()).await;
    }
    drop(up_tx);
    writer_task.abort();
    read_result
}

#[derive(Default)]
struct Watermarks {
    received: AtomicU64,
    durable: AtomicU64,
    ping: AtomicBool,
    changed: Notify,
}

impl Watermarks {
    fn get(&self) -> (u64, u64) {
        (
            self.received.load(Ordering::SeqCst),
            self.durable.load(Ordering::SeqCst),
        )
    }
}

/// Files and directories changed since the last sync.
#[derive(Default)]
struct Unsynced {
    paths: BTreeSet<RelPath>,
    last_seq: u64,
    since: Option<Instant>,
}

fn parent_of(path: &[u8]) -> RelPath {
    match path.iter().rposition(|b| *b == b'/') {
        Some(slash) => path[..slash].to_vec(),
        None => Vec::new(),
    }
}

fn apply_loop(
    shared: &Shared,
    work: mpsc::Receiver<Work>,
    watermarks: &Watermarks,
    up: &amps::UnboundedSender<Up>,
) {
    let tree = &shared.tree;
    let mut unsynced = Unsynced::default();
    let mut write_cache: Option<(RelPath, std::os::fd::OwnedFd)> = None;
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            sync(shared, &mut unsynced, watermarks);
            return;
        }
        let next = if shared.config.ack == AckMode::Durable && unsynced.since.is_some() {
            // Group commit: sync as soon as the queue is drained.
            match work.try_recv() {
                Ok(next) => Some(next),
                Err(mpsc::TryRecvError::Empty) => {
                    sync(shared, &mut unsynced, watermarks);
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        } else {
            match work.recv_timeout(SYNC_EVERY / 4) {
                Ok(next) => Some(next),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        };
        match next {
            Some(Work::End) => {
                sync(shared, &mut unsynced, watermarks);
                return;
            }
            Some(Work::Frame(message, frame, data_at)) => {
                let data = &frame[data_at..];
                match message {
                    Down::Op { seq, op, .. } => {
                        if !matches!(op, Op::Write { .. }) {
                            write_cache = None;
                        }
                        let result = match protocol::validate_path(op.path()) {
                            Err(reason) => Err(io::Error::other(reason)),
                            Ok(()) => apply_op(tree, &op, data, &mut write_cache),
                        };
                        let mut status = shared.status.lock().expect("status lock");
                        status.bytes_applied += data.len() as u64;
                        if let Err(e) = result {
                            status.failures += 1;
                            drop(status);
                            tracing::debug!(seq, path = %String::from_utf8_lossy(op.path()), "apply failed: {e}");
                            let _ = up.send(Up::Failed {
                                seq,
                                path: op.path().to_vec(),
                                error: e.to_string(),
                            });
                        }
                        note_unsynced(&mut unsynced, &op, seq);
                    }
                    Down::Ask { seq, request, .. } => {
                        unsynced.last_seq = seq;
                        unsynced.since.get_or_insert_with(Instant::now);
                        let answer = match request {
                            Request::Sync => {
                                sync(shared, &mut unsynced, watermarks);
                                Answer::Synced
                            }
                            request => answer(tree, shared.config.zone_size, &request),
                        };
                        let _ = up.send(Up::Answer { seq, answer });
                    }
                    Down::Replay { entries, .. } => {
                        write_cache = None;
                        for entry in entries {
                            let op = match entry {
                                rampart_storage::JournalEntry::Rename { from, to, flags } => {
                                    Op::Rename { from, to, flags }
                                }
                                rampart_storage::JournalEntry::Link { from, to } => {
                                    Op::Link { from, to }
                                }
                            };
                            if protocol::validate_path(op.path()).is_ok() {
                                // Best effort: the paths are reconciled afterwards.
                                let _ = tree.apply(&op, &[]);
                                let last = unsynced.last_seq;
                                note_unsynced(&mut unsynced, &op, last);
                            }
                        }
                    }
                    Down::SyncPoint { seq, point, .. } => {
                        unsynced.last_seq = seq;
                        unsynced.since.get_or_insert_with(Instant::now);
                        sync(shared, &mut unsynced, watermarks);
                        // Everything SECOND changed on its own has been overwritten.
                        let result = shared
                            .book
                            .clear(
                                MarkKind::Intent,
                                &shared.book.marks(MarkKind::Intent).unwrap_or_default(),
                            )
                            .and_then(|()| {
                                shared.book.clear(
                                    MarkKind::Dirty,
                                    &shared.book.marks(MarkKind::Dirty).unwrap_or_default(),
                                )
                            })
                            .and_then(|()| shared.book.set_sync_point(Some(point)));
                        if let Err(e) = result {
                            tracing::error!("cannot record the sync point: {e}");
                        }
                    }
                    Down::Hello { .. } | Down::Ping => {}
                }
            }
            None => {}
        }
        if unsynced
            .since
            .is_some_and(|since| since.elapsed() >= SYNC_EVERY)
        {
            sync(shared, &mut unsynced, watermarks);
        }
    }
}

/// Applies an op, keeping the last written file open for the next write to it.
fn apply_op(
    tree: &Tree,
    op: &Op,
    data: &[u8],
    cache: &mut Option<(RelPath, std::os::fd::OwnedFd)>,
) -> io::Result<()> {
    if let Op::Write { path, offset } = op {
        if cache.as_ref().is_none_or(|(cached, _)| cached != path) {
            *cache = Some((path.clone(), tree.open_at(path, OFlags::WRONLY, 0)?));
        }
        let (_, fd) = cache.as_ref().expect("just filled");
        return crate::tree::write_all_at(fd, data, *offset);
    }
    tree.apply(op, data)
}

fn note_unsynced(unsynced: &mut Unsynced, op: &Op, seq: u64) {
    let mut note = |path: &[u8]| {
        unsynced.paths.insert(path.to_vec());
    };
    match op {
        Op::Write { path, .. }
        | Op::Truncate { path, .. }
        | Op::Fallocate { path, .. }
        | Op::Zone { path, .. }
        | Op::Fsync { path, .. } => note(path),
        Op::Rename { from, to, .. } => {
            note(&parent_of(from));
            note(&parent_of(to));
        }
        other => {
            note(other.path());
            note(&parent_of(other.path()));
        }
    }
    unsynced.last_seq = unsynced.last_seq.max(seq);
    unsynced.since.get_or_insert_with(Instant::now);
}

/// Makes everything applied so far durable, then advances the durable watermark.
fn sync(shared: &Shared, unsynced: &mut Unsynced, watermarks: &Watermarks) {
    if unsynced.since.is_none() {
        return;
    }
    let paths = std::mem::take(&mut unsynced.paths);
    let result = if paths.len() > 64 {
        shared.tree.sync_all()
    } else {
        paths
            .iter()
            .try_for_each(|path| sync_path(&shared.tree, path))
    };
    if let Err(e) = result {
        // Not durable: the watermark stays, so PRIM keeps its intents.
        tracing::warn!("syncing the copy failed: {e}");
        unsynced.paths = paths;
        return;
    }
    unsynced.since = None;
    watermarks
        .durable
        .fetch_max(unsynced.last_seq, Ordering::SeqCst);
    watermarks.changed.notify_one();
    let mut status = shared.status.lock().expect("status lock");
    status.durable = watermarks.durable.load(Ordering::SeqCst);
    status.received = watermarks.received.load(Ordering::SeqCst);
}

fn sync_path(tree: &Tree, path: &[u8]) -> io::Result<()> {
    let Some(stat) = tree.stat(path)? else {
        return Ok(()); // Removed since: its parent is synced.
    };
    let flags = match kind_of(stat.st_mode) {
        crate::protocol::Kind::Dir => OFlags::RDONLY | OFlags::DIRECTORY,
        crate::protocol::Kind::File => OFlags::RDONLY,
        _ => return Ok(()),
    };
    let fd = tree.open_at(path, flags, 0)?;
    rustix::fs::fsync(&fd).map_err(|e| io::Error::from_raw_os_error(e.raw_os_error()))
}

fn answer(tree: &Tree, zone_size: u64, request: &Request) -> Answer {
    match request {
        Request::Probe { paths } => Answer::Probe(
            paths
                .iter()
                .map(|path| {
                    protocol::validate_path(path).ok()?;
                    let stat = tree.stat(path).ok()??;
                    Some((kind_of(stat.st_mode), stat.st_size as u64))
                })
                .collect(),
        ),
        Request::List { path } => Answer::List(
            protocol::validate_path(path)
                .ok()
                .and_then(|()| tree.list(path).ok())
                .unwrap_or_default(),
        ),
        Request::Children { path } => Answer::Children(
            protocol::validate_path(path)
                .ok()
                .and_then(|()| tree.children(path).ok())
                .unwrap_or_default(),
        ),
        Request::Hashes { path } => Answer::Hashes(
            protocol::validate_path(path)
                .ok()
                .and_then(|()| tree.zone_hashes(path, zone_size).ok())
                .unwrap_or_default(),
        ),
        Request::Sync => Answer::Synced,
    }
}

/// Marks SECOND has to report (exposed for tools).
pub fn pending_overwrite(book: &ReplicationBook) -> Result<Marks, MirrorError> {
    let mut marks = book.marks(MarkKind::Intent)?;
    marks.extend(&book.marks(MarkKind::Dirty)?);
    Ok(marks)
}
