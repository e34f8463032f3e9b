//! A directory tree reached through a descriptor opened before anything was mounted
//! over it: PRIM's real files under its FUSE mount, SECOND's copy under its read-only
//! bind mount.
//!
//! Every path is resolved beneath the root with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` for its parent and a no-follow `*at` call for its last
//! component, so neither a path from the network nor a symlink planted in the tree can
//! reach outside it.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{
    self as rfs, AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Timespec, Timestamps,
};

use crate::protocol::{Kind, Meta, Op, RelPath, SetTime, Time};

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// The root of a tree, by descriptor.
pub struct Tree {
    root: OwnedFd,
}

/// The directory holding a path's last component.
enum Parent<'a> {
    Root(BorrowedFd<'a>),
    Dir(OwnedFd),
}

impl AsFd for Parent<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Parent::Root(fd) => *fd,
            Parent::Dir(fd) => fd.as_fd(),
        }
    }
}

fn os(path: &[u8]) -> &OsStr {
    OsStr::from_bytes(path)
}

fn errno(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// `rustix` results as `std::io` results.
trait IoResult<T> {
    fn io(self) -> io::Result<T>;
}

impl<T> IoResult<T> for rustix::io::Result<T> {
    fn io(self) -> io::Result<T> {
        self.map_err(errno)
    }
}

pub fn kind_of(mode: u32) -> Kind {
    match FileType::from_raw_mode(mode) {
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        FileType::Fifo => Kind::Fifo,
        FileType::Socket => Kind::Socket,
        FileType::CharacterDevice => Kind::CharDevice,
        FileType::BlockDevice => Kind::BlockDevice,
        _ => Kind::File,
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::Fifo,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharacterDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

fn timespec(time: Option<SetTime>) -> Timespec {
    match time {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_OMIT,
        },
        Some(SetTime::Now) => Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_NOW,
        },
        Some(SetTime::At(t)) => Timespec {
            tv_sec: t.secs,
            tv_nsec: t.nanos.into(),
        },
    }
}

/// Joins a relative path and a child name.
pub fn join(parent: &[u8], name: &[u8]) -> RelPath {
    if parent.is_empty() {
        return name.to_vec();
    }
    let mut path = Vec::with_capacity(parent.len() + 1 + name.len());
    path.extend_from_slice(parent);
    path.push(b'/');
    path.extend_from_slice(name);
    path
}

/// Writes all of `data` at `offset`.
pub fn write_all_at(fd: impl AsFd, mut data: &[u8], mut offset: u64) -> io::Result<()> {
    while !data.is_empty() {
        let n = rustix::io::pwrite(&fd, data, offset).io()?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
        offset += n as u64;
    }
    Ok(())
}

/// Reads up to `len` bytes at `offset` (fewer at end of file).
pub fn read_at(fd: impl AsFd, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let n = rustix::io::pread(&fd, &mut buf[filled..], offset + filled as u64).io()?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    Ok(buf)
}

impl Tree {
    /// Opens the tree rooted at `dir` (before anything is mounted over it).
    pub fn open(dir: &Path) -> io::Result<Tree> {
        let root = rfs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .io()?;
        Ok(Tree { root })
    }

    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    fn parent<'a, 'p>(&'a self, path: &'p [u8]) -> io::Result<(Parent<'a>, &'p [u8])> {
        if path.is_empty() {
            return Ok((Parent::Root(self.root.as_fd()), b"."));
        }
        match path.iter().rposition(|b| *b == b'/') {
            None => Ok((Parent::Root(self.root.as_fd()), path)),
            Some(slash) => {
                let dir = rfs::openat2(
                    &self.root,
                    os(&path[..slash]),
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                    RESOLVE,
                )
                .io()?;
                Ok((Parent::Dir(dir), &path[slash + 1..]))
            }
        }
    }

    /// Opens a path (never through a symlink).
    pub fn open_at(&self, path: &[u8], flags: OFlags, perm: u32) -> io::Result<OwnedFd> {
        let path = if path.is_empty() { &b"."[..] } else { path };
        rfs::openat2(
            &self.root,
            os(path),
            flags | OFlags::CLOEXEC,
            Mode::from_raw_mode(perm),
            RESOLVE,
        )
        .io()
    }

    /// `lstat`, or `None` when the path does not exist.
    pub fn stat(&self, path: &[u8]) -> io::Result<Option<rfs::Stat>> {
        let (parent, name) = match self.parent(path) {
            Ok(found) => found,
            Err(e) if missing(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        match rfs::statat(&parent, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(stat)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(errno(e)),
        }
    }

    /// An [`Op::Zone`] carrying zone `zone` of the file at `path` as it is now, or `None`
    /// when `path` is not a file.
    pub fn zone(
        &self,
        path: &[u8],
        zone: u64,
        zone_size: u64,
    ) -> io::Result<Option<(Op, Vec<u8>)>> {
        let Some(stat) = self.stat(path)? else {
            return Ok(None);
        };
        if kind_of(stat.st_mode) != Kind::File {
            return Ok(None);
        }
        let size = stat.st_size as u64;
        let offset = zone * zone_size;
        let data = if offset < size {
            let fd = self.open_at(path, OFlags::RDONLY, 0)?;
            read_at(&fd, offset, zone_size as usize)?
        } else {
            Vec::new()
        };
        let path = path.to_vec();
        Ok(Some((Op::Zone { path, offset, size }, data)))
    }

    /// Everything about a path but its contents, or `None` when it does not exist.
    pub fn meta(&self, path: &[u8]) -> io::Result<Option<Meta>> {
        let Some(stat) = self.stat(path)? else {
            return Ok(None);
        };
        let kind = kind_of(stat.st_mode);
        let target = if kind == Kind::Symlink {
            let (parent, name) = self.parent(path)?;
            rfs::readlinkat(&parent, os(name), Vec::new())
                .io()?
                .into_bytes()
        } else {
            Vec::new()
        };
        Ok(Some(Meta {
            kind,
            perm: stat.st_mode & 0o7777,
            uid: stat.st_uid,
            gid: stat.st_gid,
            size: if kind == Kind::File {
                stat.st_size as u64
            } else {
                0
            },
            mtime: Time {
                secs: stat.st_mtime,
                nanos: stat.st_mtime_nsec as u32,
            },
            rdev: if matches!(kind, Kind::CharDevice | Kind::BlockDevice) {
                stat.st_rdev
            } else {
                0
            },
            target,
            xattrs: self.xattrs(path, kind)?,
        }))
    }

    /// The `/proc/self/fd` name of an `O_PATH` descriptor: xattr calls through it reach
    /// the object itself, whatever kind of file it is.
    fn with_proc_path<T>(
        &self,
        path: &[u8],
        f: impl FnOnce(&str) -> io::Result<T>,
    ) -> io::Result<T> {
        let fd = self.open_at(path, OFlags::PATH | OFlags::NOFOLLOW, 0)?;
        use std::os::fd::AsRawFd;
        f(&format!("/proc/self/fd/{}", fd.as_raw_fd()))
    }

    /// Extended attributes, sorted by name. Symlinks carry none here (Linux allows no
    /// user attributes on them).
    pub fn xattrs(&self, path: &[u8], kind: Kind) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if kind == Kind::Symlink {
            return Ok(Vec::new());
        }
        self.with_proc_path(path, |proc| {
            let mut names = vec![0u8; 4096];
            let len = loop {
                match rfs::listxattr(proc, &mut names[..]) {
                    Ok(len) => break len,
                    Err(rustix::io::Errno::RANGE) => names.resize(names.len() * 4, 0),
                    Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
                    Err(e) => return Err(errno(e)),
                }
            };
            let mut attrs = Vec::new();
            for name in names[..len].split(|b| *b == 0).filter(|n| !n.is_empty()) {
                let mut value = vec![0u8; 256];
                let n = loop {
                    match rfs::getxattr(proc, os(name), &mut value[..]) {
                        Ok(n) => break n,
                        Err(rustix::io::Errno::RANGE) => value.resize(value.len() * 16, 0),
                        Err(e) => return Err(errno(e)),
                    }
                };
                value.truncate(n);
                attrs.push((name.to_vec(), value));
            }
            attrs.sort();
            Ok(attrs)
        })
    }

    /// One extended attribute's value.
    pub fn get_xattr(&self, path: &[u8], name: &[u8]) -> io::Result<Vec<u8>> {
        self.with_proc_path(path, |proc| {
            let mut value = vec![0u8; 256];
            loop {
                match rfs::getxattr(proc, os(name), &mut value[..]) {
                    Ok(n) => {
                        value.truncate(n);
                        return Ok(value);
                    }
                    Err(rustix::io::Errno::RANGE) => value.resize(value.len() * 16, 0),
                    Err(e) => return Err(errno(e)),
                }
            }
        })
    }

    /// The NUL-separated list of extended attribute names, as `listxattr` returns it.
    pub fn list_xattr(&self, path: &[u8]) -> io::Result<Vec<u8>> {
        self.with_proc_path(path, |proc| {
            let mut names = vec![0u8; 4096];
            loop {
                match rfs::listxattr(proc, &mut names[..]) {
                    Ok(n) => {
                        names.truncate(n);
                        return Ok(names);
                    }
                    Err(rustix::io::Errno::RANGE) => names.resize(names.len() * 4, 0),
                    Err(e) => return Err(errno(e)),
                }
            }
        })
    }

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
                    rfs::chmodat(
                        &parent,
                        os(name),
                        Mode::from_raw_mode(*perm),
                        AtFlags::empty(),
                    )
                    .io()?;
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
            Op::Zone { path, offset, size } => {
                let fd = self.open_at(path, OFlags::WRONLY, 0)?;
                write_all_at(&fd, data, *offset)?;
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
            rfs::chmodat(
                parent,
                os(name),
                Mode::from_raw_mode(perm),
                AtFlags::empty(),
            )
            .io()?;
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

    /// Names and kinds of a directory's entries, sorted by name.
    pub fn children(&self, path: &[u8]) -> io::Result<Vec<(Vec<u8>, Kind)>> {
        Ok(self
            .entries(path)?
            .into_iter()
            .map(|(name, kind, _)| (name, kind))
            .collect())
    }

    /// Names, kinds and inode numbers of a directory's entries, sorted by name.
    pub fn entries(&self, path: &[u8]) -> io::Result<Vec<(Vec<u8>, Kind, u64)>> {
        let fd = self.open_at(path, OFlags::RDONLY | OFlags::DIRECTORY, 0)?;
        let mut entries = Vec::new();
        for entry in rfs::Dir::new(fd).io()? {
            let entry = entry.io()?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let kind = match entry.file_type() {
                FileType::Unknown => {
                    let child = join(path, name);
                    match self.stat(&child)? {
                        Some(stat) => kind_of(stat.st_mode),
                        None => continue,
                    }
                }
                other => kind_of(other.as_raw_mode()),
            };
            entries.push((name.to_vec(), kind, entry.ino()));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(entries)
    }

    /// Every entry beneath `path` with its metadata, parents before children, sorted.
    /// Entries that vanish during the walk are skipped.
    pub fn list(&self, path: &[u8]) -> io::Result<Vec<(RelPath, Meta)>> {
        let mut out = Vec::new();
        let mut stack = vec![path.to_vec()];
        while let Some(dir) = stack.pop() {
            let children = match self.children(&dir) {
                Ok(children) => children,
                Err(e) if missing(&e) => continue,
                Err(e) => return Err(e),
            };
            let mut subdirs = Vec::new();
            for (name, kind) in children {
                let child = join(&dir, &name);
                let Some(meta) = self.meta(&child)? else {
                    continue;
                };
                if kind == Kind::Dir {
                    subdirs.push(child.clone());
                }
                out.push((child, meta));
            }
            stack.extend(subdirs.into_iter().rev());
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// blake3 of each `zone_size` zone of a regular file; empty when it is absent or
    /// not a regular file.
    pub fn zone_hashes(&self, path: &[u8], zone_size: u64) -> io::Result<Vec<[u8; 32]>> {
        match self.stat(path)? {
            Some(stat) if kind_of(stat.st_mode) == Kind::File => {}
            _ => return Ok(Vec::new()),
        }
        let fd = self.open_at(path, OFlags::RDONLY, 0)?;
        let mut hashes = Vec::new();
        let mut offset = 0u64;
        loop {
            let zone = read_at(&fd, offset, zone_size as usize)?;
            if zone.is_empty() {
                break;
            }
            hashes.push(*blake3::hash(&zone).as_bytes());
            offset += zone.len() as u64;
            if (zone.len() as u64) < zone_size {
                break;
            }
        }
        Ok(hashes)
    }

    /// Makes `path` exist as `meta` says (contents aside; a file gets `meta.size`).
    fn ensure(&self, path: &[u8], meta: &Meta) -> io::Result<()> {
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

    /// Flushes every file of the tree's file system to disk.
    pub fn sync_all(&self) -> io::Result<()> {
        rfs::syncfs(&self.root).io()
    }
}

fn uid_of(uid: u32) -> rfs::Uid {
    rfs::Uid::from_raw(uid)
}

fn gid_of(gid: u32) -> rfs::Gid {
    rfs::Gid::from_raw(gid)
}

/// True for "does not exist" errors.
pub fn missing(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
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
    fn zone_hashes_cover_the_file_in_zones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), vec![7u8; 2500]).unwrap();
        let tree = Tree::open(dir.path()).unwrap();
        let hashes = tree.zone_hashes(b"f", 1024).unwrap();
        assert_eq!(hashes.len(), 3);
        assert_eq!(hashes[0], hashes[1]);
        assert_eq!(hashes[2], *blake3::hash(&[7u8; 452]).as_bytes());
        assert!(tree.zone_hashes(b"absent", 1024).unwrap().is_empty());
    }
}
