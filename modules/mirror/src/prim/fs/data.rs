//! File contents: writes, truncation, creation with an open handle, fallocate and
//! fsync. A write is streamed to SECOND before the local pwrite (see
//! [`crate::prim::engine::Change::write_ahead`]); an fsync runs the local sync on a
//! worker thread and, in `fsync` mode, waits for SECOND's at the same time.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};

use fuser::{Errno, FileHandle, Generation, INodeNo, ReplyCreate, ReplyEmpty, ReplyWrite, Request};
use rustix::fs::{Mode, OFlags};

use super::attrs::{attr_of, errno_of, errno_of_rustix};
use super::handles::{admit, close_handle, Access, Admitted, Handle, OpenFile};
use super::{MirrorFs, TTL};
use crate::prim::engine::{Level, Ticket, Touch};
use crate::protocol::{Op, RelPath};
use crate::tree::{join, write_all_at};

type Job = Box<dyn FnOnce() + Send>;

/// A few long-lived threads for blocking fsyncs: starting a thread per fsync costs
/// tens of microseconds on the latency applications measure. Idle threads wait on one
/// condition variable, so a job wakes exactly one of them (a channel behind a mutex
/// also woke a second thread per job, to take the mutex over: 4.8 context switches per
/// fsync against 3.1, measured with perf).
pub(super) struct Syncers {
    queue: Arc<SyncQueue>,
}

#[derive(Default)]
struct SyncQueue {
    state: Mutex<SyncState>,
    ready: Condvar,
}

#[derive(Default)]
struct SyncState {
    jobs: VecDeque<Job>,
    /// The file system is gone: the threads finish the jobs left, then return.
    closed: bool,
}

impl Syncers {
    /// Threads for the application's fsyncs.
    pub(super) const FSYNC_THREADS: usize = 4;

    /// `threads` threads named `name-0`, `name-1`, …
    pub(super) fn new(name: &str, threads: usize) -> Syncers {
        let queue = Arc::new(SyncQueue::default());
        for i in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || queue.serve())
                .expect("spawn an fsync thread");
        }
        Syncers { queue }
    }

    pub(super) fn run(&self, job: impl FnOnce() + Send + 'static) {
        let mut state = self.queue.state.lock().expect("fsync queue");
        state.jobs.push_back(Box::new(job));
        drop(state);
        self.queue.ready.notify_one();
    }
}

impl Drop for Syncers {
    fn drop(&mut self) {
        self.queue.state.lock().expect("fsync queue").closed = true;
        self.queue.ready.notify_all();
    }
}

impl SyncQueue {
    fn serve(&self) {
        loop {
            let mut state = self.state.lock().expect("fsync queue");
            let job = loop {
                if let Some(job) = state.jobs.pop_front() {
                    break job;
                }
                if state.closed {
                    return;
                }
                state = self.ready.wait(state).expect("fsync queue");
            };
            drop(state);
            job();
        }
    }
}

impl MirrorFs {
    pub(super) fn write_data(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        kill_suidgid: bool,
        reply: ReplyWrite,
    ) {
        let file = match self.handle_file(fh) {
            Ok(file) => file,
            Err(e) => return reply.error(e),
        };
        let len = data.len() as u32;
        let local_write = || -> std::io::Result<()> {
            write_all_at(file.as_fd(), data, offset)?;
            self.write_behind(&file, offset, data.len() as u64);
            Ok(())
        };
        let Ok(path) = self.path(ino) else {
            // Unlinked: no name on SECOND either; the bytes are unreachable once closed.
            return match local_write() {
                Ok(()) => reply.written(len),
                Err(e) => reply.error(errno_of(e)),
            };
        };
        let touch = Touch::range(
            &path,
            offset,
            data.len() as u64,
            self.engine.config.zone_size,
        );
        if let Err(e) = self.drop_privileges(ino, &path, file.as_fd(), kill_suidgid) {
            return reply.error(e);
        }
        if self.engine.not_replicated(&path) {
            return match local_write() {
                Ok(()) => reply.written(len),
                Err(e) => reply.error(errno_of(e)),
            };
        }
        let change = match self.engine.begin(touch) {
            Ok(change) => change,
            Err(errno) => return reply.error(Errno::from_i32(errno)),
        };
        let op = Op::Write { path, offset };
        match change.write_ahead(op, data, local_write) {
            Ok(ticket) => match self.engine.write_level() {
                None => reply.written(len),
                Some(level) => self.engine.wait(
                    ticket,
                    level,
                    Box::new(move |result| match result {
                        Ok(()) => reply.written(len),
                        Err(errno) => reply.error(Errno::from_i32(errno)),
                    }),
                ),
            },
            Err(e) => reply.error(errno_of(e)),
        }
    }

