//! Open files and directories. A file handle is cached, direct or passthrough, following
//! the kernel's rules for mixing I/O modes on one inode (fs/fuse/iomode.c): a
//! passthrough open fails while a cached open exists, and once a passthrough open
//! exists every other open must be passthrough too (so a writable one is refused:
//! see [`mode_for`]). Direct opens take no inode I/O
//! mode in the kernel, so they mix with either; we never mix them with cached opens,
//! whose cached pages older kernels (5.x's `fuse_direct_io`) leave stale under a
//! direct write. [`mode_for`] decides.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fuser::{
    BackingId, Errno, FileHandle, FileType, FopenFlags, INodeNo, OpenFlags, ReplyDirectory,
    ReplyEmpty, ReplyOpen,
};
use rustix::fs::OFlags;

use super::attrs::{errno_of, file_type};
use super::inodes::{Inodes, Node};
use super::namespace::is_linked_file;
use super::MirrorFs;
use crate::protocol::Kind;
use crate::tree::WriteBehind;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum IoMode {
    /// Reads and writes come here; the kernel keeps the file's pages in its cache.
    Cached,
    /// Read-only: the kernel reads (and maps) the real file itself. Never writable
    /// (see [`mode_for`]).
    Passthrough,
    /// Reads and writes come here, bypassing the kernel's page cache: write-only opens
    /// (nothing there to cache, and each write is copied once instead of twice), and
    /// the opens that join them.
    Direct,
}

/// How a file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Access {
    ReadOnly,
    WriteOnly,
    ReadWrite,
}

impl Access {
    pub(super) fn of(open_flags: i32) -> Access {
        match open_flags & libc::O_ACCMODE {
            libc::O_RDONLY => Access::ReadOnly,
            libc::O_WRONLY => Access::WriteOnly,
            _ => Access::ReadWrite,
        }
    }
}

/// The I/O mode of a new open of `node`, `None` when the open must be refused. Keeps
/// the invariant that an inode never has cached opens beside passthrough or direct
/// ones, and that nothing can write the real file past replication. `passthrough`: the
/// kernel accepted passthrough and a backing file may be registered for this open.
///
/// A writable open of an inode with passthrough opens is refused: the kernel requires
/// it to be passthrough too, and then maps a shared writable `mmap` of it straight onto
/// the real file (and `msync` syncs that file), so its writes would never reach SECOND.
pub(super) fn mode_for(node: &Node, access: Access, passthrough: bool) -> Option<IoMode> {
    Some(match access {
        Access::ReadOnly if passthrough && node.cached_opens == 0 => IoMode::Passthrough,
        Access::ReadOnly if node.direct_opens > 0 => IoMode::Direct,
        Access::ReadOnly => IoMode::Cached,
        _ if node.passthrough_opens > 0 => return None,
        Access::WriteOnly if node.cached_opens == 0 => IoMode::Direct,
        Access::ReadWrite if node.direct_opens > 0 => IoMode::Direct,
        Access::WriteOnly | Access::ReadWrite => IoMode::Cached,
    })
}

impl IoMode {
    fn opens(self, node: &mut Node) -> &mut u32 {
        match self {
            IoMode::Cached => &mut node.cached_opens,
            IoMode::Passthrough => &mut node.passthrough_opens,
            IoMode::Direct => &mut node.direct_opens,
        }
    }
}

/// An open admitted by [`admit`].
#[derive(Debug)]
pub(super) struct Admitted {
    pub(super) mode: IoMode,
    /// The backing file of a passthrough open.
    pub(super) backing: Option<Arc<BackingId>>,
    /// What the open's reply tells the kernel (passthrough itself is added by the
    /// passthrough reply).
    pub(super) flags: FopenFlags,
}

/// How long a writable open that conflicts with passthrough opens waits for them to
/// be released before it is refused: the kernel sends a file's RELEASE after close(2)
/// has returned (FUSE releases in the background), so a reader closed just before may
/// still count.
const RELEASE_GRACE: Duration = Duration::from_millis(200);

