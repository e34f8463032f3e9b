//! The FUSE file system mounted over the replicated directory on PRIM.
//!
//! Each mutating request is applied to the real tree underneath (through the
//! descriptor opened before mounting) inside an engine [`Change`], then answered only
//! when the acknowledgement mode allows, from whichever thread sees the acknowledgement.
//! Reads of files opened read-only go straight to the real file through FUSE
//! passthrough and never reach this process.
//!
//! Inodes are by path: a node is (parent, name); paths are rebuilt by walking parents,
//! so a rename moves a whole subtree at once. Hard links therefore appear as distinct
//! FUSE inodes (st_ino is still the real one).
//!
//! Passthrough and the kernel's rules for mixing open modes on one inode
//! (fs/fuse/iomode.c): a passthrough open fails while a cached open exists, and once a
//! passthrough open exists every other open must be passthrough too. So a read-only
//! open is passthrough unless the inode has cached (writable) opens; a writable open is
//! cached unless the inode has passthrough opens, in which case it is
//! passthrough + direct I/O (its reads and writes still come here).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use rustix::fs::{Mode, OFlags};

use crate::prim::engine::{Engine, Level, Ticket, Touch};
use crate::protocol::{Kind, Op, RelPath, SetTime, Time};
use crate::tree::{join, kind_of, read_at, write_all_at};

/// How long the kernel may cache entries and attributes: every change goes through
/// this file system, which answers with fresh attributes.
const TTL: Duration = Duration::from_secs(1);

struct Node {
    parent: u64,
    name: Vec<u8>,
    lookups: u64,
    /// False once unlinked or replaced: it has no path any more.
    linked: bool,
    cached_opens: u32,
    passthrough_opens: u32,
    backing: Weak<BackingId>,
}

struct Inodes {
    nodes: HashMap<u64, Node>,
    by_name: HashMap<(u64, Vec<u8>), u64>,
    next: u64,
}

const ROOT: u64 = 1;

