//! The applier thread: applies the stream in order to SECOND's tree, answers
//! reintegration requests, and syncs what it applied before advancing the durable
//! watermark (at once in `durable` mode and on an fsync, within
//! [`SecondConfig::sync_every`] otherwise).

use std::collections::BTreeSet;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Instant;

use rustix::fs::OFlags;
use tokio::sync::mpsc as amps;

use super::*;
use crate::protocol::{Answer, Down, Op, RelPath, Request, Up};
use crate::tree::{kind_of, Tree, WriteBehind};

/// Work for the applier thread, in stream order.
pub(super) enum Work {
    Frame(Down, Vec<u8>, usize),
    /// Reader ended; finish and stop.
    End,
}

/// Bytes received and not yet taken by the applier, which SECOND holds in memory. The
/// reader waits for room beyond [`Backlog::LIMIT`]: a disk slower than the link then
/// slows PRIM down (acknowledgements stop, its send window fills, and after a whole
/// link timeout it reports the peer lost) instead of growing SECOND's memory.
pub(super) struct Backlog(tokio::sync::Semaphore);

impl Backlog {
    pub(super) const LIMIT: usize = 64 << 20;

    pub(super) fn new() -> Backlog {
        Backlog(tokio::sync::Semaphore::new(Self::LIMIT))
    }

    /// Waits for room for a frame of `len` bytes; false once the applier has stopped.
    pub(super) async fn admit(&self, len: usize) -> bool {
        match self.0.acquire_many(Self::cost(len)).await {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// The applier took a frame of `len` bytes.
    pub(super) fn taken(&self, len: usize) {
        self.0.add_permits(Self::cost(len) as usize);
    }

    pub(super) fn queued(&self) -> usize {
        Self::LIMIT - self.0.available_permits()
    }

    /// The applier stopped: nobody will make room any more.
    fn close(&self) {
        self.0.close();
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

/// The file the last write went to, kept open for the next write to it.
struct OpenForWrite {
    path: RelPath,
    fd: std::os::fd::OwnedFd,
    /// Writeback is started behind sequential writes, so that SECOND's periodic sync
    /// finds little to write (it waits for all of it, and the stream for it).
    behind: WriteBehind,
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

pub(super) fn apply_loop(
    shared: &Shared,
    work: mpsc::Receiver<Work>,
    backlog: &Backlog,
    watermarks: &Watermarks,
    up: &amps::UnboundedSender<Up>,
) {
    let _closing = Closing(backlog);
    let tree = &shared.tree;
    let mut unsynced = Unsynced::default();
    let mut write_cache: Option<OpenForWrite> = None;
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
            match work.recv_timeout(APPLIER_POLL) {
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
                                path: op.path().to_vec(),
                                error: e.to_string(),
                            });
                        }
                        note_unsynced(&mut unsynced, &op, seq);
                        if matches!(op, Op::Fsync { .. }) {
                            // `fsync` mode: PRIM's fsync waits for this.
                            sync(shared, &mut unsynced, watermarks);
                        }
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
            .is_some_and(|since| since.elapsed() >= shared.config.sync_every)
        {
            sync(shared, &mut unsynced, watermarks);
        }
    }
}

/// Applies an op, keeping the last written file open for the next write to it. An
/// fsync is left to the sync of everything before it that follows.
fn apply_op(tree: &Tree, op: &Op, data: &[u8], cache: &mut Option<OpenForWrite>) -> io::Result<()> {
    match op {
        Op::Write { path, offset } => {
            if cache.as_ref().is_none_or(|open| open.path != *path) {
                *cache = Some(OpenForWrite {
                    path: path.clone(),
                    fd: tree.open_at(path, OFlags::WRONLY, 0)?,
                    behind: WriteBehind::default(),
                });
            }
            let open = cache.as_ref().expect("just filled");
            crate::tree::write_all_at(&open.fd, data, *offset)?;
            if let Some(span) = open.behind.wrote(*offset, data.len() as u64) {
                open.behind.start(&open.fd, span);
            }
            Ok(())
        }
        Op::Fsync { .. } => Ok(()),
        op => tree.apply(op, data),
    }
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
mod tests {
    use std::time::Duration;

    use super::*;

    async fn admitted_within(backlog: &Backlog, len: usize, wait: Duration) -> Option<bool> {
        tokio::time::timeout(wait, backlog.admit(len)).await.ok()
    }

    #[tokio::test]
    async fn the_reader_waits_for_the_applier_once_the_backlog_is_full() {
        let backlog = Backlog::new();
        assert!(backlog.admit(Backlog::LIMIT - 10).await);
        assert!(backlog.admit(10).await);
        assert_eq!(backlog.queued(), Backlog::LIMIT);
        let short = Duration::from_millis(50);
        assert_eq!(admitted_within(&backlog, 1, short).await, None);
        backlog.taken(10);
        assert_eq!(admitted_within(&backlog, 1, short).await, Some(true));
        assert_eq!(backlog.queued(), Backlog::LIMIT - 9);
        // A frame larger than the whole backlog waits for it to empty.
        backlog.taken(Backlog::LIMIT - 9);
        assert_eq!(
            admitted_within(&backlog, 2 * Backlog::LIMIT, short).await,
            Some(true)
        );
    }

    #[tokio::test]
    async fn a_reader_waiting_for_a_stopped_applier_is_told() {
        let backlog = std::sync::Arc::new(Backlog::new());
        assert!(backlog.admit(Backlog::LIMIT).await);
        let waiting = tokio::spawn({
            let backlog = backlog.clone();
            async move { backlog.admit(1).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(Closing(&backlog));
        let admitted = tokio::time::timeout(Duration::from_secs(1), waiting).await;
        assert!(!admitted.expect("told at once").unwrap());
    }
}