/// Chooses the mode of a new open of `node` and counts it there. A passthrough open
/// shares the inode's backing file, registering one with `open_backing` when there
/// is none; if that fails, the open falls back to another mode unless it had to join
/// existing passthrough opens. A cached open keeps the kernel's pages of the file
/// while they are current ([`Node::pages_current`]): a file opened again (by each of a
/// database's processes, its checkpointer) is not read whole again through here.
pub(super) fn admit(
    node: &mut Node,
    access: Access,
    passthrough: bool,
    open_backing: impl FnOnce() -> std::io::Result<BackingId>,
) -> Result<Admitted, Errno> {
    let mut mode = mode_for(node, access, passthrough).ok_or(Errno::ETXTBSY)?;
    let mut backing = None;
    if mode == IoMode::Passthrough {
        let shared = match node.backing.upgrade() {
            Some(backing) => Ok(backing),
            None => open_backing().map(Arc::new),
        };
        match shared {
            Ok(shared) => {
                node.backing = Arc::downgrade(&shared);
                backing = Some(shared);
            }
            // Cannot join the inode's passthrough opens: the kernel would refuse.
            Err(_) if node.passthrough_opens > 0 => return Err(Errno::EIO),
            Err(e) => {
                tracing::debug!("no passthrough for an open: {e}");
                mode = mode_for(node, access, false).ok_or(Errno::ETXTBSY)?;
            }
        }
    }
    *mode.opens(node) += 1;
    let flags = match mode {
        IoMode::Cached if node.pages_current => FopenFlags::FOPEN_KEEP_CACHE,
        IoMode::Cached | IoMode::Passthrough => FopenFlags::empty(),
        IoMode::Direct => {
            if access != Access::ReadOnly {
                node.pages_current = false;
            }
            FopenFlags::FOPEN_DIRECT_IO
        }
    };
    Ok(Admitted {
        mode,
        backing,
        flags,
    })
}

pub(super) struct Handle {
    pub(super) file: Arc<OpenFile>,
    pub(super) ino: u64,
    pub(super) mode: IoMode,
    /// Keeps the kernel's backing file registered while this handle is open.
    pub(super) _backing: Option<Arc<BackingId>>,
}

/// The real file behind an open handle.
pub(super) struct OpenFile {
    fd: OwnedFd,
    /// What writes through this handle left for the kernel to write back.
    pub(super) write_behind: WriteBehind,
}

impl OpenFile {
    pub(super) fn new(fd: OwnedFd) -> Arc<OpenFile> {
        Arc::new(OpenFile {
            fd,
            write_behind: WriteBehind::default(),
        })
    }
}

impl AsFd for OpenFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A directory's entries as read at opendir: (name, kind, inode number on disk).
pub(super) struct DirHandle {
    pub(super) entries: Vec<(Vec<u8>, Kind, u64)>,
}

impl MirrorFs {
    /// The real file of an open file handle.
    pub(super) fn handle_file(&self, fh: FileHandle) -> Result<Arc<OpenFile>, Errno> {
        self.open_handle(fh).map(|(_, file)| file)
    }

    /// The node and the real file of an open handle.
    pub(super) fn open_handle(&self, fh: FileHandle) -> Result<(u64, Arc<OpenFile>), Errno> {
        self.handles
            .lock()
            .expect("handle lock")
            .get(&fh.0)
            .map(|h| (h.ino, h.file.clone()))
            .ok_or(Errno::EBADF)
    }

