//! The applier thread: applies the stream in order to SECOND's tree, answers
//! reintegration requests, and syncs what it applied before advancing the durable
//! watermark (at once in `durable` mode and on an fsync, within
//! [`SecondConfig::sync_every`] otherwise).

use std::collections::BTreeSet;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Mutex};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Instant;

use rampart_storage::book;
use rustix::fs::OFlags;
use tokio::sync::mpsc as amps;

use super::*;
use crate::protocol::{parent_of, Answer, Down, Op, RelPath, Request, Up, ANSWER_BUDGET};
use crate::tree::{kind_of, missing, Tree};

/// Work for the applier thread, in stream order.
pub(super) enum Work {
    Frame(Down, Vec<u8>, usize),
    /// Reader ended; finish and stop.
    End,
}

/// Bytes received and not yet taken by the applier, which SECOND holds in memory. The
/// reader waits for room beyond [`Backlog::LIMIT`]: a disk slower than the link then
/// slows PRIM down (acknowledgements come at the applier's pace and PRIM's send
/// window fills) instead of growing SECOND's memory.
pub(super) struct Backlog {
    room: tokio::sync::Semaphore,
    /// When the applier last took a frame.
    last_taken: Mutex<Instant>,
}

impl Backlog {
    pub(super) const LIMIT: usize = 64 << 20;

    pub(super) fn new() -> Backlog {
        Backlog {
            room: tokio::sync::Semaphore::new(Self::LIMIT),
            last_taken: Mutex::new(Instant::now()),
        }
    }

    /// Waits for room for a frame of `len` bytes; false once the applier has stopped.
    pub(super) async fn admit(&self, len: usize) -> bool {
        match self.room.acquire_many(Self::cost(len)).await {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// The applier took a frame of `len` bytes.
    pub(super) fn taken(&self, len: usize) {
        *self.last_taken.lock().expect("backlog lock") = Instant::now();
        self.room.add_permits(Self::cost(len) as usize);
    }

    pub(super) fn queued(&self) -> usize {
        Self::LIMIT - self.room.available_permits()
    }

    /// The applier took a frame within `period`.
    pub(super) fn moved_within(&self, period: std::time::Duration) -> bool {
        self.last_taken.lock().expect("backlog lock").elapsed() < period
    }

    /// The applier stopped: nobody will make room any more.
    fn close(&self) {
        self.room.close();
    }

    /// A frame larger than the whole backlog waits for an empty one.
    fn cost(len: usize) -> u32 {
        len.min(Self::LIMIT) as u32
    }
}

/// Closes the backlog when the applier stops, however it stops.
struct Closing<'a>(&'a Backlog);

impl Drop for Closing<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Files and directories changed since the last sync, and the periodic sync under way.
#[derive(Default)]
struct Unsynced<'scope> {
    paths: BTreeSet<RelPath>,
    last_seq: u64,
    since: Option<Instant>,
    /// The periodic sync runs beside the applier (see [`sync_behind`]).
    behind: Option<ScopedJoinHandle<'scope, Result<(), SyncFailure>>>,
}

pub(super) fn apply_loop(
    shared: &Shared,
    work: mpsc::Receiver<Work>,
    backlog: &Backlog,
    watermarks: &Watermarks,
    up: &amps::UnboundedSender<Up>,
) {
    let _closing = Closing(backlog);
    std::thread::scope(|scope| apply_in(scope, shared, work, backlog, watermarks, up));
}