impl Inodes {
    fn new() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                parent: ROOT,
                name: Vec::new(),
                lookups: 1,
                linked: true,
                cached_opens: 0,
                passthrough_opens: 0,
                backing: Weak::new(),
            },
        );
        Inodes {
            nodes,
            by_name: HashMap::new(),
            next: ROOT + 1,
        }
    }

    /// The path of a linked node.
    fn path(&self, ino: u64) -> Option<RelPath> {
        let mut parts = Vec::new();
        let mut at = ino;
        while at != ROOT {
            let node = self.nodes.get(&at)?;
            if !node.linked {
                return None;
            }
            parts.push(&node.name[..]);
            at = node.parent;
        }
        parts.reverse();
        Some(parts.join(&b'/'))
    }

    /// The node for (parent, name), created if new; counts one lookup.
    fn lookup(&mut self, parent: u64, name: &[u8]) -> u64 {
        if let Some(&ino) = self.by_name.get(&(parent, name.to_vec())) {
            self.nodes
                .get_mut(&ino)
                .expect("by_name is consistent")
                .lookups += 1;
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(
            ino,
            Node {
                parent,
                name: name.to_vec(),
                lookups: 1,
                linked: true,
                cached_opens: 0,
                passthrough_opens: 0,
                backing: Weak::new(),
            },
        );
        self.by_name.insert((parent, name.to_vec()), ino);
        ino
    }

    fn unlink(&mut self, parent: u64, name: &[u8]) {
        if let Some(ino) = self.by_name.remove(&(parent, name.to_vec())) {
            if let Some(node) = self.nodes.get_mut(&ino) {
                node.linked = false;
            }
        }
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        exchange: bool,
    ) {
        let moving = self.by_name.remove(&(parent, name.to_vec()));
        let replaced = self.by_name.remove(&(new_parent, new_name.to_vec()));
        if let Some(ino) = moving {
            let node = self.nodes.get_mut(&ino).expect("by_name is consistent");
            node.parent = new_parent;
            node.name = new_name.to_vec();
            self.by_name.insert((new_parent, new_name.to_vec()), ino);
        }
        if let Some(ino) = replaced {
            let node = self.nodes.get_mut(&ino).expect("by_name is consistent");
            if exchange {
                node.parent = parent;
                node.name = name.to_vec();
                self.by_name.insert((parent, name.to_vec()), ino);
            } else {
                node.linked = false;
            }
        }
    }

    fn forget(&mut self, ino: u64, count: u64) {
        if ino == ROOT {
            return;
        }
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(count);
        if node.lookups == 0 {
            let node = self.nodes.remove(&ino).expect("just found");
            if node.linked && self.by_name.get(&(node.parent, node.name.clone())) == Some(&ino) {
                self.by_name.remove(&(node.parent, node.name));
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum IoMode {
    Cached,
    Passthrough,
}

struct Handle {
    fd: Arc<OwnedFd>,
    ino: u64,
    mode: IoMode,
    _backing: Option<Arc<BackingId>>,
}

struct DirHandle {
    entries: Vec<(Vec<u8>, Kind, u64)>,
}

pub(crate) struct MirrorFs {
    engine: Arc<Engine>,
    inodes: Mutex<Inodes>,
    handles: Arc<Mutex<HashMap<u64, Handle>>>,
    dirs: Mutex<HashMap<u64, DirHandle>>,
    next_handle: AtomicU64,
    passthrough: AtomicBool,
    /// Local fsyncs run here, off the FUSE dispatch thread.
    syncers: Syncers,
}

type Job = Box<dyn FnOnce() + Send>;

/// A few long-lived threads for blocking fsyncs: starting a thread per fsync costs
/// tens of microseconds on the latency applications measure.
struct Syncers {
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
}

impl Syncers {
    const THREADS: usize = 4;

    fn new() -> Syncers {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..Self::THREADS {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("mirror-fsync-{i}"))
                .spawn(move || loop {
                    // The sender lives as long as the file system: an error means it is gone.
                    let Ok(job) = queue.lock().expect("fsync queue").recv() else {
                        return;
                    };
                    job();
                })
                .expect("spawn an fsync thread");
        }
        Syncers {
            jobs: Mutex::new(jobs),
        }
    }

    fn run(&self, job: impl FnOnce() + Send + 'static) {
        let _ = self.jobs.lock().expect("fsync jobs").send(Box::new(job));
    }
}

fn errno_of(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

fn system_time(secs: i64, nanos: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nanos as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nanos as u64)
    }
}

fn attr_of(ino: u64, stat: &rustix::fs::Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: stat.st_size as u64,
        blocks: stat.st_blocks as u64,
        atime: system_time(stat.st_atime, stat.st_atime_nsec as i64),
        mtime: system_time(stat.st_mtime, stat.st_mtime_nsec as i64),
        ctime: system_time(stat.st_ctime, stat.st_ctime_nsec as i64),
        crtime: UNIX_EPOCH,
        kind: file_type(kind_of(stat.st_mode)),
        perm: (stat.st_mode & 0o7777) as u16,
        nlink: stat.st_nlink as u32,
        uid: stat.st_uid,
        gid: stat.st_gid,
        rdev: stat.st_rdev as u32,
        blksize: stat.st_blksize as u32,
        flags: 0,
    }
}

fn set_time(time: Option<TimeOrNow>) -> Option<SetTime> {
    time.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(at) => {
            let (secs, nanos) = match at.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
                Err(e) => (-(e.duration().as_secs() as i64), 0),
            };
            SetTime::At(Time { secs, nanos })
        }
    })
}

fn parent_of(path: &[u8]) -> RelPath {
    match path.iter().rposition(|b| *b == b'/') {
        Some(slash) => path[..slash].to_vec(),
        None => Vec::new(),
    }
}

impl MirrorFs {
    pub(crate) fn new(engine: Arc<Engine>) -> Self {
        MirrorFs {
            engine,
            inodes: Mutex::new(Inodes::new()),
            handles: Arc::new(Mutex::new(HashMap::new())),
            dirs: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            passthrough: AtomicBool::new(false),
            syncers: Syncers::new(),
        }
    }

