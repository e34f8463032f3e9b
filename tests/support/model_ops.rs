//! The model-based test's operations: what a step does, how steps are drawn, and how
//! an operation is applied to a directory (PRIM's mount or the model).

use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;

use proptest::prelude::*;

pub const NAMES: [&str; 7] = ["a", "b", "d", "d/a", "d/b", "d/e", "d/e/a"];
pub const BLOCK: u64 = 4096;

#[derive(Clone, Debug)]
pub enum FileOp {
    Write {
        path: usize,
        offset: u64,
        len: usize,
        byte: u8,
    },
    /// `open(O_CREAT | O_TRUNC)` and write: replaces a file's content.
    Create {
        path: usize,
        len: usize,
        byte: u8,
    },
    MmapWrite {
        path: usize,
        offset: u64,
        len: usize,
        byte: u8,
    },
    Truncate {
        path: usize,
        size: u64,
    },
    Fallocate {
        path: usize,
        mode: i32,
        offset: u64,
        len: u64,
    },
    Mkdir {
        path: usize,
    },
    Unlink {
        path: usize,
    },
    Rmdir {
        path: usize,
    },
    /// `rm -r`.
    RemoveTree {
        path: usize,
    },
    Rename {
        from: usize,
        to: usize,
        flags: u32,
    },
    Link {
        from: usize,
        to: usize,
    },
    Symlink {
        path: usize,
        target: usize,
    },
    Chmod {
        path: usize,
        mode: u32,
    },
    Chown {
        path: usize,
        uid: u32,
    },
    SetXattr {
        path: usize,
        value: u8,
    },
    RemoveXattr {
        path: usize,
    },
    Fsync {
        path: usize,
    },
}

#[derive(Clone, Debug)]
pub enum Step {
    Op(FileOp),
    KillSecond,
    KillPrim,
    CutLink,
    HealLink,
    /// Wait for the reintegration to finish and compare the three trees.
    Check,
}

pub fn file_op() -> impl Strategy<Value = FileOp> {
    let p = || 0..NAMES.len();
    let blocks = |n: u64| (0..n).prop_map(|b| b * BLOCK);
    let fallocate_mode = prop_oneof![
        Just(0),
        Just(libc::FALLOC_FL_KEEP_SIZE),
        Just(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE),
        Just(libc::FALLOC_FL_ZERO_RANGE),
        Just(libc::FALLOC_FL_COLLAPSE_RANGE),
        Just(libc::FALLOC_FL_INSERT_RANGE),
    ];
    prop_oneof![
        4 => (p(), 0u64..400_000, 1usize..200_000, any::<u8>())
            .prop_map(|(path, offset, len, byte)| FileOp::Write { path, offset, len, byte }),
        2 => (p(), 0usize..150_000, any::<u8>())
            .prop_map(|(path, len, byte)| FileOp::Create { path, len, byte }),
        2 => (p(), 0u64..300_000, 1usize..100_000, any::<u8>())
            .prop_map(|(path, offset, len, byte)| FileOp::MmapWrite { path, offset, len, byte }),
        1 => (p(), 0u64..500_000).prop_map(|(path, size)| FileOp::Truncate { path, size }),
        2 => (p(), fallocate_mode, blocks(80), (1..40u64).prop_map(|b| b * BLOCK))
            .prop_map(|(path, mode, offset, len)| FileOp::Fallocate { path, mode, offset, len }),
        2 => p().prop_map(|path| FileOp::Mkdir { path }),
        1 => p().prop_map(|path| FileOp::Unlink { path }),
        1 => p().prop_map(|path| FileOp::Rmdir { path }),
        1 => p().prop_map(|path| FileOp::RemoveTree { path }),
        3 => (p(), p(), prop_oneof![Just(0), Just(libc::RENAME_NOREPLACE), Just(libc::RENAME_EXCHANGE)])
            .prop_map(|(from, to, flags)| FileOp::Rename { from, to, flags }),
        1 => (p(), p()).prop_map(|(from, to)| FileOp::Link { from, to }),
        2 => (p(), p()).prop_map(|(path, target)| FileOp::Symlink { path, target }),
        1 => (p(), prop_oneof![Just(0o600u32), Just(0o755), Just(0o4750), Just(0o1777)])
            .prop_map(|(path, mode)| FileOp::Chmod { path, mode }),
        1 => (p(), prop_oneof![Just(0u32), Just(1000), Just(65534)])
            .prop_map(|(path, uid)| FileOp::Chown { path, uid }),
        1 => (p(), any::<u8>()).prop_map(|(path, value)| FileOp::SetXattr { path, value }),
        1 => p().prop_map(|path| FileOp::RemoveXattr { path }),
        1 => p().prop_map(|path| FileOp::Fsync { path }),
    ]
}