    /// What to call when a change of `ino`'s bytes (a truncation, an allocation) is
    /// answered with an error: the kernel then keeps its pages as they were, though the
    /// change may have been made here, so they are no longer kept on open.
    pub(super) fn distrust_pages_on_error(&self, ino: u64) -> impl FnOnce() + Send + 'static {
        let inodes = self.inodes.clone();
        move || {
            if let Some(node) = inodes.lock().expect("inode lock").nodes.get_mut(&ino) {
                node.pages_current = false;
            }
        }
    }

    /// The real file of a node whose last name went, through any handle still open on
    /// it: nothing else reaches it now.
    pub(super) fn unlinked_file(&self, ino: INodeNo) -> Option<Arc<OpenFile>> {
        if !self.inodes().is_unlinked(ino.0) {
            return None;
        }
        let handles = self.handles.lock().expect("handle lock");
        let handle = handles.values().find(|handle| handle.ino == ino.0)?;
        Some(handle.file.clone())
    }

    pub(super) fn open_file(&self, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let path = match self.path(ino) {
            Ok(path) => path,
            Err(e) => return reply.error(e),
        };
        let raw = flags.0;
        let access = Access::of(raw);
        let keep = OFlags::from_bits_retain(
            (raw & (libc::O_ACCMODE | libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME)) as u32,
        );
        let fd = match self.engine.tree.open_at(&path, keep, 0) {
            Ok(fd) => fd,
            Err(e) => return reply.error(errno_of(e)),
        };
        if access != Access::ReadOnly {
            let linked = rustix::fs::fstat(&fd).is_ok_and(|stat| is_linked_file(&stat));
            if linked {
                tracing::warn!(
                    path = %String::from_utf8_lossy(&path),
                    "refused to open a file with several hard links for writing"
                );
                return reply.error(Errno::EMLINK);
            }
        }
        let file = OpenFile::new(fd);
        let fh = self.next_handle.fetch_add(1, Ordering::SeqCst);
        let passthrough = self.passthrough.load(Ordering::SeqCst);
        let released_by = Instant::now() + RELEASE_GRACE;
        let Admitted {
            mode,
            backing,
            flags,
        } = loop {
            let mut inodes = self.inodes();
            let Some(node) = inodes.nodes.get_mut(&ino.0) else {
                return reply.error(Errno::ENOENT);
            };
            match admit(node, access, passthrough, || {
                reply.open_backing(file.as_fd())
            }) {
                Ok(admitted) => break admitted,
                Err(Errno::ETXTBSY) if Instant::now() < released_by => {
                    drop(inodes);
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => {
                    if e == Errno::ETXTBSY {
                        tracing::warn!(
                        path = %String::from_utf8_lossy(&path),
                        "refused to open a file for writing while it is open read-only through \
                         passthrough (its mmap writes would not be replicated); close the \
                         readers first, or run the module with passthrough off"
                        );
                    }
                    return reply.error(e);
                }
            }
        };
        self.handles.lock().expect("handle lock").insert(
            fh,
            Handle {
                file,
                ino: ino.0,
                mode,
                _backing: backing.clone(),
            },
        );
        match backing {
            Some(backing) => reply.opened_passthrough(FileHandle(fh), flags, &backing),
            None => reply.opened(FileHandle(fh), flags),
        }
    }

    /// opendir: the entries are read once, here; readdir pages through them.
    pub(super) fn open_dir(&self, ino: INodeNo, reply: ReplyOpen) {
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

    /// readdir: the entries of an open directory from `offset` on, "." and ".." first.
    pub(super) fn read_dir(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dirs = self.dirs.lock().expect("dir lock");
        let Some(dir) = dirs.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let inodes = self.inodes();
        let dots = [(&b"."[..], ino.0), (&b".."[..], inodes.parent(ino.0))];
        let all = dots
            .iter()
            .map(|(n, i)| (*n, FileType::Directory, *i))
            .chain(dir.entries.iter().map(|(name, kind, real_ino)| {
                let listed = inodes.listed(ino.0, name, *real_ino);
                (&name[..], file_type(*kind), listed)
            }));
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

    pub(super) fn release_handle(&self, fh: FileHandle, reply: ReplyEmpty) {
        close_handle(&self.handles, &self.inodes, fh.0);
        reply.ok();
    }
}

/// Removes an open handle and its count from its node; the handle, if there was one.
pub(super) fn close_handle(
    handles: &Mutex<HashMap<u64, Handle>>,
    inodes: &Mutex<Inodes>,
    fh: u64,
) -> Option<Handle> {
    let handle = handles.lock().expect("handle lock").remove(&fh)?;
    if let Some(node) = inodes
        .lock()
        .expect("inode lock")
        .nodes
        .get_mut(&handle.ino)
    {
        let opens = handle.mode.opens(node);
        *opens = opens.saturating_sub(1);
    }
    Some(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(cached: u32, passthrough: u32, direct: u32) -> Node {
        let mut node = Node::new(1, b"f".to_vec());
        node.cached_opens = cached;
        node.passthrough_opens = passthrough;
        node.direct_opens = direct;
        node
    }

    /// The node's (cached, passthrough, direct) opens, the new open's access, whether
    /// passthrough is available, and the mode the open must get.
    type Case = ((u32, u32, u32), Access, bool, IoMode);

    fn assert_modes(cases: &[Case]) {
        for &((cached, passthrough, direct), access, available, expected) in cases {
            let node = node(cached, passthrough, direct);
            assert_eq!(
                mode_for(&node, access, available),
                Some(expected),
                "opens {:?} + {access:?}, passthrough available: {available}",
                (cached, passthrough, direct)
            );
        }
    }

    #[test]
    fn write_only_opens_bypass_the_page_cache_unless_cached_opens_exist() {
        use {Access::WriteOnly as W, IoMode::*};
        assert_modes(&[
            ((0, 0, 0), W, true, Direct),
            ((0, 0, 2), W, true, Direct),
            ((1, 0, 0), W, true, Cached),
        ]);
    }

    #[test]
    fn read_write_opens_are_cached_unless_they_must_join_another_mode() {
        use {Access::ReadWrite as RW, IoMode::*};
        assert_modes(&[
            ((0, 0, 0), RW, true, Cached),
            ((3, 0, 0), RW, true, Cached),
            ((0, 0, 1), RW, true, Direct),
        ]);
    }

    #[test]
    fn read_only_opens_pass_through_beside_direct_writers() {
        use {Access::ReadOnly as R, IoMode::*};
        assert_modes(&[
            ((0, 0, 0), R, true, Passthrough),
            ((0, 0, 1), R, true, Passthrough),
            ((1, 0, 0), R, true, Cached),
            // Without passthrough they read uncached beside direct writers.
            ((0, 0, 1), R, false, Direct),
            ((0, 0, 0), R, false, Cached),
        ]);
    }

    #[test]
    fn an_open_that_gets_no_backing_file_falls_back_unless_it_must_join_passthrough() {
        let no_kernel = || Err(std::io::Error::other("no kernel here"));
        let mut alone = node(0, 0, 1);
        let admitted = admit(&mut alone, Access::ReadOnly, true, no_kernel).unwrap();
        assert_eq!(
            (admitted.mode, admitted.backing.is_none()),
            (IoMode::Direct, true)
        );
        assert_eq!(alone.direct_opens, 2);
        // Passthrough opens exist but their backing file is gone: refuse, count nothing.
        let mut joining = node(0, 1, 0);
        assert_eq!(
            admit(&mut joining, Access::ReadOnly, true, no_kernel).unwrap_err(),
            Errno::EIO
        );
        assert_eq!(joining.passthrough_opens + joining.direct_opens, 1);
    }

    #[test]
    fn a_writable_open_beside_passthrough_opens_is_refused() {
        let kernel = || -> std::io::Result<BackingId> { panic!("no backing file is asked for") };
        for access in [Access::WriteOnly, Access::ReadWrite] {
            for available in [true, false] {
                let mut node = node(0, 2, 1);
                let refused = admit(&mut node, access, available, kernel).unwrap_err();
                assert_eq!(refused, Errno::ETXTBSY, "{access:?}");
                assert_eq!(
                    (node.cached_opens, node.passthrough_opens, node.direct_opens),
                    (0, 2, 1),
                    "nothing counted"
                );
            }
        }
    }

    #[test]
    fn a_cached_open_keeps_the_kernels_pages_until_a_direct_writer_bypassed_them() {
        let kernel = || -> std::io::Result<BackingId> { panic!("no passthrough here") };
        let keeps = |node: &mut Node, access| {
            let admitted = admit(node, access, false, kernel).expect("admitted");
            *admitted.mode.opens(node) -= 1;
            match admitted.mode {
                IoMode::Cached => Some(admitted.flags == FopenFlags::FOPEN_KEEP_CACHE),
                _ => {
                    assert_eq!(admitted.flags, FopenFlags::FOPEN_DIRECT_IO);
                    None
                }
            }
        };
        let mut node = node(0, 0, 0);
        // A new node's kernel inode caches nothing yet: every cached open keeps.
        assert_eq!(keeps(&mut node, Access::ReadOnly), Some(true));
        assert_eq!(keeps(&mut node, Access::ReadWrite), Some(true));
        // A direct reader changes nothing.
        node.direct_opens = 1;
        assert_eq!(keeps(&mut node, Access::ReadOnly), None);
        node.direct_opens = 0;
        assert_eq!(keeps(&mut node, Access::ReadOnly), Some(true));
        // A direct writer makes the pages stale for good: no open can know when the
        // kernel dropped them.
        assert_eq!(keeps(&mut node, Access::WriteOnly), None);
        assert_eq!(keeps(&mut node, Access::ReadOnly), Some(false));
        assert_eq!(keeps(&mut node, Access::ReadWrite), Some(false));
    }

    /// Any sequence of opens and closes keeps cached opens apart from the other modes.
    #[test]
    fn no_sequence_of_opens_mixes_cached_with_other_modes() {
        let accesses = [Access::ReadOnly, Access::WriteOnly, Access::ReadWrite];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for passthrough in [true, false] {
            let mut node = node(0, 0, 0);
            let mut open: Vec<IoMode> = Vec::new();
            for _ in 0..10_000 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                if state.is_multiple_of(3) && !open.is_empty() {
                    let mode = open.swap_remove((state >> 8) as usize % open.len());
                    *mode.opens(&mut node) -= 1;
                } else {
                    let access = accesses[(state >> 8) as usize % 3];
                    let Some(mode) = mode_for(&node, access, passthrough) else {
                        assert!(node.passthrough_opens > 0 && access != Access::ReadOnly);
                        continue;
                    };
                    *mode.opens(&mut node) += 1;
                    open.push(mode);
                }
                assert!(
                    node.cached_opens == 0 || node.passthrough_opens + node.direct_opens == 0,
                    "cached {} passthrough {} direct {}",
                    node.cached_opens,
                    node.passthrough_opens,
                    node.direct_opens
                );
            }
        }
    }
}