fn apply_in<'scope, 'env>(
    scope: &'scope Scope<'scope, 'env>,
    shared: &'env Shared,
    work: mpsc::Receiver<Work>,
    backlog: &Backlog,
    watermarks: &'env Watermarks,
    up: &amps::UnboundedSender<Up>,
) {
    let tree = &shared.tree;
    let mut unsynced = Unsynced::default();
    let mut write_cache: Option<(RelPath, OwnedFd)> = None;
    loop {
        let next = if shared.config.ack == AckMode::Durable && unsynced.since.is_some() {
            // Group commit: sync as soon as the queue is drained.
            match work.try_recv() {
                Ok(next) => Some(next),
                Err(mpsc::TryRecvError::Empty) => {
                    sync(shared, &mut unsynced, watermarks, up);
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    // Stopped (or drained): everything queued was taken first.
                    sync(shared, &mut unsynced, watermarks, up);
                    return;
                }
            }
        } else {
            match work.recv_timeout(APPLIER_POLL) {
                Ok(next) => Some(next),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    sync(shared, &mut unsynced, watermarks, up);
                    return;
                }
            }
        };
        match next {
            Some(Work::End) => {
                sync(shared, &mut unsynced, watermarks, up);
                return;
            }
            Some(Work::Frame(message, frame, data_at)) => {
                backlog.taken(frame.len());
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
                        {
                            let mut status = shared.status.lock().expect("status lock");
                            status.bytes_applied += data.len() as u64;
                            status.failures += u64::from(result.is_err());
                        }
                        if let Err(e) = result {
                            tracing::debug!(seq, path = %String::from_utf8_lossy(op.path()), "apply failed: {e}");
                            let _ = up.send(Up::Failed {
                                seq,
                                paths: op.paths(),
                                error: e.to_string(),
                            });
                        }
                        note_unsynced(&mut unsynced, &op, seq);
                        applied(shared, seq);
                        if matches!(op, Op::Fsync { .. }) {
                            // `fsync` mode: PRIM's fsync waits for this.
                            sync(shared, &mut unsynced, watermarks, up);
                        }
                    }
                    Down::Ask { seq, request, .. } => {
                        unsynced.last_seq = seq;
                        applied(shared, seq);
                        unsynced.since.get_or_insert_with(Instant::now);
                        let answer = match request {
                            Request::Sync => {
                                sync(shared, &mut unsynced, watermarks, up);
                                Answer::Synced
                            }
                            request => answer(tree, shared.config.zone_size, &request),
                        };
                        let _ = up.send(Up::Answer { seq, answer });
                    }
                    Down::Replay { entries, .. } => {
                        write_cache = None;
                        for entry in entries {
                            for op in super::replay::replay(tree, entry) {
                                let last = unsynced.last_seq;
                                note_unsynced(&mut unsynced, &op, last);
                            }
                        }
                    }
                    Down::SyncPoint { seq, point, .. } => {
                        unsynced.last_seq = seq;
                        applied(shared, seq);
                        unsynced.since.get_or_insert_with(Instant::now);
                        if !sync(shared, &mut unsynced, watermarks, up) {
                            continue; // Not durable: this copy never shares that state.
                        }
                        // Everything SECOND changed on its own has been overwritten.
                        if let Err(e) = shared.book.adopt_sync_point(point) {
                            tracing::error!("cannot record the sync point: {e}");
                        }
                    }
                    Down::Hello { .. } | Down::Ping { .. } => {}
                }
            }
            None => {}
        }
        if unsynced.behind.as_ref().is_some_and(|b| b.is_finished()) {
            wait_behind(shared, &mut unsynced, watermarks, up);
        }
        if unsynced
            .since
            .is_some_and(|since| since.elapsed() >= shared.config.sync_every)
        {
            sync_behind(scope, shared, &mut unsynced, watermarks, up);
        }
    }
}

/// Applies an op, keeping the last written file open for the next write to it. An
/// fsync is left to the sync of everything before it that follows.
fn apply_op(
    tree: &Tree,
    op: &Op,
    data: &[u8],
    cache: &mut Option<(RelPath, OwnedFd)>,
) -> io::Result<()> {
    match op {
        Op::Write { path, offset } => {
            if cache.as_ref().is_none_or(|(cached, _)| cached != path) {
                *cache = Some((path.clone(), tree.open_at(path, OFlags::WRONLY, 0)?));
            }
            let (_, fd) = cache.as_ref().expect("just filled");
            crate::tree::write_all_at(fd, data, *offset)
        }
        Op::Fsync { .. } => Ok(()),
        op => tree.apply(op, data),
    }
}

fn note_unsynced(unsynced: &mut Unsynced, op: &Op, seq: u64) {
    match op {
        Op::Write { path, .. }
        | Op::Truncate { path, .. }
        | Op::Fallocate { path, .. }
        | Op::Zone { path, .. }
        | Op::Fsync { path, .. } => {
            unsynced.paths.insert(path.clone());
        }
        Op::Rename { from, to, flags } => {
            // What was written under a renamed path is synced under its new name: the
            // old one is gone by the sync, and skipping it would lose the data.
            let exchange = flags & libc::RENAME_EXCHANGE != 0;
            unsynced.paths = std::mem::take(&mut unsynced.paths)
                .into_iter()
                .map(|path| {
                    if book::is_within(&path, from) {
                        book::reroot(&path, from, to)
                    } else if exchange && book::is_within(&path, to) {
                        book::reroot(&path, to, from)
                    } else {
                        path
                    }
                })
                .collect();
            unsynced.paths.insert(parent_of(from));
            unsynced.paths.insert(parent_of(to));
        }
        other => {
            unsynced.paths.insert(other.path().to_vec());
            unsynced.paths.insert(parent_of(other.path()));
        }
    }
    unsynced.last_seq = unsynced.last_seq.max(seq);
    unsynced.since.get_or_insert_with(Instant::now);
}