    /// After a local write: once enough has gathered, the writeback thread starts its
    /// writeback, so that the disk works while the application writes instead of all
    /// at its fsync (see [`crate::tree::WriteBehind`]). A thread of its own: a start
    /// can wait for room in the device's queue, and fsyncs must not wait behind it.
    fn write_behind(&self, file: &Arc<OpenFile>, offset: u64, len: u64) {
        if let Some(span) = file.write_behind.wrote(offset, len) {
            let file = file.clone();
            self.writeback
                .run(move || file.write_behind.start(file.as_fd(), span));
        }
    }

    /// Truncates `path` (through the open handle when there is one) as a change of its
    /// own, and returns what its acknowledgement will be; setattr sends the other
    /// attributes after it (their acknowledgement covers it: the stream is in order).
    pub(super) fn truncate(
        &self,
        path: &[u8],
        fh: Option<FileHandle>,
        size: u64,
    ) -> Result<Ticket, Errno> {
        let file = fh.and_then(|fh| self.handle_file(fh).ok());
        let local = || match &file {
            Some(file) => rustix::fs::ftruncate(file.as_fd(), size).map_err(errno_of_rustix),
            None => self
                .engine
                .tree
                .apply(
                    &Op::Truncate {
                        path: path.to_vec(),
                        size,
                    },
                    &[],
                )
                .map_err(errno_of),
        };
        if self.engine.not_replicated(path) {
            return local().map(|()| Ticket::Now);
        }
        // Every zone between the old and the new size changes: cut away, or zeros
        // where SECOND's copy may still hold bytes from before an earlier cut. A
        // change racing this one marks what it touches itself.
        let old_size = self.current_size(path, file.as_deref()).unwrap_or(size);
        let touch =
            Touch::path(path).and_between(path, old_size, size, self.engine.config.zone_size);
        let change = self.engine.begin(touch).map_err(Errno::from_i32)?;
        local()?;
        let op = Op::Truncate {
            path: path.to_vec(),
            size,
        };
        Ok(change.commit(op, &[]))
    }

    /// The size of `path` now, through its open handle when there is one.
    fn current_size(&self, path: &[u8], file: Option<&OpenFile>) -> Option<u64> {
        let stat = match file {
            Some(file) => rustix::fs::fstat(file.as_fd()).ok()?,
            None => self.engine.tree.stat(path).ok()??,
        };
        Some(stat.st_size as u64)
    }

