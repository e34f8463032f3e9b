//! Random operation sequences applied through PRIM's mount leave SECOND's copy
//! identical: entries, kinds, sizes, modes, owners, symlink targets, xattrs, bytes.

mod support;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use rampart_mirror::AckMode;
use support::*;

const NAMES: [&str; 6] = ["a", "b", "d/a", "d/b", "d/e/a", "e"];

#[derive(Clone, Debug)]
enum FileOp {
    Write {
        path: usize,
        offset: u64,
        len: usize,
        byte: u8,
    },
    Truncate {
        path: usize,
        size: u64,
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
    Rename {
        from: usize,
        to: usize,
        exchange: bool,
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
    Fallocate {
        path: usize,
        len: u64,
    },
    Fsync {
        path: usize,
    },
}

fn op() -> impl Strategy<Value = FileOp> {
    let p = 0..NAMES.len();
    prop_oneof![
        4 => (p.clone(), 0u64..300_000, 1usize..150_000, any::<u8>())
            .prop_map(|(path, offset, len, byte)| FileOp::Write { path, offset, len, byte }),
        1 => (p.clone(), 0u64..300_000).prop_map(|(path, size)| FileOp::Truncate { path, size }),
        2 => p.clone().prop_map(|path| FileOp::Mkdir { path }),
        1 => p.clone().prop_map(|path| FileOp::Unlink { path }),
        1 => p.clone().prop_map(|path| FileOp::Rmdir { path }),
        2 => (p.clone(), p.clone(), any::<bool>())
            .prop_map(|(from, to, exchange)| FileOp::Rename { from, to, exchange }),
        1 => (p.clone(), p.clone()).prop_map(|(from, to)| FileOp::Link { from, to }),
        1 => (p.clone(), p.clone()).prop_map(|(path, target)| FileOp::Symlink { path, target }),
        1 => (p.clone(), prop_oneof![Just(0o600u32), Just(0o755), Just(0o4750), Just(0o640)])
            .prop_map(|(path, mode)| FileOp::Chmod { path, mode }),
        1 => (p.clone(), prop_oneof![Just(0u32), Just(1000), Just(65534)])
            .prop_map(|(path, uid)| FileOp::Chown { path, uid }),
        1 => (p.clone(), any::<u8>()).prop_map(|(path, value)| FileOp::SetXattr { path, value }),
        1 => p.clone().prop_map(|path| FileOp::RemoveXattr { path }),
        1 => (p.clone(), 1u64..200_000).prop_map(|(path, len)| FileOp::Fallocate { path, len }),
        1 => p.prop_map(|path| FileOp::Fsync { path }),
    ]
}

/// Applies one operation; failures (missing parents, wrong kinds) are expected and
/// simply not replicated.
fn apply(root: &Path, op: &FileOp) {
    let at = |i: usize| root.join(NAMES[i]);
    let _ = match op {
        FileOp::Write {
            path,
            offset,
            len,
            byte,
        } => std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(at(*path))
            .and_then(|f| f.write_all_at(&vec![*byte; *len], *offset)),
        FileOp::Truncate { path, size } => std::fs::OpenOptions::new()
            .write(true)
            .open(at(*path))
            .and_then(|f| f.set_len(*size)),
        FileOp::Mkdir { path } => std::fs::create_dir(at(*path)),
        FileOp::Unlink { path } => std::fs::remove_file(at(*path)),
        FileOp::Rmdir { path } => std::fs::remove_dir(at(*path)),
        FileOp::Rename { from, to, exchange } => {
            let (f, t) = (cstr(&at(*from)), cstr(&at(*to)));
            let flags = if *exchange { libc::RENAME_EXCHANGE } else { 0 };
            let rc = unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    f.as_ptr(),
                    libc::AT_FDCWD,
                    t.as_ptr(),
                    flags,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }
        FileOp::Link { from, to } => std::fs::hard_link(at(*from), at(*to)),
        FileOp::Symlink { path, target } => std::os::unix::fs::symlink(NAMES[*target], at(*path)),
        FileOp::Chmod { path, mode } => {
            std::fs::set_permissions(at(*path), std::fs::Permissions::from_mode(*mode))
        }
        FileOp::Chown { path, uid } => std::os::unix::fs::lchown(at(*path), Some(*uid), Some(*uid)),
        FileOp::SetXattr { path, value } => {
            let (p, n) = (cstr(&at(*path)), c"user.test");
            let rc =
                unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), [*value].as_ptr().cast(), 1, 0) };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }
        FileOp::RemoveXattr { path } => {
            let (p, n) = (cstr(&at(*path)), c"user.test");
            let rc = unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }
        FileOp::Fallocate { path, len } => std::fs::OpenOptions::new()
            .write(true)
            .open(at(*path))
            .and_then(|f| {
                use std::os::fd::AsRawFd;
                let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, *len as i64) };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }),
        FileOp::Fsync { path } => std::fs::File::open(at(*path)).and_then(|f| f.sync_all()),
    };
}

fn cstr(path: &Path) -> std::ffi::CString {
    std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_leave_identical_trees(
        ops in proptest::collection::vec(op(), 1..60),
        durable in any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let pair =
                Pair::in_step(if durable { AckMode::Durable } else { AckMode::Write }).await;
            let root = pair.dir("a");
            let ops2 = ops.clone();
            blocking(move || ops2.iter().for_each(|op| apply(&root, op))).await;
            let (a, b) = (pair.dir("a"), pair.dir("b"));
            converge(&a, &b, Duration::from_secs(10)).await;
            assert!(pair.prim.as_ref().unwrap().status().connected, "the stream stayed up");
        });
    }
}
