//! Attributes: conversions between the real tree's stat and FUSE's, setattr and the
//! extended attribute changes.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, INodeNo, ReplyAttr, ReplyEmpty, ReplyXattr, Request,
    TimeOrNow,
};

use super::inodes::Node;
use super::{MirrorFs, TTL};
use crate::prim::engine::{Level, Ticket, Touch};
use crate::protocol::{Kind, Op, RelPath, SetTime, Time};
use crate::tree::{kind_of, set_attr_on};

/// Every write drops a file's capabilities, as on any file system; the kernel asks for
/// this attribute after each refresh of an inode's attributes, and
/// [`MirrorFs::drop_privileges`] before each write. All changes go through this file
/// system, so its absence is remembered per inode and the question costs no system
/// call; each change of it anywhere voids what was remembered everywhere (hard links
/// are distinct inodes here).
pub(super) const CAPABILITY: &[u8] = CAPABILITY_NAME.to_bytes();
const CAPABILITY_NAME: &std::ffi::CStr = c"security.capability";

pub(super) fn errno_of(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

pub(super) fn errno_of_rustix(e: rustix::io::Errno) -> Errno {
    Errno::from_i32(e.raw_os_error())
}

pub(super) fn file_type(kind: Kind) -> FileType {
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

pub(super) fn attr_of(ino: u64, stat: &rustix::fs::Stat) -> FileAttr {
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

pub(super) fn set_time(time: Option<TimeOrNow>) -> Option<SetTime> {
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

/// Answers a read of extended attributes: the size alone when the caller asked for 0
/// bytes, `ERANGE` when it does not fit in `size`.
pub(super) fn reply_sized(value: Result<Vec<u8>, Errno>, size: u32, reply: ReplyXattr) {
    match value {
        Ok(value) if size == 0 => reply.size(value.len() as u32),
        Ok(value) if value.len() <= size as usize => reply.data(&value),
        Ok(_) => reply.error(Errno::from_i32(libc::ERANGE)),
        Err(e) => reply.error(e),
    }
}

/// What a setattr asks to change.
pub(super) struct Requested {
    pub(super) mode: Option<u32>,
    pub(super) uid: Option<u32>,
    pub(super) gid: Option<u32>,
    pub(super) size: Option<u64>,
    pub(super) atime: Option<TimeOrNow>,
    pub(super) mtime: Option<TimeOrNow>,
}

impl MirrorFs {
    /// getattr: through the open handle when the kernel sends one, else by path, else
    /// through a handle of a file open after its last name went.
    pub(super) fn get_attributes(&self, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let _names = self.resolving();
        let stat = match fh.map(|fh| self.handle_file(fh)) {
            Some(Ok(file)) => rustix::fs::fstat(file.as_fd()).map_err(errno_of_rustix),
            _ => match self.path(ino) {
                Ok(path) => match self.engine.tree.stat(&path) {
                    Ok(Some(stat)) => Ok(stat),
                    Ok(None) => Err(Errno::ENOENT),
                    Err(e) => Err(errno_of(e)),
                },
                // fstat of a file open after its last name went (the kernel sends no
                // handle with it).
                Err(e) => match self.unlinked_file(ino) {
                    Some(file) => rustix::fs::fstat(file.as_fd()).map_err(errno_of_rustix),
                    None => Err(e),
                },
            },
        };
        match stat {
            Ok(stat) => reply.attr(&TTL, &attr_of(ino.0, &stat)),
            Err(e) => reply.error(e),
        }
    }

    /// setattr: a size change first (a change of its own), then the other attributes.
    pub(super) fn change_attributes(
        &self,
        req: &Request,
        ino: INodeNo,
        requested: Requested,
        fh: Option<FileHandle>,
        reply: ReplyAttr,
    ) {
        let Requested {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        } = requested;
        let _names = self.changing();
        if let Some(file) = self.unlinked_file(ino) {
            // No name on SECOND either: changed here only.
            let changed = size
                .map_or(Ok(()), |size| rustix::fs::ftruncate(file.as_fd(), size))
                .map_err(errno_of_rustix)
                .and_then(|()| {
                    let (atime, mtime) = (set_time(atime), set_time(mtime));
                    let perm = mode.map(|m| m & 0o7777);
                    set_attr_on(file.as_fd(), perm, uid, gid, atime, mtime).map_err(errno_of)
                })
                .and_then(|()| rustix::fs::fstat(file.as_fd()).map_err(errno_of_rustix));
            return match changed {
                Ok(stat) => reply.attr(&TTL, &attr_of(ino.0, &stat)),
                Err(e) => {
                    if size.is_some() {
                        self.distrust_pages_on_error(ino.0)();
                    }
                    reply.error(e)
                }
            };
        }
        let path = match self.changeable_path(ino) {
            Ok(path) => path,
            Err(e) => return reply.error(e),
        };
        let truncated = match size {
            Some(size) => match self
                .drop_set_id_unless_privileged(req, &path)
                .and_then(|()| self.truncate(&path, fh, size))
            {
                Ok(ticket) => Some(ticket),
                Err(e) => {
                    self.distrust_pages_on_error(ino.0)();
                    return reply.error(e);
                }
            },
            None => None,
        };
        let changed =
            mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some();
        let attrs = Op::SetAttr {
            path: path.clone(),
            perm: mode.map(|m| m & 0o7777),
            uid,
            gid,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        self.set_attributes(ino, path, truncated, changed.then_some(attrs), reply);
    }
}

impl MirrorFs {
    /// The attribute part of setattr (`attrs`: an [`Op::SetAttr`], or `None` when only
    /// the size changed, `truncated` being that change's ticket), answered with the
    /// attributes as the change left them: read while the path is current, since by
    /// the time the acknowledgement comes a rename may have moved the file.
    pub(super) fn set_attributes(
        &self,
        ino: INodeNo,
        path: RelPath,
        truncated: Option<Ticket>,
        attrs: Option<Op>,
        reply: ReplyAttr,
    ) {
        let level = self.engine.write_level();
        let distrust = truncated
            .is_some()
            .then(|| self.distrust_pages_on_error(ino.0));
        let answer = move |result: Result<Option<rustix::fs::Stat>, Errno>| match result {
            Ok(Some(stat)) => reply.attr(&TTL, &attr_of(ino.0, &stat)),
            failed => {
                if let Some(distrust) = distrust {
                    distrust();
                }
                reply.error(failed.err().unwrap_or(Errno::ENOENT))
            }
        };
        let Some(op) = attrs else {
            // A truncation alone waits for its own acknowledgement, like a write.
            let stat = self.engine.tree.stat(&path).map_err(errno_of);
            return match (truncated, level, stat) {
                (Some(ticket), Some(level), Ok(stat)) => self.engine.wait(
                    ticket,
                    level,
                    Box::new(move |r| answer(r.map(|()| stat).map_err(Errno::from_i32))),
                ),
                (_, _, stat) => answer(stat),
            };
        };
        let engine = self.engine.clone();
        let stat_path = path.clone();
        self.change(
            &path,
            Touch::path(&path),
            level.or(Some(Level::Received)),
            move || {
                engine.tree.apply(&op, &[])?;
                // Applied: a failure to read it back must not keep it from streaming.
                let stat = engine.tree.stat(&stat_path).ok().flatten();
                Ok((op, Vec::new(), stat))
            },
            answer,
        );
    }

    /// setxattr and removexattr.
    pub(super) fn attribute_change(&self, op: Op, value: Vec<u8>, reply: ReplyEmpty) {
        let path = op.path().to_vec();
        let capability = matches!(&op, Op::SetXattr { name, .. } | Op::RemoveXattr { name, .. } if name == CAPABILITY);
        let applied = || {
            if capability {
                self.capability_changes.fetch_add(1, Ordering::SeqCst);
            }
        };
        self.apply_change(&path, Touch::path(&path), op, value, applied, reply);
    }

    pub(super) fn get_xattr(&self, ino: INodeNo, name: &[u8]) -> Result<Vec<u8>, Errno> {
        let capability = name == CAPABILITY;
        // Read before looking: a change in between voids what this lookup finds.
        let changes = self.capability_changes.load(Ordering::SeqCst);
        let absent =
            |node: Option<&Node>| node.is_some_and(|n| n.capability_absent == Some(changes));
        if capability && absent(self.inodes().nodes.get(&ino.0)) {
            return Err(Errno::from_i32(libc::ENODATA));
        }
        let value = self
            .path(ino)
            .and_then(|path| self.engine.tree.get_xattr(&path, name).map_err(errno_of));
        if capability && value.as_ref().is_err_and(|e| e.code() == libc::ENODATA) {
            if let Some(node) = self.inodes().nodes.get_mut(&ino.0) {
                node.capability_absent = Some(changes);
            }
        }
        value
    }

    /// Before every write (the kernel leaves it to us, FUSE_HANDLE_KILLPRIV_V2): drop
    /// set-user-ID (and group-executable set-group-ID) when the writer lacks CAP_FSETID
    /// (`kill_suidgid`, the kernel's FUSE_WRITE_KILL_SUIDGID), and the file's
    /// capabilities. Each is a change of its own; the write's acknowledgement, later in
    /// the stream, covers them.
    pub(super) fn drop_privileges(
        &self,
        ino: INodeNo,
        path: &[u8],
        fd: BorrowedFd<'_>,
        kill_suidgid: bool,
    ) -> Result<(), Errno> {
        if kill_suidgid {
            let perm = rustix::fs::fstat(fd).map_err(errno_of_rustix)?.st_mode & 0o7777;
            let kept = without_set_id(perm);
            if kept != perm {
                let mode = rustix::fs::Mode::from_raw_mode(kept);
                self.unanswered_change(only_perm(path, kept), || {
                    Ok(rustix::fs::fchmod(fd, mode)?)
                })?;
                self.invalidate_attributes(ino);
            }
        }
        if self.get_xattr(ino, CAPABILITY).is_ok() {
            let op = Op::RemoveXattr {
                path: path.to_vec(),
                name: CAPABILITY.to_vec(),
            };
            self.unanswered_change(op, || Ok(rustix::fs::fremovexattr(fd, CAPABILITY_NAME)?))?;
            self.capability_changes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Before a truncation or an allocation: drop set-user-ID (and group-executable
    /// set-group-ID) when the caller lacks CAP_FSETID. The kernel leaves this to us
    /// (FUSE_HANDLE_KILLPRIV_V2) and says so with FATTR_KILL_SUIDGID, which fuser does
    /// not pass on: the caller's capabilities are read instead, only for the rare file
    /// that has such a bit.
    pub(super) fn drop_set_id_unless_privileged(
        &self,
        req: &Request,
        path: &[u8],
    ) -> Result<(), Errno> {
        let perm = match self.engine.tree.stat(path) {
            Ok(Some(stat)) => stat.st_mode & 0o7777,
            Ok(None) => return Err(Errno::ENOENT),
            Err(e) => return Err(errno_of(e)),
        };
        let kept = without_set_id(perm);
        if kept == perm || may_keep_set_id(req.pid()) {
            return Ok(());
        }
        let op = only_perm(path, kept);
        self.unanswered_change(op.clone(), || self.engine.tree.apply(&op, &[]))
    }

    /// The kernel drops its cached attributes of `ino` (changed behind its back).
    fn invalidate_attributes(&self, ino: INodeNo) {
        if let Some(notifier) = self.notifier.get() {
            if let Err(e) = notifier.inval_inode(ino, -1, 0) {
                tracing::debug!("cannot invalidate the kernel's attributes of {ino:?}: {e}");
            }
        }
    }

    /// Applies `op` locally with `local` and streams it (unless its path is not
    /// replicated) without answering anyone: a later change's answer covers it.
    fn unanswered_change(
        &self,
        op: Op,
        local: impl FnOnce() -> std::io::Result<()>,
    ) -> Result<(), Errno> {
        if self.engine.not_replicated(op.path()) {
            return local().map_err(errno_of);
        }
        let change = self
            .engine
            .begin(Touch::path(op.path()))
            .map_err(Errno::from_i32)?;
        local().map_err(errno_of)?;
        change.commit(op, &[]);
        Ok(())
    }
}

/// `perm` without what a write or truncation by an unprivileged caller drops:
/// set-user-ID, and set-group-ID when the group may execute (without it, the bit marks
/// mandatory locking, not privilege).
fn without_set_id(perm: u32) -> u32 {
    let mut kept = perm & !libc::S_ISUID;
    if perm & libc::S_IXGRP != 0 {
        kept &= !libc::S_ISGID;
    }
    kept
}

fn only_perm(path: &[u8], perm: u32) -> Op {
    Op::SetAttr {
        path: path.to_vec(),
        perm: Some(perm),
        uid: None,
        gid: None,
        atime: None,
        mtime: None,
    }
}

/// Whether the calling thread holds CAP_FSETID, from /proc (capabilities are per
/// thread; a FUSE request names the calling thread, which waits for the answer, so the
/// id cannot be reused meanwhile). When it cannot be told, no: the bits are dropped.
fn may_keep_set_id(tid: u32) -> bool {
    const CAP_FSETID: u32 = 4;
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|effective| effective & (1 << CAP_FSETID) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unprivileged_change_drops_set_user_id_and_set_group_id_only_with_group_execute() {
        for (perm, kept) in [
            (0o6777, 0o0777),
            (0o4755, 0o0755),
            (0o2775, 0o0775),
            // Set-group-ID without group execute marks mandatory locking: kept.
            (0o2764, 0o2764),
            (0o6764, 0o2764),
            (0o0644, 0o0644),
        ] {
            assert_eq!(without_set_id(perm), kept, "{perm:o}");
        }
    }

    #[test]
    fn the_callers_capability_is_read_from_its_thread_and_denied_when_unknown() {
        // "<pid>/task/<tid>"; the tests run as root, with every capability.
        let me: u32 = std::fs::read_link("/proc/thread-self")
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(may_keep_set_id(me));
        // No such thread (beyond the kernel's pid limit): the bits are dropped.
        assert!(!may_keep_set_id(u32::MAX));
    }
}