    fn inodes(&self) -> std::sync::MutexGuard<'_, Inodes> {
        self.inodes.lock().expect("inode lock")
    }

    fn path(&self, ino: INodeNo) -> Result<RelPath, Errno> {
        self.inodes().path(ino.0).ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<RelPath, Errno> {
        Ok(join(&self.path(parent)?, name.as_bytes()))
    }

    fn handle_fd(&self, fh: FileHandle) -> Result<Arc<OwnedFd>, Errno> {
        self.handles
            .lock()
            .expect("handle lock")
            .get(&fh.0)
            .map(|h| h.fd.clone())
            .ok_or(Errno::EBADF)
    }

    /// Applies a change locally with `local`, then streams `op`; `done` runs once the
    /// acknowledgement mode is satisfied (or at once for unreplicated paths).
    fn change<T: Send + 'static>(
        &self,
        path: &[u8],
        touch: Touch,
        level: Option<Level>,
        local: impl FnOnce() -> std::io::Result<(Op, Vec<u8>, T)>,
        done: impl FnOnce(Result<T, Errno>) + Send + 'static,
    ) {
        if self.engine.not_replicated(path) {
            return done(local().map(|(_, _, t)| t).map_err(errno_of));
        }
        let change = match self.engine.begin(touch) {
            Ok(change) => change,
            Err(errno) => return done(Err(Errno::from_i32(errno))),
        };
        let (op, data, value) = match local() {
            Ok(applied) => applied,
            Err(e) => {
                drop(change);
                return done(Err(errno_of(e)));
            }
        };
        let ticket = change.commit(op, &data);
        match level {
            None => {
                self.engine
                    .wait(Ticket::Now, Level::Received, Box::new(|_| {}));
                done(Ok(value));
            }
            Some(level) => self.engine.wait(
                ticket,
                level,
                Box::new(move |result| done(result.map(|()| value).map_err(Errno::from_i32))),
            ),
        }
    }

    /// Creates an entry through `op`, then answers with its attributes.
    fn create_entry(&self, parent: INodeNo, name: &OsStr, op: Op, reply: ReplyEntry) {
        let path = match self.child(parent, name) {
            Ok(path) => path,
            Err(e) => return reply.error(e),
        };
        let engine = self.engine.clone();
        let tree_path = path.clone();
        let touch = Touch::path(&parent_of(&path));
        let level = engine.write_level().or(Some(Level::Received));
        let stat = Arc::new(Mutex::new(None));
        let stat_out = stat.clone();
        self.change(
            &path,
            touch,
            level,
            move || {
                engine.tree.apply(&op, &[])?;
                *stat_out.lock().expect("stat slot") = engine.tree.stat(&tree_path)?;
                Ok((op, Vec::new(), ()))
            },
            {
                let inodes_ino = {
                    // Allocated up front; forgotten by the kernel if the reply is an error.
                    self.inodes().lookup(parent.0, name.as_bytes())
                };
                move |result| match (result, stat.lock().expect("stat slot").take()) {
                    (Ok(()), Some(stat)) => {
                        reply.entry(&TTL, &attr_of(inodes_ino, &stat), Generation(0))
                    }
                    (Ok(()), None) => reply.error(Errno::ENOENT),
                    (Err(e), _) => reply.error(e),
                }
            },
        );
    }

    fn owner(&self, req: &Request, parent: &[u8]) -> (u32, u32, bool) {
        // A set-group-ID directory gives its group to new entries (and its bit to new
        // directories), as the kernel does on a local file system.
        match self.engine.tree.stat(parent) {
            Ok(Some(stat)) if stat.st_mode & libc::S_ISGID != 0 => (req.uid(), stat.st_gid, true),
            _ => (req.uid(), req.gid(), false),
        }
    }
}