pub fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        30 => file_op().prop_map(Step::Op),
        1 => Just(Step::KillSecond),
        1 => Just(Step::KillPrim),
        1 => Just(Step::CutLink),
        1 => Just(Step::HealLink),
        2 => Just(Step::Check),
    ]
}

pub fn cstr(path: &Path) -> std::ffi::CString {
    std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap()
}

pub fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn open_rw(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
}

/// Applies `op` under `root` and returns its outcome (the errno on failure).
pub fn apply(root: &Path, op: &FileOp) -> Result<(), i32> {
    let at = |i: usize| root.join(NAMES[i]);
    let outcome = match *op {
        FileOp::Write {
            path,
            offset,
            len,
            byte,
        } => std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(at(path))
            .and_then(|f| f.write_all_at(&vec![byte; len], offset)),
        FileOp::Create { path, len, byte } => {
            std::fs::File::create(at(path)).and_then(|f| f.write_all_at(&vec![byte; len], 0))
        }
        FileOp::MmapWrite {
            path,
            offset,
            len,
            byte,
        } => open_rw(&at(path)).and_then(|f| {
            // Within the file only (a mapping past the end faults); synced before
            // returning, so that it is an acknowledged change like a write.
            let size = f.metadata()?.len();
            if offset >= size {
                return Ok(());
            }
            let len = len.min((size - offset) as usize);
            let start = offset / BLOCK * BLOCK;
            let span = (offset - start) as usize + len;
            // SAFETY: a fresh shared mapping of `span` bytes of an open file, within its
            // size, unmapped before returning.
            unsafe {
                let map = libc::mmap(
                    std::ptr::null_mut(),
                    span,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    start as libc::off_t,
                );
                if map == libc::MAP_FAILED {
                    return Err(std::io::Error::last_os_error());
                }
                std::ptr::write_bytes(map.cast::<u8>().add((offset - start) as usize), byte, len);
                let synced = check(libc::msync(map, span, libc::MS_SYNC));
                libc::munmap(map, span);
                synced
            }
        }),
        FileOp::Truncate { path, size } => open_rw(&at(path)).and_then(|f| f.set_len(size)),
        FileOp::Fallocate {
            path,
            mode,
            offset,
            len,
        } => open_rw(&at(path)).and_then(|f| {
            // SAFETY: fallocate(2) on an open file.
            check(unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, len as i64) })
        }),
        FileOp::Mkdir { path } => std::fs::create_dir(at(path)),
        FileOp::Unlink { path } => std::fs::remove_file(at(path)),
        FileOp::Rmdir { path } => std::fs::remove_dir(at(path)),
        FileOp::RemoveTree { path } => match std::fs::symlink_metadata(at(path)) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(at(path)),
            Ok(_) => std::fs::remove_file(at(path)),
            Err(e) => Err(e),
        },
        FileOp::Rename { from, to, flags } => {
            let (f, t) = (cstr(&at(from)), cstr(&at(to)));
            // SAFETY: renameat2(2) with valid NUL-terminated paths.
            check(unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    f.as_ptr(),
                    libc::AT_FDCWD,
                    t.as_ptr(),
                    flags,
                )
            })
        }
        FileOp::Link { from, to } => std::fs::hard_link(at(from), at(to)),
        FileOp::Symlink { path, target } => std::os::unix::fs::symlink(NAMES[target], at(path)),
        FileOp::Chmod { path, mode } => {
            std::fs::set_permissions(at(path), std::fs::Permissions::from_mode(mode))
        }
        FileOp::Chown { path, uid } => std::os::unix::fs::lchown(at(path), Some(uid), Some(uid)),
        FileOp::SetXattr { path, value } => {
            let p = cstr(&at(path));
            // SAFETY: lsetxattr(2) with a valid path, name and one-byte value.
            check(unsafe {
                libc::lsetxattr(
                    p.as_ptr(),
                    c"user.model".as_ptr(),
                    [value].as_ptr().cast(),
                    1,
                    0,
                )
            })
        }
        FileOp::RemoveXattr { path } => {
            let p = cstr(&at(path));
            // SAFETY: lremovexattr(2) with a valid path and name.
            check(unsafe { libc::lremovexattr(p.as_ptr(), c"user.model".as_ptr()) })
        }
        FileOp::Fsync { path } => std::fs::File::open(at(path)).and_then(|f| f.sync_all()),
    };
    outcome.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

pub fn step_op(step: &Step) -> &FileOp {
    match step {
        Step::Op(op) => op,
        _ => unreachable!("an operation step"),
    }
}
