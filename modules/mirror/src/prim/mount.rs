//! The interception's mount: made with mount(2) here rather than by fuser, so that it
//! can go on top of a dead predecessor's mount (fuser opens the mount point first,
//! which fails with `ENOTCONN` there), and the kernel's FUSE control file system,
//! through which a connection is aborted.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::mount::{mount, MountFlags};

use super::fs::MirrorFs;
use crate::leftovers::{FUSE_SOURCE, FUSE_SUBTYPE};

/// Mounts `fs` at `dir`, whose real directory is `root`, and serves it from `threads`
/// threads, each on its own clone of the connection. Nothing is removed first: a dead
/// mount at `dir` ends up beneath this one.
pub(super) fn mount_interception(
    fs: MirrorFs,
    dir: &Path,
    root: BorrowedFd<'_>,
    threads: usize,
) -> io::Result<fuser::BackgroundSession> {
    let device: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?
        .into();
    let root_mode = rustix::fs::fstat(root).map_err(io::Error::from)?.st_mode;
    // What fuser's own mount passes: the device, the root's mode and owner, and the
    // kernel's permission checks for every user (files keep their owners and modes).
    let data = format!(
        "fd={},rootmode={root_mode:o},user_id={},group_id={},default_permissions,allow_other",
        device.as_raw_fd(),
        // SAFETY: getuid and getgid cannot fail and touch no memory.
        unsafe { libc::getuid() },
        unsafe { libc::getgid() },
    );
    let data = std::ffi::CString::new(data).map_err(io::Error::other)?;
    mount(
        FUSE_SOURCE,
        dir,
        format!("fuse.{FUSE_SUBTYPE}").as_str(),
        MountFlags::empty(),
        Some(data.as_c_str()),
    )
    .map_err(io::Error::from)?;
    let mut config = fuser::Config::default();
    config.n_threads = Some(threads);
    config.clone_fd = true;
    let served = fuser::Session::from_fd(fs, device, fuser::SessionACL::All, config)
        .and_then(fuser::Session::spawn);
    if served.is_err() {
        let _ = rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH);
    }
    served
}

/// The FUSE control file system, where each connection can be aborted.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// The number of the FUSE connection mounted at `dir` (its device number, as the
/// kernel writes it in the control file system).
pub(super) fn fuse_connection(dir: &std::path::Path) -> Option<u64> {
    let dev = rustix::fs::stat(dir).ok()?.st_dev;
    let (major, minor) = (rustix::fs::major(dev) as u64, rustix::fs::minor(dev) as u64);
    Some((major << 20) | minor)
}

/// Aborts a FUSE connection: every pending and later access to its mount fails with
/// `ENOTCONN` and the session ends. Mounts the control file system if it is not.
pub(super) fn abort_fuse_connection(connection: u64) -> std::io::Result<()> {
    let abort = std::path::Path::new(FUSECTL)
        .join(connection.to_string())
        .join("abort");
    if !abort.exists() {
        rustix::mount::mount(
            "fusectl",
            FUSECTL,
            "fusectl",
            rustix::mount::MountFlags::empty(),
            None,
        )
        .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error()))?;
    }
    std::fs::write(abort, "1")
}