impl Filesystem for MirrorFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS);
        if self.engine.config.passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(2).is_ok()
        {
            self.passthrough.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let path = match self.child(parent, name) {
            Ok(path) => path,
            Err(e) => return reply.error(e),
        };
        match self.engine.tree.stat(&path) {
            Ok(Some(stat)) => {
                let ino = self.inodes().lookup(parent.0, name.as_bytes());
                reply.entry(&TTL, &attr_of(ino, &stat), Generation(0));
            }
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(errno_of(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes().forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let stat = match fh.map(|fh| self.handle_fd(fh)) {
            Some(Ok(fd)) => {
                rustix::fs::fstat(fd.as_fd()).map_err(|e| Errno::from_i32(e.raw_os_error()))
            }
            _ => match self.path(ino) {
                Ok(path) => match self.engine.tree.stat(&path) {
                    Ok(Some(stat)) => Ok(stat),
                    Ok(None) => Err(Errno::ENOENT),
                    Err(e) => Err(errno_of(e)),
                },
                Err(e) => Err(e),
            },
        };
        match stat {
            Ok(stat) => reply.attr(&TTL, &attr_of(ino.0, &stat)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let path = match self.path(ino) {
            Ok(path) => path,
            Err(e) => return reply.error(e),
        };
        let level = self.engine.write_level();
        if let Some(size) = size {
            let fd = fh.and_then(|fh| self.handle_fd(fh).ok());
            let engine = self.engine.clone();
            let op_path = path.clone();
            let touch = Touch::path(&path).and_range(&path, size, 1, engine.config.zone_size);
            // Truncation first; attributes (if any) follow as their own change.
            let (tx, rx) = std::sync::mpsc::channel();
            self.change(
                &path,
                touch,
                None,
                move || {
                    match fd {
                        Some(fd) => rustix::fs::ftruncate(fd.as_fd(), size)
                            .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error()))?,
                        None => engine.tree.apply(
                            &Op::Truncate {
                                path: op_path.clone(),
                                size,
                            },
                            &[],
                        )?,
                    }
                    Ok((
                        Op::Truncate {
                            path: op_path,
                            size,
                        },
                        Vec::new(),
                        (),
                    ))
                },
                move |result| {
                    let _ = tx.send(result);
                },
            );
            if let Ok(Err(e)) = rx.recv() {
                return reply.error(e);
            }
        }
        let engine = self.engine.clone();
        let attrs =
            mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some();
        let op = Op::SetAttr {
            path: path.clone(),
            perm: mode.map(|m| m & 0o7777),
            uid,
            gid,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        let stat_path = path.clone();
        let finish = move |result: Result<(), Errno>| {
            let stat = result.and_then(|()| match engine.tree.stat(&stat_path) {
                Ok(Some(stat)) => Ok(stat),
                Ok(None) => Err(Errno::ENOENT),
                Err(e) => Err(errno_of(e)),
            });
            match stat {
                Ok(stat) => reply.attr(&TTL, &attr_of(ino.0, &stat)),
                Err(e) => reply.error(e),
            }
        };
        if !attrs {
            // A truncation alone waits for its acknowledgement like a write.
            let engine = self.engine.clone();
            let ticket = if level.is_some() {
                engine.begin(Touch::default()).map(|c| {
                    c.commit(
                        Op::Fsync {
                            path: path.clone(),
                            datasync: true,
                        },
                        &[],
                    )
                })
            } else {
                Ok(Ticket::Now)
            };
            return match ticket {
                Ok(ticket) => engine.wait(
                    ticket,
                    level.unwrap_or(Level::Received),
                    Box::new(move |r| finish(r.map_err(Errno::from_i32))),
                ),
                Err(e) => finish(Err(Errno::from_i32(e))),
            };
        }
        let tree_engine = self.engine.clone();
        self.change(
            &path,
            Touch::path(&path),
            level.or(Some(Level::Received)),
            move || {
                tree_engine.tree.apply(&op, &[])?;
                Ok((op, Vec::new(), ()))
            },
            finish,
        );
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .path(ino)
            .and_then(|p| self.engine.tree.meta(&p).map_err(errno_of))
        {
            Ok(Some(meta)) if meta.kind == Kind::Symlink => reply.data(&meta.target),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let Ok(parent_path) = self.path(parent) else {
            return reply.error(Errno::ENOENT);
        };
        let (uid, gid, _) = self.owner(req, &parent_path);
        let kind = kind_of(mode);
        let op = if kind == Kind::File {
            Op::Create {
                path: join(&parent_path, name.as_bytes()),
                perm: mode & !umask & 0o7777,
                uid,
                gid,
            }
        } else {
            Op::Mknod {
                path: join(&parent_path, name.as_bytes()),
                kind,
                perm: mode & !umask & 0o7777,
                rdev: rdev.into(),
                uid,
                gid,
            }
        };
        self.create_entry(parent, name, op, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let Ok(parent_path) = self.path(parent) else {
            return reply.error(Errno::ENOENT);
        };
        let (uid, gid, setgid) = self.owner(req, &parent_path);
        let mut perm = mode & !umask & 0o7777;
        if setgid {
            perm |= libc::S_ISGID;
        }
        let op = Op::Mkdir {
            path: join(&parent_path, name.as_bytes()),
            perm,
            uid,
            gid,
        };
        self.create_entry(parent, name, op, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, false, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, true, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let Ok(parent_path) = self.path(parent) else {
            return reply.error(Errno::ENOENT);
        };
        let (uid, gid, _) = self.owner(req, &parent_path);
        let op = Op::Symlink {
            path: join(&parent_path, link_name.as_bytes()),
            target: target.as_os_str().as_bytes().to_vec(),
            uid,
            gid,
        };
        self.create_entry(parent, link_name, op, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (from, to) = match (self.child(parent, name), self.child(newparent, newname)) {
            (Ok(from), Ok(to)) => (from, to),
            _ => return reply.error(Errno::ENOENT),
        };
        if self.engine.not_replicated(&from) != self.engine.not_replicated(&to) {
            // Moving data across the replication boundary would silently drop or
            // invent a file on SECOND: refuse as a cross-device move (tools copy then).
            return reply.error(Errno::EXDEV);
        }
        let op = Op::Rename {
            from: from.clone(),
            to: to.clone(),
            flags: flags.bits(),
        };
        let touch = Touch::path(&parent_of(&from)).and_path(&parent_of(&to));
        let engine = self.engine.clone();
        let level = engine.write_level().or(Some(Level::Received));
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        let applied = Arc::new(AtomicBool::new(false));
        let applied_flag = applied.clone();
        self.change(
            &from,
            touch,
            level,
            move || {
                engine.tree.apply(&op, &[])?;
                applied_flag.store(true, Ordering::SeqCst);
                Ok((op, Vec::new(), ()))
            },
            move |result| match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            },
        );
        if applied.load(Ordering::SeqCst) {
            self.inodes().rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                exchange,
            );
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let from = match self.path(ino) {
            Ok(path) => path,
            Err(e) => return reply.error(e),
        };
        let Ok(to) = self.child(newparent, newname) else {
            return reply.error(Errno::ENOENT);
        };
        self.create_entry(newparent, newname, Op::Link { from, to }, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let path = match self.path(ino) {
            Ok(path) => path,
            Err(e) => return reply.error(e),
        };
        let raw = flags.0;
        let writable = raw & libc::O_ACCMODE != libc::O_RDONLY;
        let keep = OFlags::from_bits_retain(
            (raw & (libc::O_ACCMODE | libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME)) as u32,
        );
        let fd = match self.engine.tree.open_at(&path, keep, 0) {
            Ok(fd) => Arc::new(fd),
            Err(e) => return reply.error(errno_of(e)),
        };
        let fh = self.next_handle.fetch_add(1, Ordering::SeqCst);
        let mut inodes = self.inodes();
        let Some(node) = inodes.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let passthrough = self.passthrough.load(Ordering::SeqCst)
            && if writable {
                node.passthrough_opens > 0
            } else {
                node.cached_opens == 0
            };
        if passthrough {
            let backing = match node.backing.upgrade() {
                Some(backing) => Ok(backing),
                None => reply.open_backing(fd.as_fd()).map(Arc::new),
            };
            if let Ok(backing) = backing {
                node.backing = Arc::downgrade(&backing);
                node.passthrough_opens += 1;
                drop(inodes);
                let flags = if writable {
                    FopenFlags::FOPEN_DIRECT_IO
                } else {
                    FopenFlags::empty()
                };
                self.handles.lock().expect("handle lock").insert(
                    fh,
                    Handle {
                        fd,
                        ino: ino.0,
                        mode: IoMode::Passthrough,
                        _backing: Some(backing.clone()),
                    },
                );
                return reply.opened_passthrough(FileHandle(fh), flags, &backing);
            }
            if node.passthrough_opens > 0 {
                // Cannot join the inode's passthrough opens: the kernel would refuse.
                return reply.error(Errno::EIO);
            }
        }
        node.cached_opens += 1;
        drop(inodes);
        self.handles.lock().expect("handle lock").insert(
            fh,
            Handle {
                fd,
                ino: ino.0,
                mode: IoMode::Cached,
                _backing: None,
            },
        );
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self
            .handle_fd(fh)
            .and_then(|fd| read_at(fd.as_fd(), offset, size as usize).map_err(errno_of))
        {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let fd = match self.handle_fd(fh) {
            Ok(fd) => fd,
            Err(e) => return reply.error(e),
        };
        let len = data.len() as u32;
        let Ok(path) = self.path(ino) else {
            // Unlinked: no name on SECOND either; the bytes are unreachable once closed.
            return match write_all_at(fd.as_fd(), data, offset) {
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
        if self.engine.not_replicated(&path) {
            return match write_all_at(fd.as_fd(), data, offset) {
                Ok(()) => reply.written(len),
                Err(e) => reply.error(errno_of(e)),
            };
        }
        let change = match self.engine.begin(touch) {
            Ok(change) => change,
            Err(errno) => return reply.error(Errno::from_i32(errno)),
        };
        let op = Op::Write { path, offset };
        match change.write_ahead(op, data, || write_all_at(fd.as_fd(), data, offset)) {
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

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(handle) = self.handles.lock().expect("handle lock").remove(&fh.0) {
            if let Some(node) = self.inodes().nodes.get_mut(&handle.ino) {
                match handle.mode {
                    IoMode::Cached => node.cached_opens = node.cached_opens.saturating_sub(1),
                    IoMode::Passthrough => {
                        node.passthrough_opens = node.passthrough_opens.saturating_sub(1)
                    }
                }
            }
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let fd = self.handle_fd(fh).ok();
        self.sync(ino, fd, datasync, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let entries = match self
            .path(ino)
            .and_then(|p| self.engine.tree.entries(&p).map_err(errno_of))
        {
            Ok(entries) => entries,
            Err(e) => return reply.error(e),
        };
        let fh = self.next_handle.fetch_add(1, Ordering::SeqCst);
        self.dirs
            .lock()
            .expect("dir lock")
            .insert(fh, DirHandle { entries });
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dirs = self.dirs.lock().expect("dir lock");
        let Some(dir) = dirs.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let dots = [(&b"."[..], ino.0), (&b".."[..], ino.0)];
        let all = dots
            .iter()
            .map(|(n, i)| (*n, FileType::Directory, *i))
            .chain(
                dir.entries
                    .iter()
                    .map(|(n, k, i)| (&n[..], file_type(*k), *i)),
            );
        for (index, (name, kind, entry_ino)) in all.enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(entry_ino.max(1)),
                index as u64 + 1,
                kind,
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.lock().expect("dir lock").remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(ino, None, datasync, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match rustix::fs::fstatvfs(self.engine.tree.root()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e.raw_os_error())),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let op = match self.path(ino) {
            Ok(path) => Op::SetXattr {
                path,
                name: name.as_bytes().to_vec(),
                flags,
            },
            Err(e) => return reply.error(e),
        };
        self.attribute_change(op, value.to_vec(), reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.path(ino).and_then(|p| {
            self.engine
                .tree
                .get_xattr(&p, name.as_bytes())
                .map_err(errno_of)
        }) {
            Ok(value) if size == 0 => reply.size(value.len() as u32),
            Ok(value) if value.len() <= size as usize => reply.data(&value),
            Ok(_) => reply.error(Errno::from_i32(libc::ERANGE)),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self
            .path(ino)
            .and_then(|p| self.engine.tree.list_xattr(&p).map_err(errno_of))
        {
            Ok(names) if size == 0 => reply.size(names.len() as u32),
            Ok(names) if names.len() <= size as usize => reply.data(&names),
            Ok(_) => reply.error(Errno::from_i32(libc::ERANGE)),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = match self.path(ino) {
            Ok(path) => Op::RemoveXattr {
                path,
                name: name.as_bytes().to_vec(),
            },
            Err(e) => return reply.error(e),
        };
        self.attribute_change(op, Vec::new(), reply);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions itself (default_permissions).
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Ok(parent_path) = self.path(parent) else {
            return reply.error(Errno::ENOENT);
        };
        let path = join(&parent_path, name.as_bytes());
        let (uid, gid, _) = self.owner(req, &parent_path);
        let perm = mode & !umask & 0o7777;
        let engine = self.engine.clone();
        let open_flags = OFlags::from_bits_retain(
            (flags & (libc::O_ACCMODE | libc::O_EXCL | libc::O_SYNC | libc::O_DSYNC)) as u32,
        ) | OFlags::CREATE
            | OFlags::NOFOLLOW;
        let local_path = path.clone();
        let touch = Touch::path(&parent_path);
        let level = engine.write_level().or(Some(Level::Received));
        let ino = self.inodes().lookup(parent.0, name.as_bytes());
        let fh = self.next_handle.fetch_add(1, Ordering::SeqCst);
        let attr = Arc::new(Mutex::new(None));
        let attr_out = attr.clone();
        let handles = self.handles.clone();
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
                *attr_out.lock().expect("attr slot") = Some(attr_of(ino, &stat));
                // Registered before the reply: the kernel uses the handle at once.
                if let Some(node) = self.inodes().nodes.get_mut(&ino) {
                    node.cached_opens += 1;
                }
                self.handles.lock().expect("handle lock").insert(
                    fh,
                    Handle {
                        fd: Arc::new(fd),
                        ino,
                        mode: IoMode::Cached,
                        _backing: None,
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
            move |result| match (result, attr.lock().expect("attr slot").take()) {
                (Ok(()), Some(attr)) => reply.created(
                    &TTL,
                    &attr,
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                ),
                (result, _) => {
                    // No handle for the kernel: forget ours.
                    handles.lock().expect("handle lock").remove(&fh);
                    reply.error(result.err().unwrap_or(Errno::EIO));
                }
            },
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let (fd, path) = match (self.handle_fd(fh), self.path(ino)) {
            (Ok(fd), Ok(path)) => (fd, path),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        let touch =
            Touch::path(&path).and_range(&path, offset, length, self.engine.config.zone_size);
        let op = Op::Fallocate {
            path: path.clone(),
            mode,
            offset,
            len: length,
        };
        self.change(
            &path,
            touch,
            self.engine.write_level().or(Some(Level::Received)),
            move || {
                rustix::fs::fallocate(
                    fd.as_fd(),
                    rustix::fs::FallocateFlags::from_bits_retain(mode as u32),
                    offset,
                    length,
                )
                .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error()))?;
                Ok((op, Vec::new(), ()))
            },
            move |result| match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            },
        );
    }
}

impl MirrorFs {
    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        let path = match self.child(parent, name) {
            Ok(path) => path,
            Err(e) => return reply.error(e),
        };
        let op = if dir {
            Op::Rmdir { path: path.clone() }
        } else {
            Op::Unlink { path: path.clone() }
        };
        let engine = self.engine.clone();
        let applied = Arc::new(AtomicBool::new(false));
        let applied_flag = applied.clone();
        self.change(
            &path,
            Touch::path(&parent_of(&path)),
            engine.write_level().or(Some(Level::Received)),
            move || {
                engine.tree.apply(&op, &[])?;
                applied_flag.store(true, Ordering::SeqCst);
                Ok((op, Vec::new(), ()))
            },
            move |result| match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            },
        );
        if applied.load(Ordering::SeqCst) {
            self.inodes().unlink(parent.0, name.as_bytes());
        }
    }

    fn attribute_change(&self, op: Op, value: Vec<u8>, reply: ReplyEmpty) {
        let path = op.path().to_vec();
        let engine = self.engine.clone();
        self.change(
            &path,
            Touch::path(&path),
            engine.write_level().or(Some(Level::Received)),
            move || {
                engine.tree.apply(&op, &value)?;
                Ok((op, value, ()))
            },
            move |result| match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            },
        );
    }

    /// fsync: the local sync runs on its own thread while the peer is asked for the
    /// same, then the caller waits for both.
    fn sync(&self, ino: INodeNo, fd: Option<Arc<OwnedFd>>, datasync: bool, reply: ReplyEmpty) {
        let path = match self.path(ino) {
            Ok(path) => path,
            Err(_) => {
                // Unlinked: only the local file matters.
                let result = fd.map_or(Ok(()), |fd| rustix::fs::fsync(fd.as_fd()));
                return match result {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(Errno::from_i32(e.raw_os_error())),
                };
            }
        };
        let replicated = !self.engine.not_replicated(&path);
        let ticket = if replicated {
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
        let engine = self.engine.clone();
        self.syncers.run(move || {
            let local = match &fd {
                Some(fd) if datasync => rustix::fs::fdatasync(fd.as_fd()),
                Some(fd) => rustix::fs::fsync(fd.as_fd()),
                None => match engine.tree.open_at(&path, OFlags::RDONLY, 0) {
                    Ok(fd) => rustix::fs::fsync(&fd),
                    Err(e) => Err(rustix::io::Errno::from_raw_os_error(
                        e.raw_os_error().unwrap_or(libc::EIO),
                    )),
                },
            };
            if let Err(e) = local {
                return reply.error(Errno::from_i32(e.raw_os_error()));
            }
            let level = engine.fsync_level();
            engine.wait(
                ticket,
                level,
                Box::new(move |result| match result {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(Errno::from_i32(e)),
                }),
            );
        });
    }
}
