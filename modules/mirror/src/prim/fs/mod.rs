//! The FUSE file system mounted over the replicated directory on PRIM.
//!
//! Each mutating request is applied to the real tree underneath (through the
//! descriptor opened before mounting) inside an engine [`Change`], then answered only
//! when the acknowledgement mode allows, from whichever thread sees the acknowledgement.
//! Reads of files opened read-only go straight to the real file through FUSE
//! passthrough and never reach this process.
//!
//! - [`inodes`]: inode numbers by (parent, name).
//! - [`handles`]: open files (cached or passthrough) and directories.
//! - [`namespace`]: create, link, remove, rename.
//! - [`data`]: write, truncate, create-and-open, fallocate, fsync.
//! - [`attrs`]: setattr, extended attributes, stat conversions.
//!
//! [`Change`]: crate::prim::engine::Change

mod attrs;
mod data;
mod handles;
mod inodes;
mod namespace;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileHandle, Filesystem, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};

use crate::prim::engine::{Engine, Level, Touch};
use crate::protocol::{Kind, Op, RelPath};
use crate::tree::{join, read_at};
use attrs::{attr_of, errno_of, errno_of_rustix, reply_sized, Requested};
use data::Syncers;
use handles::{DirHandle, Handle};
use inodes::Inodes;

/// How long the kernel may cache entries and attributes: every change goes through
/// this file system, which answers with fresh attributes.
const TTL: Duration = Duration::from_secs(1);

pub(crate) struct MirrorFs {
    engine: Arc<Engine>,
    inodes: Arc<Mutex<Inodes>>,
    /// Held shared by a request from the moment it resolves an inode to a path until it
    /// is done with that path (a lookup's stat, a change's local apply and frame), and
    /// exclusively by the requests that move or remove names (rename, unlink, rmdir).
    /// With several dispatch threads a path is then never used after a rename made it
    /// stale: locally it would name another file or none, and SECOND would get the
    /// change under the old name after the rename. The kernel's own directory locks do
    /// not cover this (a rename of `a` does not lock `a`, in which a create or a write
    /// resolves `a/f`). Lock order: names, then the engine's locks.
    names: RwLock<()>,
    /// Open files by handle number (shared with create's deferred reply, which
    /// forgets the handle when the create fails).
    handles: Arc<Mutex<HashMap<u64, Handle>>>,
    dirs: Mutex<HashMap<u64, DirHandle>>,
    /// The next file or directory handle number; never reused.
    next_handle: AtomicU64,
    /// The kernel accepted FUSE passthrough at init.
    passthrough: AtomicBool,
    /// Local fsyncs run here, off the FUSE dispatch thread.
    syncers: Syncers,
    /// Writeback started behind sequential writes (see [`data`]'s `write_behind`).
    writeback: Syncers,
    /// Changes of `security.capability` on any file so far (see [`attrs::CAPABILITY`]).
    capability_changes: AtomicU64,
    /// Tells the kernel what changed behind its back; set once mounted.
    notifier: Arc<OnceLock<fuser::Notifier>>,
}

impl MirrorFs {
    pub(crate) fn new(engine: Arc<Engine>) -> Self {
        MirrorFs {
            engine,
            inodes: Arc::new(Mutex::new(Inodes::new())),
            names: RwLock::new(()),
            handles: Arc::new(Mutex::new(HashMap::new())),
            dirs: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            passthrough: AtomicBool::new(false),
            syncers: Syncers::new("mirror-fsync", Syncers::FSYNC_THREADS),
            writeback: Syncers::new("mirror-writeback", 1),
            capability_changes: AtomicU64::new(0),
            notifier: Arc::new(OnceLock::new()),
        }
    }