/// Makes everything applied so far durable, then advances the durable watermark.
/// False when the sync failed: nothing applied in this session is ever durable then.
fn sync(
    shared: &Shared,
    unsynced: &mut Unsynced,
    watermarks: &Watermarks,
    up: &amps::UnboundedSender<Up>,
) -> bool {
    wait_behind(shared, unsynced, watermarks, up);
    if let Some(job) = SyncJob::take(&shared.tree, unsynced) {
        if let Err(failure) = job.run(shared, watermarks) {
            failure.report(shared, watermarks, up);
        }
    }
    !watermarks.poisoned.load(Ordering::SeqCst)
}

/// The periodic sync, on a thread beside the applier: applying goes on while the disk
/// writes what the last interval left dirty, which can take seconds under a sustained
/// write; the stream would stall behind it (the backlog fills) and PRIM would take the
/// silence for a lost peer. The files are opened here, before anything else is applied,
/// so that a rename or unlink applied meanwhile cannot make it miss one. One at a time:
/// the next waits for the next interval.
fn sync_behind<'scope, 'env>(
    scope: &'scope Scope<'scope, 'env>,
    shared: &'env Shared,
    unsynced: &mut Unsynced<'scope>,
    watermarks: &'env Watermarks,
    up: &amps::UnboundedSender<Up>,
) {
    if unsynced.behind.as_ref().is_some_and(|b| !b.is_finished()) {
        return;
    }
    wait_behind(shared, unsynced, watermarks, up);
    if let Some(job) = SyncJob::take(&shared.tree, unsynced) {
        unsynced.behind = Some(scope.spawn(move || job.run(shared, watermarks)));
    }
}

/// One sync: what was applied since the last one, its files already opened.
struct SyncJob {
    paths: BTreeSet<RelPath>,
    targets: Targets,
    /// Durable once the targets are synced.
    seq: u64,
}

/// A sync that failed, and what it covered.
struct SyncFailure {
    paths: BTreeSet<RelPath>,
    error: io::Error,
}

impl SyncJob {
    /// Takes what `unsynced` holds; `None` when nothing was applied since the last sync.
    fn take(tree: &Tree, unsynced: &mut Unsynced) -> Option<SyncJob> {
        unsynced.since.take()?;
        let paths = std::mem::take(&mut unsynced.paths);
        Some(SyncJob {
            targets: Targets::of(tree, &paths),
            paths,
            seq: unsynced.last_seq,
        })
    }

    /// Syncs and advances the durable watermark.
    fn run(self, shared: &Shared, watermarks: &Watermarks) -> Result<(), SyncFailure> {
        let result = self.targets.sync(&shared.tree);
        tracing::debug!(
            seq = self.seq,
            paths = self.paths.len(),
            all = matches!(self.targets, Targets::All),
            ok = result.is_ok(),
            "synced"
        );
        match result {
            Ok(()) => {
                advance_durable(shared, watermarks, self.seq);
                Ok(())
            }
            Err(error) => Err(SyncFailure {
                paths: self.paths,
                error,
            }),
        }
    }
}

impl SyncFailure {
    /// A failed fsync may have dropped the pages it could not write (marking them
    /// clean), so a retry on fresh descriptors would report success for data that is
    /// not on disk (PostgreSQL's "fsyncgate"). Never retried: the durable watermark
    /// stops for the rest of the session and PRIM is told, which ends the session and
    /// resends what it had not seen durable.
    ///
    /// The files it covered are damaged beyond an in-place repair: ext4 leaves a range
    /// whose writeback failed reading as zeros even after it is rewritten and synced.
    /// They are recorded (the book's dirty set, which PRIM is told at the next
    /// session) and removed before that session, so that PRIM sends them whole, into
    /// new files.
    fn report(self, shared: &Shared, watermarks: &Watermarks, up: &amps::UnboundedSender<Up>) {
        tracing::error!("syncing the copy failed: {}", self.error);
        watermarks.poisoned.store(true, Ordering::SeqCst);
        let mut damaged = rampart_storage::Marks::default();
        self.paths.iter().for_each(|path| damaged.add_path(path));
        if let Err(e) = shared.book.add(MarkKind::Dirty, &damaged) {
            tracing::error!("cannot record the files a failed sync covered: {e}");
        }
        let mut known = shared.damaged.lock().expect("damaged lock");
        known.extend(self.paths.iter().cloned());
        let listed: Vec<RelPath> = known.iter().cloned().collect();
        drop(known);
        if let Err(e) = shared.book.set_damaged(&listed) {
            tracing::error!("cannot record the files a failed sync covered: {e}");
        }
        let _ = up.send(Up::Failed {
            seq: watermarks.durable.load(Ordering::SeqCst) + 1,
            paths: self.paths.into_iter().collect(),
            error: format!("sync failed: {}", self.error),
        });
    }
}

