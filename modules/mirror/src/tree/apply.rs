//! Applying operations to the tree: SECOND applies the stream with these, PRIM its own
//! namespace changes; `ensure` makes an entry match the peer's description.

use std::io;

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, RenameFlags, Timestamps};

use super::*;
use crate::protocol::{Kind, Meta, Op, SetTime};

impl Tree {
    /// Applies one replicated operation, as PRIM applied it.
    pub fn apply(&self, op: &Op, data: &[u8]) -> io::Result<()> {
        match op {
            Op::Write { path, offset } => {
                let fd = self.open_at(path, OFlags::WRONLY, 0)?;
                write_all_at(&fd, data, *offset)
            }
            Op::Truncate { path, size } => {
                let fd = self.open_at(path, OFlags::WRONLY, 0)?;
                rfs::ftruncate(&fd, *size).io()
            }
            Op::Create {
                path,
                perm,
                uid,
                gid,
            } => {
                let (parent, name) = self.parent(path)?;
                let fd = rfs::openat(
                    &parent,
                    os(name),
                    OFlags::CREATE | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(*perm),
                )
                .io()?;
                rfs::fchown(&fd, Some(uid_of(*uid)), Some(gid_of(*gid))).io()?;
                rfs::fchmod(&fd, Mode::from_raw_mode(*perm)).io()
            }
            Op::Mknod {
                path,
                kind,
                perm,
                rdev,
                uid,
                gid,
            } => {
                let (parent, name) = self.parent(path)?;
                rfs::mknodat(
                    &parent,
                    os(name),
                    file_type(*kind),
                    Mode::from_raw_mode(*perm),
                    *rdev,
                )
                .io()?;
                self.own(&parent, name, *uid, *gid, Some(*perm))
            }
            Op::Mkdir {
                path,
                perm,
                uid,
                gid,
            } => {
                let (parent, name) = self.parent(path)?;
                rfs::mkdirat(&parent, os(name), Mode::from_raw_mode(*perm)).io()?;
                self.own(&parent, name, *uid, *gid, Some(*perm))
            }
            Op::Unlink { path } => {
                let (parent, name) = self.parent(path)?;
                rfs::unlinkat(&parent, os(name), AtFlags::empty()).io()
            }
            Op::Rmdir { path } => {
                let (parent, name) = self.parent(path)?;
                rfs::unlinkat(&parent, os(name), AtFlags::REMOVEDIR).io()
            }
            Op::Rename { from, to, flags } => {
                let (from_parent, from_name) = self.parent(from)?;
                let (to_parent, to_name) = self.parent(to)?;
                rfs::renameat_with(
                    &from_parent,
                    os(from_name),
                    &to_parent,
                    os(to_name),
                    RenameFlags::from_bits_retain(*flags),
                )
                .io()
            }
            Op::Link { from, to } => {
                let (from_parent, from_name) = self.parent(from)?;
                let (to_parent, to_name) = self.parent(to)?;
                rfs::linkat(
                    &from_parent,
                    os(from_name),
                    &to_parent,
                    os(to_name),
                    AtFlags::empty(),
                )
                .io()
            }
            Op::Symlink {
                path,
                target,
                uid,
                gid,
            } => {
                let (parent, name) = self.parent(path)?;
                rfs::symlinkat(os(target), &parent, os(name)).io()?;
                self.own(&parent, name, *uid, *gid, None)
            }
            Op::SetAttr {
                path,
                perm,
                uid,
                gid,
                atime,
                mtime,
            } => {
                let (parent, name) = self.parent(path)?;
                if uid.is_some() || gid.is_some() {
                    rfs::chownat(
                        &parent,
                        os(name),
                        uid.map(uid_of),
                        gid.map(gid_of),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .io()?;
                }
                if let Some(perm) = perm {
                    chmod_no_follow(&parent, name, *perm)?;
                }
                if atime.is_some() || mtime.is_some() {
                    let times = Timestamps {
                        last_access: timespec(*atime),
                        last_modification: timespec(*mtime),
                    };
                    rfs::utimensat(&parent, os(name), &times, AtFlags::SYMLINK_NOFOLLOW).io()?;
                }
                Ok(())
            }
            Op::SetXattr { path, name, flags } => self.with_proc_path(path, |proc| {
                rfs::setxattr(
                    proc,
                    os(name),
                    data,
                    rfs::XattrFlags::from_bits_retain(*flags as u32),
                )
                .io()
            }),
            Op::RemoveXattr { path, name } => {
                self.with_proc_path(path, |proc| rfs::removexattr(proc, os(name)).io())
            }
            Op::Fallocate {
                path,
                mode,
                offset,
                len,
            } => {
                let fd = self.open_at(path, OFlags::WRONLY, 0)?;
                rfs::fallocate(
                    &fd,
                    rfs::FallocateFlags::from_bits_retain(*mode as u32),
                    *offset,
                    *len,
                )
                .io()
            }
            Op::Fsync { path, datasync } => {
                let stat = self.stat(path)?.ok_or(io::ErrorKind::NotFound)?;
                let flags = if kind_of(stat.st_mode) == Kind::Dir {
                    OFlags::RDONLY | OFlags::DIRECTORY
                } else {
                    OFlags::RDONLY
                };
                let fd = self.open_at(path, flags, 0)?;
                if *datasync {
                    rfs::fdatasync(&fd).io()
                } else {
                    rfs::fsync(&fd).io()
                }
            }
            Op::RemoveTree { path } => self.remove_tree(path),
            Op::Ensure { path, meta } => self.ensure(path, meta),
            Op::Zone {
                path,
                offset,
                zeros,
                size,
            } => {
                let fd = self.open_at(path, OFlags::WRONLY, 0)?;
                write_all_at(&fd, data, *offset)?;
                if *zeros > 0 {
                    zero_range(&fd, *offset + data.len() as u64, *zeros)?;
                }
                rfs::ftruncate(&fd, *size).io()
            }
        }
    }

    fn own(
        &self,
        parent: &Parent<'_>,
        name: &[u8],
        uid: u32,
        gid: u32,
        perm: Option<u32>,
    ) -> io::Result<()> {
        rfs::chownat(
            parent,
            os(name),
            Some(uid_of(uid)),
            Some(gid_of(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .io()?;
        // chown clears setuid/setgid; the mode is set after it, exactly.
        if let Some(perm) = perm {
            chmod_no_follow(parent, name, perm)?;
        }
        Ok(())
    }

    /// Removes `path` and everything beneath it; absent is fine.
    pub fn remove_tree(&self, path: &[u8]) -> io::Result<()> {
        let Some(stat) = self.stat(path)? else {
            return Ok(());
        };
        if path.is_empty() {
            return Err(io::Error::other("refusing to remove the replicated root"));
        }
        if kind_of(stat.st_mode) == Kind::Dir {
            for (child, _) in self.children(path)? {
                self.remove_tree(&join(path, &child))?;
            }
            let (parent, name) = self.parent(path)?;
            rfs::unlinkat(&parent, os(name), AtFlags::REMOVEDIR).io()
        } else {
            let (parent, name) = self.parent(path)?;
            rfs::unlinkat(&parent, os(name), AtFlags::empty()).io()
        }
    }

    /// Makes `path` exist as `meta` says (contents aside; a file gets `meta.size`).
    pub(super) fn ensure(&self, path: &[u8], meta: &Meta) -> io::Result<()> {
        let current = self.meta(path)?;
        let same_kind = match &current {
            Some(current) => {
                current.kind == meta.kind
                    && (meta.kind != Kind::Symlink || current.target == meta.target)
                    && (!matches!(meta.kind, Kind::CharDevice | Kind::BlockDevice)
                        || current.rdev == meta.rdev)
            }
            None => false,
        };
        if current.is_some() && !same_kind {
            self.remove_tree(path)?;
        }
        let (parent, name) = self.parent(path)?;
        if !same_kind {
            match meta.kind {
                Kind::File => {
                    rfs::openat(
                        &parent,
                        os(name),
                        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
                        Mode::from_raw_mode(meta.perm),
                    )
                    .io()?;
                }
                Kind::Dir => {
                    rfs::mkdirat(&parent, os(name), Mode::from_raw_mode(meta.perm)).io()?
                }
                Kind::Symlink => rfs::symlinkat(os(&meta.target), &parent, os(name)).io()?,
                kind => rfs::mknodat(
                    &parent,
                    os(name),
                    file_type(kind),
                    Mode::from_raw_mode(meta.perm),
                    meta.rdev,
                )
                .io()?,
            }
        }
        if meta.kind == Kind::File {
            let fd = self.open_at(path, OFlags::WRONLY, 0)?;
            rfs::ftruncate(&fd, meta.size).io()?;
        }
        let perm = (meta.kind != Kind::Symlink).then_some(meta.perm);
        self.own(&parent, name, meta.uid, meta.gid, perm)?;
        if meta.kind != Kind::Symlink {
            let wanted: std::collections::BTreeMap<_, _> = meta.xattrs.iter().cloned().collect();
            let present = self.xattrs(path, meta.kind)?;
            self.with_proc_path(path, |proc| {
                for (name, _) in &present {
                    if !wanted.contains_key(name) {
                        rfs::removexattr(proc, os(name)).io()?;
                    }
                }
                for (name, value) in &wanted {
                    if present.iter().all(|(n, v)| n != name || v != value) {
                        rfs::setxattr(proc, os(name), value, rfs::XattrFlags::empty()).io()?;
                    }
                }
                Ok(())
            })?;
        }
        let times = Timestamps {
            last_access: timespec(None),
            last_modification: timespec(Some(SetTime::At(meta.mtime))),
        };
        rfs::utimensat(&parent, os(name), &times, AtFlags::SYMLINK_NOFOLLOW).io()
    }
}

/// Makes `len` bytes at `offset` read as zeros: a hole where the file system can punch
/// one, written zeros where it cannot.
fn zero_range(fd: &OwnedFd, offset: u64, len: u64) -> io::Result<()> {
    let punch = rfs::FallocateFlags::PUNCH_HOLE | rfs::FallocateFlags::KEEP_SIZE;
    match rfs::fallocate(fd, punch, offset, len) {
        Ok(()) => return Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => {}
        Err(e) => return Err(errno(e)),
    }
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done) as usize;
        write_all_at(fd, &zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// chmod of `name` itself: `chmodat` follows a symlink in the last component, and a
/// symlink's own mode cannot be changed on Linux (it is always 0777), so a symlink is
/// left alone. Only the applier changes the tree, so nothing swaps the entry between
/// the two calls.
fn chmod_no_follow(parent: &impl AsFd, name: &[u8], perm: u32) -> io::Result<()> {
    let stat = rfs::statat(parent, os(name), AtFlags::SYMLINK_NOFOLLOW).io()?;
    if kind_of(stat.st_mode) == Kind::Symlink {
        return Ok(());
    }
    rfs::chmodat(
        parent,
        os(name),
        Mode::from_raw_mode(perm),
        AtFlags::empty(),
    )
    .io()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op_mkdir(path: &str) -> Op {
        Op::Mkdir {
            path: path.into(),
            perm: 0o750,
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn paths_cannot_leave_the_tree_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("escape")).unwrap();
        let tree = Tree::open(dir.path()).unwrap();
        let write = Op::Create {
            path: b"escape/planted".to_vec(),
            perm: 0o644,
            uid: 0,
            gid: 0,
        };
        assert!(tree.apply(&write, b"").is_err());
        assert!(!outside.path().join("planted").exists());
    }

    #[test]
    fn ensure_replaces_an_entry_of_another_kind_and_sets_attributes() {
        let dir = tempfile::tempdir().unwrap();
        let tree = Tree::open(dir.path()).unwrap();
        tree.apply(&op_mkdir("x"), b"").unwrap();
        tree.apply(
            &Op::Create {
                path: b"x/f".to_vec(),
                perm: 0o600,
                uid: 0,
                gid: 0,
            },
            b"",
        )
        .unwrap();
        let meta = Meta {
            kind: Kind::File,
            perm: 0o640,
            uid: 1234,
            gid: 99,
            size: 10,
            mtime: Time {
                secs: 1_000_000,
                nanos: 5,
            },
            rdev: 0,
            target: Vec::new(),
            xattrs: vec![(b"user.k".to_vec(), b"v".to_vec())],
        };
        tree.apply(
            &Op::Ensure {
                path: b"x".to_vec(),
                meta: meta.clone(),
            },
            b"",
        )
        .unwrap();
        assert_eq!(tree.meta(b"x").unwrap().unwrap(), meta);
        assert_eq!(tree.list(b"").unwrap().len(), 1);
    }

    #[test]
    fn a_mode_change_on_a_symlink_never_reaches_its_target() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (root, outside) = (dir.path().join("tree"), dir.path().join("outside"));
        std::fs::create_dir(&root).unwrap();
        std::fs::write(&outside, b"not in the tree").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("s")).unwrap();
        let tree = Tree::open(&root).unwrap();
        let op = Op::SetAttr {
            path: b"s".to_vec(),
            perm: Some(0o666),
            uid: None,
            gid: None,
            atime: None,
            mtime: None,
        };
        tree.apply(&op, &[]).unwrap();
        let mode = std::fs::metadata(&outside).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o7777,
            0o600,
            "chmod followed the symlink out of the tree"
        );
    }
}
