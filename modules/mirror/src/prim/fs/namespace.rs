//! Entries: creating, linking, removing and renaming names. Each is one change whose
//! bookkeeping mark is the parent directory (reintegration compares a directory's
//! children with SECOND's).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use fuser::{Errno, Generation, INodeNo, RenameFlags, ReplyEmpty, ReplyEntry, Request};

use super::attrs::attr_of;
use super::{MirrorFs, TTL};
use crate::prim::engine::{Level, Touch};
use crate::protocol::{parent_of, Kind, Op, RelPath};
use crate::tree::{join, kind_of};

impl MirrorFs {
    /// mknod (`mode` carries the file type; the umask is already applied).
    pub(super) fn make_node(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
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
                perm: mode & 0o7777,
                uid,
                gid,
            }
        } else {
            Op::Mknod {
                path: join(&parent_path, name.as_bytes()),
                kind,
                perm: mode & 0o7777,
                rdev: rdev.into(),
                uid,
                gid,
            }
        };
        self.create_entry(parent, name, op, reply);
    }

    /// mkdir (the umask is already applied to `mode`).
    pub(super) fn make_dir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        reply: ReplyEntry,
    ) {
        let Ok(parent_path) = self.path(parent) else {
            return reply.error(Errno::ENOENT);
        };
        let (uid, gid, setgid) = self.owner(req, &parent_path);
        let mut perm = mode & 0o7777;
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

    pub(super) fn make_symlink(
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

    pub(super) fn make_link(&self, reply: ReplyEntry) {
        // Hard links are refused (as SafeKit does): the bookkeeping names paths, so a
        // change through one name would not be known under the other, and SECOND's
        // copy would hold two files where PRIM has one.
        tracing::warn!("refused to create a hard link in the replicated directory");
        reply.error(Errno::EPERM)
    }

    /// The path of `ino` for a change of its attributes, refused (`EMLINK`, "too many
    /// links") for a regular file that has several names (a hard link made before the
    /// directory was replicated): the change would reach SECOND under one name only.
    pub(super) fn changeable_path(&self, ino: INodeNo) -> Result<RelPath, Errno> {
        let path = self.path(ino)?;
        match self.engine.tree.stat(&path) {
            Ok(Some(stat)) if is_linked_file(&stat) => {
                tracing::warn!(
                    path = %String::from_utf8_lossy(&path),
                    links = stat.st_nlink,
                    "refused to change a file with several hard links"
                );
                Err(Errno::EMLINK)
            }
            _ => Ok(path),
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
        let touch = Touch::entry(&path);
        let level = engine.write_level().or(Some(Level::Received));
        let stat = Arc::new(Mutex::new(None::<rustix::fs::Stat>));
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
                let inodes = self.inodes.clone();
                let (parent, name) = (parent.0, name.as_bytes().to_vec());
                move |result| match (result, stat.lock().expect("stat slot").take()) {
                    (Ok(()), Some(stat)) => {
                        let ino =
                            inodes
                                .lock()
                                .expect("inode lock")
                                .lookup(parent, &name, stat.st_ino);
                        reply.entry(&TTL, &attr_of(ino, &stat), Generation(0))
                    }
                    (Ok(()), None) => reply.error(Errno::ENOENT),
                    (Err(e), _) => reply.error(e),
                }
            },
        );
    }

    pub(super) fn owner(&self, req: &Request, parent: &[u8]) -> (u32, u32, bool) {
        // A set-group-ID directory gives its group to new entries (and its bit to new
        // directories), as the kernel does on a local file system.
        match self.engine.tree.stat(parent) {
            Ok(Some(stat)) if stat.st_mode & libc::S_ISGID != 0 => (req.uid(), stat.st_gid, true),
            _ => (req.uid(), req.gid(), false),
        }
    }

    /// unlink and rmdir.
    pub(super) fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        let path = match self.child(parent, name) {
            Ok(path) => path,
            Err(e) => return reply.error(e),
        };
        let op = if dir {
            Op::Rmdir { path: path.clone() }
        } else {
            Op::Unlink { path: path.clone() }
        };
        let touch = Touch::path(&parent_of(&path));
        let unlinked = || self.inodes().unlink(parent.0, name.as_bytes());
        self.apply_change(&path, touch, op, Vec::new(), unlinked, reply);
    }

    pub(super) fn rename_entry(
        &self,
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
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        let touch = Touch::rename(&from, &to, exchange);
        let renamed = || {
            let (name, newname) = (name.as_bytes(), newname.as_bytes());
            self.inodes()
                .rename(parent.0, name, newparent.0, newname, exchange)
        };
        self.apply_change(&from, touch, op, Vec::new(), renamed, reply);
    }
}

/// A regular file with more than one name.
pub(super) fn is_linked_file(stat: &rustix::fs::Stat) -> bool {
    crate::tree::kind_of(stat.st_mode) == Kind::File && stat.st_nlink > 1
}