    /// Where the mount's notifier goes once the session exists.
    pub(crate) fn notifier_slot(&self) -> Arc<OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    fn inodes(&self) -> std::sync::MutexGuard<'_, Inodes> {
        self.inodes.lock().expect("inode lock")
    }

    /// For a request that resolves and uses paths without changing anything.
    fn resolving(&self) -> RwLockReadGuard<'_, ()> {
        self.names.read().expect("names lock")
    }

    /// For a request that changes what its paths name. It waits for room in the send
    /// window first, so that a writer throttled by a slow peer does not hold the names
    /// (and every lookup behind a waiting rename) meanwhile.
    fn changing(&self) -> RwLockReadGuard<'_, ()> {
        self.engine.wait_for_window();
        self.names.read().expect("names lock")
    }

    /// For a request that moves or removes names.
    fn moving(&self) -> RwLockWriteGuard<'_, ()> {
        self.engine.wait_for_window();
        self.names.write().expect("names lock")
    }

    fn path(&self, ino: INodeNo) -> Result<RelPath, Errno> {
        self.inodes().path(ino.0).ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<RelPath, Errno> {
        Ok(join(&self.path(parent)?, name.as_bytes()))
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
            None => done(Ok(value)),
            Some(level) => self.engine.wait(
                ticket,
                level,
                Box::new(move |result| done(result.map(|()| value).map_err(Errno::from_i32))),
            ),
        }
    }

    /// Applies `op` (with `data`) to the real tree as one change and answers `reply`
    /// once the acknowledgement mode allows. `applied` runs right after the local apply
    /// succeeded, before any answer can reach the kernel (inode table updates).
    fn apply_change(
        &self,
        path: &[u8],
        touch: Touch,
        op: Op,
        data: Vec<u8>,
        applied: impl FnOnce(),
        reply: ReplyEmpty,
    ) {
        let engine = self.engine.clone();
        let level = engine.write_level().or(Some(Level::Received));
        self.change(
            path,
            touch,
            level,
            move || {
                engine.tree.apply(&op, &data)?;
                applied();
                Ok((op, data, ()))
            },
            move |result| match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            },
        );
    }
}

impl Filesystem for MirrorFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS);
        // We drop set-ID bits and capabilities on write, truncation and allocation
        // (chown's are dropped by the real file system): the kernel then stops asking
        // for security.capability before every cached write, one request in three.
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        if self.engine.config.passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(2).is_ok()
        {
            self.passthrough.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _names = self.resolving();
        let path = match self.child(parent, name) {
            Ok(path) => path,
            Err(e) => return reply.error(e),
        };
        match self.engine.tree.stat(&path) {
            Ok(Some(stat)) => {
                let ino = self.inodes().lookup(parent.0, name.as_bytes(), stat.st_ino);
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
        self.get_attributes(ino, fh, reply)
    }

    fn setattr(
        &self,
        req: &Request,
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
        let requested = Requested {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        self.change_attributes(req, ino, requested, fh, reply)
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _names = self.resolving();
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
        let _names = self.changing();
        self.make_node(req, parent, name, mode & !umask, rdev, reply);
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
        let _names = self.changing();
        self.make_dir(req, parent, name, mode & !umask, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _names = self.moving();
        self.remove(parent, name, false, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _names = self.moving();
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
        let _names = self.changing();
        self.make_symlink(req, parent, link_name, target, reply);
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
        let _names = self.moving();
        self.rename_entry(parent, name, newparent, newname, flags, reply);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.make_link(reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _names = self.resolving();
        self.open_file(ino, flags, reply);
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
            .handle_file(fh)
            .and_then(|file| read_at(file.as_fd(), offset, size as usize).map_err(errno_of))
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
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _names = self.changing();
        let kill_suidgid = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        self.write_data(ino, fh, offset, data, kill_suidgid, reply);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // `fsync` mode: writes return before SECOND has them; a close (each close
        // flushes) returns once SECOND received every change before it, as a write
        // does in `write` mode. Otherwise every write already waited.
        if self.engine.config.ack != crate::AckMode::Fsync {
            return reply.ok();
        }
        let ticket = self.engine.barrier();
        self.engine.wait(
            ticket,
            Level::Received,
            Box::new(move |result| match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(Errno::from_i32(e)),
            }),
        );
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
        self.release_handle(fh, reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _names = self.changing();
        let file = self.handle_file(fh).ok();
        self.sync(ino, file, datasync, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _names = self.resolving();
        self.open_dir(ino, reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        let _names = self.resolving();
        self.read_dir(ino, fh, offset, reply);
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
        let _names = self.changing();
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
            Err(e) => reply.error(errno_of_rustix(e)),
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
        let _names = self.changing();
        let op = match self.changeable_path(ino) {
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
        let _names = self.resolving();
        reply_sized(self.get_xattr(ino, name.as_bytes()), size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _names = self.resolving();
        let names =
            (self.path(ino)).and_then(|p| self.engine.tree.list_xattr(&p).map_err(errno_of));
        reply_sized(names, size, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _names = self.changing();
        let op = match self.changeable_path(ino) {
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
        let _names = self.changing();
        self.create_file(req, parent, name, mode & !umask, flags, reply);
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _names = self.changing();
        let path = self.path(ino).and_then(|path| {
            self.drop_set_id_unless_privileged(req, &path)
                .map(|()| path)
        });
        match path {
            Ok(path) => self.allocate(path, fh, offset, length, mode, reply),
            Err(e) => reply.error(e),
        }
    }
}
