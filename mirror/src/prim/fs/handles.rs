//! Open files and directories. A file handle is cached (its reads and writes come
//! here) or passthrough (the kernel reads the real file itself), following the
//! kernel's rules for mixing the two on one inode (fs/fuse/iomode.c): a passthrough
//! open fails while a cached open exists, and once a passthrough open exists every
//! other open must be passthrough too. So a read-only open is passthrough unless the
//! inode has cached (writable) opens; a writable open is cached unless the inode has
//! passthrough opens, in which case it is passthrough + direct I/O (its reads and
//! writes still come here).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fuser::{BackingId, Errno, FileHandle, FopenFlags, INodeNo, OpenFlags, ReplyEmpty, ReplyOpen};
use rustix::fs::OFlags;

use super::attrs::errno_of;
use super::MirrorFs;
use crate::protocol::Kind;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum IoMode {
    Cached,
    Passthrough,
}

pub(super) struct Handle {
    pub(super) fd: Arc<OwnedFd>,
    pub(super) ino: u64,
    pub(super) mode: IoMode,
    /// Keeps the kernel's backing file registered while this handle is open.
    pub(super) _backing: Option<Arc<BackingId>>,
}

/// A directory's entries as read at opendir: (name, kind, inode number on disk).
pub(super) struct DirHandle {
    pub(super) entries: Vec<(Vec<u8>, Kind, u64)>,
}

impl MirrorFs {
    pub(super) fn open_file(&self, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
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

    pub(super) fn release_handle(&self, fh: FileHandle, reply: ReplyEmpty) {
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
}