/// Waits for the periodic sync under way, if any.
fn wait_behind(
    shared: &Shared,
    unsynced: &mut Unsynced,
    watermarks: &Watermarks,
    up: &amps::UnboundedSender<Up>,
) {
    let Some(behind) = unsynced.behind.take() else {
        return;
    };
    match behind.join() {
        Ok(Ok(())) => {}
        Ok(Err(failure)) => failure.report(shared, watermarks, up),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Everything up to `seq` was applied (or answered).
fn applied(shared: &Shared, seq: u64) {
    let mut status = shared.status.lock().expect("status lock");
    status.applied = status.applied.max(seq);
}

fn advance_durable(shared: &Shared, watermarks: &Watermarks, seq: u64) {
    if watermarks.poisoned.load(Ordering::SeqCst) {
        return;
    }
    watermarks.durable.fetch_max(seq, Ordering::SeqCst);
    watermarks.changed.notify_one();
    let mut status = shared.status.lock().expect("status lock");
    status.durable = watermarks.durable.load(Ordering::SeqCst);
    status.received = watermarks.received.load(Ordering::SeqCst);
}

/// What a sync covers: the changed files and directories, opened, or (when there are
/// many, or one cannot be opened) the whole file system.
enum Targets {
    Files(Vec<OwnedFd>),
    All,
}

impl Targets {
    fn of(tree: &Tree, paths: &BTreeSet<RelPath>) -> Targets {
        if paths.len() > 64 {
            return Targets::All;
        }
        match paths
            .iter()
            .map(|path| open_for_sync(tree, path))
            .collect::<io::Result<Vec<_>>>()
        {
            Ok(fds) => Targets::Files(fds.into_iter().flatten().collect()),
            Err(e) => {
                tracing::debug!("syncing the whole copy: {e}");
                Targets::All
            }
        }
    }

    fn sync(&self, tree: &Tree) -> io::Result<()> {
        match self {
            Targets::All => tree.sync_all(),
            Targets::Files(fds) => fds.iter().try_for_each(|fd| {
                rustix::fs::fsync(fd).map_err(|e| io::Error::from_raw_os_error(e.raw_os_error()))
            }),
        }
    }
}

/// `path` opened for fsync; `None` when it is gone (its parent is synced) or is
/// neither a file nor a directory.
fn open_for_sync(tree: &Tree, path: &[u8]) -> io::Result<Option<OwnedFd>> {
    let Some(stat) = tree.stat(path)? else {
        return Ok(None);
    };
    let flags = match kind_of(stat.st_mode) {
        crate::protocol::Kind::Dir => OFlags::RDONLY | OFlags::DIRECTORY,
        crate::protocol::Kind::File => OFlags::RDONLY,
        _ => return Ok(None),
    };
    tree.open_at(path, flags, 0).map(Some)
}

fn valid(path: &[u8]) -> std::io::Result<()> {
    protocol::validate_path(path).map_err(std::io::Error::other)
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
        Request::List { path, after } => {
            let listing =
                valid(path).and_then(|()| tree.list_after(path, after.as_deref(), ANSWER_BUDGET));
            match listing {
                Ok((entries, complete)) => Answer::List { entries, complete },
                Err(e) => Answer::Failed(format!("listing the copy: {e}")),
            }
        }
        Request::Children { path, after } => {
            let children = valid(path)
                .and_then(|()| tree.children_after(path, after.as_deref(), ANSWER_BUDGET));
            match children {
                Ok((entries, complete)) => Answer::Children { entries, complete },
                // Absent or no directory on SECOND: it has no children there.
                Err(e) if missing(&e) => Answer::Children {
                    entries: Vec::new(),
                    complete: true,
                },
                Err(e) => Answer::Failed(format!("listing a directory of the copy: {e}")),
            }
        }
        Request::Hashes { paths } => Answer::Hashes(
            paths
                .iter()
                .map(|path| {
                    protocol::validate_path(path)
                        .ok()
                        .and_then(|()| tree.zone_hashes(path, zone_size).ok())
                        .unwrap_or_default()
                })
                .collect(),
        ),
        Request::Sync => Answer::Synced,
    }
}

#[cfg(test)]
mod tests;