    /// create: the file and its open handle (the umask is already applied to `mode`).
    pub(super) fn create_file(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Ok(parent_path) = self.path(parent) else {
            return reply.error(Errno::ENOENT);
        };
        let path = join(&parent_path, name.as_bytes());
        let (uid, gid, _) = self.owner(req, &parent_path);
        let perm = mode & 0o7777;
        let engine = self.engine.clone();
        let open_flags = OFlags::from_bits_retain(
            (flags & (libc::O_ACCMODE | libc::O_EXCL | libc::O_SYNC | libc::O_DSYNC)) as u32,
        ) | OFlags::CREATE
            | OFlags::NOFOLLOW;
        let local_path = path.clone();
        let touch = Touch::entry(&path);
        let level = engine.write_level().or(Some(Level::Received));
        let fh = self.next_handle.fetch_add(1, Ordering::SeqCst);
        let access = Access::of(flags);
        // What the local create made, for the reply: attributes, I/O mode, backing file.
        let created = Arc::new(Mutex::new(None));
        let created_out = created.clone();
        let (handles, inodes) = (self.handles.clone(), self.inodes.clone());
        self.change(
            &path,
            touch,
            level,
            || {
                let fd = engine.tree.open_at(&local_path, open_flags, perm)?;
                let io = |e: rustix::io::Errno| std::io::Error::from_raw_os_error(e.raw_os_error());
                rustix::fs::fchown(
                    &fd,
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                )
                .map_err(io)?;
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(perm)).map_err(io)?;
                let stat = rustix::fs::fstat(&fd).map_err(io)?;
                // Registered before the reply: the kernel uses the handle at once.
                let (
                    ino,
                    Admitted {
                        mode,
                        backing,
                        flags,
                    },
                ) = {
                    let mut inodes = self.inodes();
                    let ino = inodes.lookup(parent.0, name.as_bytes(), stat.st_ino);
                    let node = inodes.nodes.get_mut(&ino).expect("just looked up");
                    // A create registers no backing file of its own: it is passthrough
                    // only when joining existing passthrough opens.
                    match admit(node, access, false, || {
                        Err(std::io::Error::other("no backing file for a create"))
                    }) {
                        Ok(admitted) => (ino, admitted),
                        Err(e) => {
                            inodes.forget(ino, 1);
                            return Err(std::io::Error::from_raw_os_error(e.code()));
                        }
                    }
                };
                *created_out.lock().expect("create slot") =
                    Some((attr_of(ino, &stat), flags, backing.clone()));
                self.handles.lock().expect("handle lock").insert(
                    fh,
                    Handle {
                        file: OpenFile::new(fd),
                        ino,
                        mode,
                        _backing: backing,
                    },
                );
                Ok((
                    Op::Create {
                        path: local_path.clone(),
                        perm,
                        uid,
                        gid,
                    },
                    Vec::new(),
                    (),
                ))
            },
            move |result| match (result, created.lock().expect("create slot").take()) {
                (Ok(()), Some((attr, flags, backing))) => {
                    let fh = FileHandle(fh);
                    match backing {
                        Some(backing) => reply.created_passthrough(
                            &TTL,
                            &attr,
                            Generation(0),
                            fh,
                            flags,
                            &backing,
                        ),
                        None => reply.created(&TTL, &attr, Generation(0), fh, flags),
                    }
                }
                (result, _) => {
                    // No handle and no node for the kernel: forget ours.
                    if let Some(handle) = close_handle(&handles, &inodes, fh) {
                        inodes.lock().expect("inode lock").forget(handle.ino, 1);
                    }
                    reply.error(result.err().unwrap_or(Errno::EIO));
                }
            },
        );
    }

    pub(super) fn allocate(
        &self,
        path: RelPath,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let (ino, file) = match self.open_handle(fh) {
            Ok(handle) => handle,
            Err(e) => return reply.error(e),
        };
        let zone_size = self.engine.config.zone_size;
        let shifts =
            rustix::fs::FallocateFlags::COLLAPSE_RANGE | rustix::fs::FallocateFlags::INSERT_RANGE;
        let touch = if rustix::fs::FallocateFlags::from_bits_retain(mode as u32).intersects(shifts)
        {
            // Everything from `offset` on moves, and the end of the file with it.
            let size = self.current_size(&path, Some(&*file)).unwrap_or(offset);
            let end = size.max(offset).saturating_add(length);
            Touch::path(&path).and_between(&path, offset, end, zone_size)
        } else {
            Touch::path(&path).and_range(&path, offset, length, zone_size)
        };
        let op = Op::Fallocate {
            path: path.clone(),
            mode,
            offset,
            len: length,
        };
        let distrust = self.distrust_pages_on_error(ino);
        self.change(
            &path,
            touch,
            self.engine.write_level().or(Some(Level::Received)),
            move || {
                rustix::fs::fallocate(
                    file.as_fd(),
                    rustix::fs::FallocateFlags::from_bits_retain(mode as u32),
                    offset,
                    length,
                )
                .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error()))?;
                Ok((op, Vec::new(), ()))
            },
            move |result| match result {
                Ok(()) => reply.ok(),
                Err(e) => {
                    distrust();
                    reply.error(e)
                }
            },
        );
    }

    /// fsync: the local sync runs on a worker thread while, in `fsync` mode, the peer
    /// is asked for the same; the caller waits for both.
    pub(super) fn sync(
        &self,
        ino: INodeNo,
        file: Option<Arc<OpenFile>>,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let path = match self.path(ino) {
            Ok(path) => path,
            Err(_) => {
                // Unlinked: only the local file matters.
                let result = file.map_or(Ok(()), |file| rustix::fs::fsync(file.as_fd()));
                return match result {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(errno_of_rustix(e)),
                };
            }
        };
        let level = self.engine.fsync_level();
        let ticket = if level.is_some() && !self.engine.not_replicated(&path) {
            match self.engine.begin(Touch::default()) {
                Ok(change) => change.commit(
                    Op::Fsync {
                        path: path.clone(),
                        datasync,
                    },
                    &[],
                ),
                Err(e) => return reply.error(Errno::from_i32(e)),
            }
        } else {
            Ticket::Now
        };
        // A directory (or a file the kernel sends no handle for) is opened here, while
        // its path is current; the sync itself runs on a worker.
        let target = match file {
            Some(file) => Ok(Synced::File(file)),
            None => self
                .engine
                .tree
                .open_at(&path, OFlags::RDONLY, 0)
                .map(Synced::Opened)
                .map_err(|e| {
                    rustix::io::Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO))
                }),
        };
        let engine = self.engine.clone();
        self.syncers.run(move || {
            let local = target.and_then(|target| match &target {
                Synced::File(file) if datasync => rustix::fs::fdatasync(file.as_fd()),
                Synced::File(file) => rustix::fs::fsync(file.as_fd()),
                Synced::Opened(fd) => rustix::fs::fsync(fd),
            });
            if let Err(e) = local {
                return reply.error(errno_of_rustix(e));
            }
            engine.wait(
                ticket,
                level.unwrap_or(Level::Received),
                Box::new(move |result| match result {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(Errno::from_i32(e)),
                }),
            );
        });
    }
}

