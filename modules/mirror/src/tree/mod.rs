//! A directory tree reached through a descriptor opened before anything was mounted
//! over it: PRIM's real files under its FUSE mount, SECOND's copy under its read-only
//! bind mount.
//!
//! Every path is resolved beneath the root with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` for its parent and a no-follow `*at` call for its last
//! component, so neither a path from the network nor a symlink planted in the tree can
//! reach outside it.
//!
//! - [`apply`]: operations and `ensure` (make an entry match the peer's).
//! - [`scan`]: listings, entries, zones and their hashes.
//! - [`write_behind`]: starting the writeback of what a descriptor wrote.

mod apply;
mod scan;
mod write_behind;

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec};

use crate::protocol::{Kind, Meta, RelPath, SetTime, Time};

pub use write_behind::WriteBehind;

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
/// The attributes of an [`Op::SetAttr`](crate::protocol::Op::SetAttr) set through an
/// open file rather than a name: for a file whose last name is gone.
pub fn set_attr_on(
    fd: impl AsFd,
    perm: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    atime: Option<SetTime>,
    mtime: Option<SetTime>,
) -> io::Result<()> {
    if uid.is_some() || gid.is_some() {
        rfs::fchown(&fd, uid.map(uid_of), gid.map(gid_of)).io()?;
    }
    if let Some(perm) = perm {
        rfs::fchmod(&fd, Mode::from_raw_mode(perm)).io()?;
    }
    if atime.is_some() || mtime.is_some() {
        let times = rfs::Timestamps {
            last_access: timespec(atime),
            last_modification: timespec(mtime),
        };
        rfs::futimens(&fd, &times).io()?;
    }
    Ok(())
}

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

    /// The tree rooted at an open directory.
    pub(crate) fn from_root(root: OwnedFd) -> Tree {
        Tree { root }
    }

    /// Whether the tree is on a read-only mount (nothing could be changed in it).
    pub fn read_only(&self) -> io::Result<bool> {
        let vfs = rfs::fstatvfs(&self.root).io()?;
        Ok(vfs.f_flag.contains(rfs::StatVfsMountFlags::RDONLY))
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