/// What an fsync syncs: an open handle's file, or one opened for the sync.
enum Synced {
    File(Arc<OpenFile>),
    Opened(std::os::fd::OwnedFd),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn fsync_jobs_run_side_by_side_up_to_the_pool_size() {
        let syncers = Syncers::new("test-fsync", Syncers::FSYNC_THREADS);
        // Every job waits for all the others: this passes only if FSYNC_THREADS run at once.
        let barrier = Arc::new(std::sync::Barrier::new(Syncers::FSYNC_THREADS));
        let (done, finished) = mpsc::channel();
        for i in 0..Syncers::FSYNC_THREADS {
            let (barrier, done) = (barrier.clone(), done.clone());
            syncers.run(move || {
                barrier.wait();
                done.send(i).unwrap();
            });
        }
        let mut seen: Vec<usize> = (0..Syncers::FSYNC_THREADS)
            .map(|_| finished.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        seen.sort();
        assert_eq!(seen, (0..Syncers::FSYNC_THREADS).collect::<Vec<_>>());
    }

    #[test]
    fn jobs_queued_before_the_pool_is_dropped_still_run() {
        let syncers = Syncers::new("test-fsync", Syncers::FSYNC_THREADS);
        let (done, finished) = mpsc::channel();
        for i in 0..100 {
            let done = done.clone();
            syncers.run(move || {
                std::thread::sleep(Duration::from_micros(100));
                done.send(i).unwrap();
            });
        }
        drop(syncers);
        drop(done);
        let mut seen: Vec<i32> = finished.iter().collect();
        seen.sort();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
    }
}
