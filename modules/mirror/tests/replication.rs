//! PRIM and SECOND on loopback with real FUSE mounts and real bookkeeping: the live
//! stream (reintegration is in `reintegration.rs`, disks that fill or stall in
//! `disks.rs`).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use rampart_mirror::AckMode;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_the_mount_reach_second() {
    let pair = Pair::in_step(AckMode::Write).await;

    let a = pair.dir("a");
    blocking(move || {
        std::fs::create_dir(a.join("d")).unwrap();
        std::fs::write(a.join("d/f"), vec![7u8; 300_000]).unwrap();
        std::fs::write(a.join("g"), b"hello").unwrap();
        std::fs::set_permissions(a.join("g"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("d/f", a.join("s")).unwrap();
        std::fs::rename(a.join("g"), a.join("d/g")).unwrap();
        let refused = std::fs::hard_link(a.join("d/f"), a.join("h")).unwrap_err();
        assert_eq!(
            refused.raw_os_error(),
            Some(libc::EPERM),
            "hard links are refused"
        );
        xattr_set(&a.join("d/f"), "user.k", b"v");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(a.join("d/f"))
            .unwrap();
        f.set_len(100_000).unwrap();
        f.sync_all().unwrap();
    })
    .await;
    // `write` mode: everything returned has been received; give the applier a moment.
    let (a, b) = (pair.dir("a"), pair.dir("b"));
    assert!(converge(&a, &b, Duration::from_secs(5)).await >= 4);
    // SECOND's copy is read-only to applications.
    let err = std::fs::write(pair.dir("b").join("x"), b"no").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
}

/// Write-only opens bypass the kernel's page cache, read-only ones pass through to the
/// real file, read-write ones are cached unless they join a write-only one: whatever the
/// mix, every open reads what any other wrote, and SECOND gets the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mix_of_open_modes_reads_what_the_others_wrote() {
    use std::os::unix::fs::FileExt;
    let pair = Pair::in_step(AckMode::Write).await;

    let path = pair.dir("a").join("f");
    blocking(move || {
        let read = |file: &std::fs::File, offset: u64| {
            let mut buf = [0u8; 4];
            file.read_exact_at(&mut buf, offset).unwrap();
            buf
        };
        let open = |write: bool, read: bool| {
            std::fs::OpenOptions::new()
                .read(read)
                .write(write)
                .create(write && !read)
                .open(&path)
                .unwrap()
        };
        // A write-only writer, then a reader beside it: each write is seen at once.
        let writer = open(true, false);
        writer.write_all_at(&[1u8; 1 << 20], 0).unwrap();
        let reader = open(false, true);
        assert_eq!(read(&reader, 4096), [1; 4]);
        writer.write_all_at(b"two!", 4096).unwrap();
        assert_eq!(read(&reader, 4096), *b"two!");
        // A read-write open joining the writer (once the passthrough reader is closed:
        // see the next test) reads and writes the same file; nothing it read stays
        // cached under the writer's next write.
        drop(reader);
        let both = open(true, true);
        assert_eq!(read(&both, 4096), *b"two!");
        writer.write_all_at(b"wow!", 4096).unwrap();
        assert_eq!(read(&both, 4096), *b"wow!");
        both.write_all_at(b"tri!", 8192).unwrap();
        let reader = open(false, true);
        assert_eq!(read(&reader, 8192), *b"tri!");
        drop((writer, reader, both));
        // Cached first: a read-write open reads (the kernel caches the page), then a
        // write-only open writes through the same cache.
        let cached = open(true, true);
        assert_eq!(read(&cached, 0), [1; 4]);
        let writer = open(true, false);
        writer.write_all_at(b"for!", 0).unwrap();
        assert_eq!(read(&cached, 0), *b"for!");
        let reader = open(false, true);
        assert_eq!(read(&reader, 0), *b"for!");
    })
    .await;
    let (a, b) = (pair.dir("a"), pair.dir("b"));
    converge(&a, &b, Duration::from_secs(5)).await;
    let copy = std::fs::read(b.join("f")).unwrap();
    assert_eq!(
        (&copy[0..4], &copy[4096..4100], &copy[8192..8196]),
        (&b"for!"[..], &b"wow!"[..], &b"tri!"[..])
    );
}

/// A cached open keeps the kernel's pages of the file from earlier opens (a database
/// reopening its files reads them from memory), except after a write-only open wrote
/// beside those pages: opened again, the file reads what that writer wrote. (Kernels
/// since 6.6 drop the pages a direct write covers themselves, so there this passes
/// even if the file system kept them; older ones, Debian 12's 6.1 among them, do not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_file_reads_what_a_closed_direct_writer_wrote() {
    use std::os::unix::fs::FileExt;
    let pair = Pair::in_step(AckMode::Write).await;
    let path = pair.dir("a").join("f");
    blocking(move || {
        let open = |write: bool, read: bool| {
            std::fs::OpenOptions::new()
                .read(read)
                .write(write)
                .create(write)
                .open(&path)
                .unwrap()
        };
        let read = |offset: u64| {
            let mut buf = [0u8; 4];
            open(true, true).read_exact_at(&mut buf, offset).unwrap();
            buf
        };
        open(true, true).write_all_at(&[1u8; 1 << 16], 0).unwrap();
        // Read through cached opens, closed each time: the pages stay in the cache.
        assert_eq!(read(0), [1; 4]);
        assert_eq!(read(4096), [1; 4]);
        open(true, false).write_all_at(b"new!", 4096).unwrap();
        assert_eq!(read(4096), *b"new!", "the cached page is not kept");
        open(true, true).write_all_at(b"rw!!", 0).unwrap();
        assert_eq!(read(0), *b"rw!!");
    })
    .await;
    let (a, b) = (pair.dir("a"), pair.dir("b"));
    converge(&a, &b, Duration::from_secs(5)).await;
}

/// A hole punched in a file whose pages the kernel caches, answered with an error
/// after it was made here (the write parked with SECOND gone and nobody deciding to go
/// on alone, until the park timeout): the kernel keeps its pages then, so the file
/// reopened must not keep them, and reads the zeros the file holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_answered_with_an_error_leaves_no_stale_page_for_the_next_open() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let mut pair = Pair::new(AckMode::Write);
    let addr = pair.start_second("b", "127.0.0.1:0");
    let mut config = pair.prim_config("a", addr, 1);
    config.continue_alone = false;
    config.park_timeout = Duration::from_millis(300);
    pair.start_prim(config);
    pair.wait_synced().await;
    let path = pair.dir("a").join("f");
    let open = {
        let path = path.clone();
        move || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .unwrap()
        }
    };
    let read = |file: &std::fs::File| {
        let mut buf = [0u8; 4];
        file.read_exact_at(&mut buf, 4096).unwrap();
        buf
    };
    let cached = {
        let open = open.clone();
        blocking(move || {
            let file = open();
            file.write_all_at(&[1u8; 1 << 16], 0).unwrap();
            read(&file)
        })
        .await
    };
    assert_eq!(cached, [1; 4], "the page is in the kernel's cache");

    drop(pair.second.take());
    pair.wait_event(Duration::from_secs(10), |e| {
        matches!(e, rampart_mirror::prim::Event::PeerLost { .. })
    })
    .await;
    let (punched, reopened) = blocking(move || {
        let file = open();
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on an open descriptor; no memory is passed.
        let punched = unsafe { libc::fallocate(file.as_raw_fd(), mode, 0, 1 << 16) };
        let punched = (punched == 0)
            .then_some(())
            .ok_or_else(std::io::Error::last_os_error);
        drop(file);
        (punched, read(&open()))
    })
    .await;
    let refused = punched.expect_err("parked past the timeout");
    assert_eq!(refused.raw_os_error(), Some(libc::EIO), "{refused}");
    assert_eq!(
        reopened, [0; 4],
        "the reopened file reads what the file holds"
    );
}

/// A read-only open passes through to the real file, and the kernel then requires
/// every open of that file to pass through, mapping a shared writable mmap straight
/// onto the real file: so a writable open beside it is refused (`ETXTBSY`), and once
/// the readers are gone, writes through a shared mapping reach SECOND.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_writable_mapping_never_bypasses_replication() {
    let pair = Pair::in_step(AckMode::Durable).await;
    let path = pair.dir("a").join("mapped");
    blocking(move || {
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let reader = std::fs::File::open(&path).unwrap();
        let open_rw = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
        };
        let refused = open_rw().unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::ETXTBSY), "{refused}");
        drop(reader);

        let file = open_rw().unwrap();
        let len = 1 << 20;
        // SAFETY: a fresh shared mapping of a file of `len` bytes, unmapped below.
        unsafe {
            use std::os::fd::AsRawFd;
            let map = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(map, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
            std::ptr::write_bytes(map.cast::<u8>().add(4096), 0xAB, 8192);
            assert_eq!(libc::msync(map, len, libc::MS_SYNC), 0);
            assert_eq!(libc::munmap(map, len), 0);
        }
        file.sync_all().unwrap();
    })
    .await;
    // Durable mode: the fsync returned, so SECOND holds the mapped writes on its disk.
    let copy = std::fs::read(pair.dir("b").join("mapped")).unwrap();
    assert!(copy[4096..4096 + 8192].iter().all(|&x| x == 0xAB));
    assert!(copy[..4096].iter().all(|&x| x == 0));
}

/// `fsync` mode: writes stream without waiting, and an fsync returns once SECOND
/// durably holds every change before it — at once, not at SECOND's next periodic sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_fsync_mode_an_fsync_makes_everything_before_it_durable_on_second_at_once() {
    use std::os::unix::fs::FileExt;
    let pair = Pair::in_step(AckMode::Fsync).await;

    const FSYNCS: u32 = 20;
    let before = pair.prim.as_ref().unwrap().status().acked;
    let path = pair.dir("a").join("log");
    let took = blocking(move || {
        let file = std::fs::File::create(&path).unwrap();
        let started = std::time::Instant::now();
        for i in 0..FSYNCS {
            file.write_all_at(&[i as u8; 4096], u64::from(i) * 4096)
                .unwrap();
            file.sync_data().unwrap();
        }
        started.elapsed()
    })
    .await;
    // Waiting for SECOND's periodic sync would cost about its interval per fsync.
    let periodic = SECOND_SYNC_EVERY * FSYNCS;
    assert!(took < periodic / 2, "{FSYNCS} fsyncs took {took:?}");
    // The last fsync follows at least the loop's writes and fsyncs in the stream, and
    // returned only once SECOND held it on disk. (Later frames may not be durable yet.)
    let (prim, second) = (
        pair.prim.as_ref().unwrap().status(),
        pair.second.as_ref().unwrap().status(),
    );
    let last_fsync_at_least = before + 2 * u64::from(FSYNCS);
    assert!(
        prim.durable >= last_fsync_at_least && second.durable >= prim.durable,
        "{prim:?} {second:?}"
    );
    let (a, b) = (pair.dir("a"), pair.dir("b"));
    converge(&a, &b, Duration::from_secs(5)).await;
}

/// As on any file system, a write, truncation or allocation by a user without CAP_FSETID drops the
/// file's set-user-ID and set-group-ID bits, a chown drops them for anyone, and each of
/// these drops the file's capabilities; root's writes keep the set-ID bits. Through
/// write-only opens (uncached, where the kernel leaves it to us) and read-write ones
/// (cached); SECOND's copy follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_truncations_and_chowns_drop_privileges_on_both_copies_as_the_kernel_does() {
    use std::os::unix::process::CommandExt;
    let pair = Pair::in_step(AckMode::Write).await;
    // Let the unprivileged writer reach the mount.
    std::fs::set_permissions(pair.root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    const NOBODY: u32 = 65534;
    let a = pair.dir("a");
    blocking(move || {
        // A valid file capability (version 2, effective, nothing permitted).
        let capability = [1u8, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        // (case, writer, what it runs on the file, the mode left)
        for (name, uid, script, left) in [
            ("uncached write", NOBODY, r#"printf x >> "$0""#, 0o777),
            (
                "cached write",
                NOBODY,
                r#"exec 3<>"$0" && printf x >&3"#,
                0o777,
            ),
            ("truncate", NOBODY, r#"truncate -s 2 "$0""#, 0o777),
            ("open with O_TRUNC", NOBODY, r#": > "$0""#, 0o777),
            ("fallocate", NOBODY, r#"fallocate -l 8192 "$0""#, 0o777),
            (
                "root's cached write",
                0,
                r#"exec 3<>"$0" && printf x >&3"#,
                0o6777,
            ),
            ("root's uncached write", 0, r#"printf x >> "$0""#, 0o6777),
            ("root's truncate", 0, r#"truncate -s 2 "$0""#, 0o6777),
            ("root's chown", 0, r#"chown 0:0 "$0""#, 0o777),
        ] {
            let path = a.join(name.replace(' ', "-"));
            std::fs::write(&path, b"program").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o6777)).unwrap();
            xattr_set(&path, "security.capability", &capability);
            let status = std::process::Command::new("sh")
                .args(["-c", script])
                .arg(&path)
                .uid(uid)
                .gid(uid)
                .status()
                .unwrap();
            assert!(status.success(), "{name}: failed");
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, left, "{name}: mode {mode:o}");
            assert_eq!(xattr_get(&path, "security.capability"), None, "{name}");
        }
    })
    .await;
    let (a, b) = (pair.dir("a"), pair.dir("b"));
    converge(&a, &b, Duration::from_secs(5)).await;
}

pub fn xattr_get(path: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    let mut value = vec![0u8; 256];
    match rustix::fs::getxattr(path, name, &mut value[..]) {
        Ok(len) => {
            value.truncate(len);
            Some(value)
        }
        Err(e) => {
            assert_eq!(e, rustix::io::Errno::NODATA, "getxattr {name}");
            None
        }
    }
}

pub fn xattr_set(path: &std::path::Path, name: &str, value: &[u8]) {
    xattr_set_result(path, name, value).unwrap_or_else(|e| panic!("setxattr {name}: {e}"));
}

fn xattr_set_result(path: &std::path::Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    rustix::fs::setxattr(path, name, value, rustix::fs::XattrFlags::empty())
        .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_refuses_a_prim_of_an_older_epoch() {
    let mut pair = Pair::new(AckMode::Write);
    let addr = pair.start_second("b", "127.0.0.1:0");
    pair.second.as_ref().unwrap().fence(5).unwrap();
    pair.start_prim(pair.prim_config("a", addr, 4));
    let status = pair.prim.as_ref().unwrap().status();
    assert!(!status.connected);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = pair.prim.as_ref().unwrap().status();
    assert!(!status.connected);
    let error = status.last_error.unwrap_or_default();
    assert!(error.contains("older than epoch 5"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notreplicated_paths_stay_on_prim() {
    let mut pair = Pair::new(AckMode::Write);
    let addr = pair.start_second("b", "127.0.0.1:0");
    let mut config = pair.prim_config("a", addr, 1);
    config.not_replicated = vec![b"scratch".to_vec()];
    pair.start_prim(config);
    pair.wait_synced().await;

    let a = pair.dir("a");
    let rename_error = blocking({
        let a = a.clone();
        move || {
            std::fs::create_dir(a.join("scratch")).unwrap();
            std::fs::write(a.join("scratch/cache"), vec![1u8; 200_000]).unwrap();
            std::fs::write(a.join("data"), b"replicated").unwrap();
            // Moving data across the boundary would lose or invent it on SECOND.
            std::fs::rename(a.join("scratch/cache"), a.join("cache")).unwrap_err()
        }
    })
    .await;
    assert_eq!(rename_error.raw_os_error(), Some(libc::EXDEV));
    let b = pair.dir("b");
    converge_except_scratch(&a, &b).await;
    assert!(!b.join("scratch").exists(), "SECOND has no scratch");
    assert_eq!(std::fs::read(b.join("data")).unwrap(), b"replicated");
    assert_eq!(
        std::fs::metadata(a.join("scratch/cache")).unwrap().len(),
        200_000
    );
}

/// PRIM's top level without `scratch` matches SECOND's, names and file contents (a
/// write acknowledged as received may not be applied yet).
async fn converge_except_scratch(a: &std::path::Path, b: &std::path::Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let files = |dir: &std::path::Path| {
            let mut files: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap())
                .filter(|e| e.file_name() != "scratch")
                .map(|e| (e.file_name(), std::fs::read(e.path()).ok()))
                .collect();
            files.sort();
            files
        };
        if files(a) == files(b) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{:?} != {:?}",
            files(a),
            files(b)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What an acknowledgement promises, checked at the moment it is given: SECOND,
/// stopped with a drain right after the write (or, in `fsync` mode, the fsync)
/// returned, holds it in its copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_drained_right_after_an_acknowledgement_holds_what_was_acknowledged() {
    for ack in [AckMode::Write, AckMode::Fsync, AckMode::Durable] {
        let mut pair = Pair::in_step(ack).await;
        let path = pair.dir("a").join("acked");
        let data: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
        blocking({
            let data = data.clone();
            move || {
                use std::io::Write;
                let mut file = std::fs::File::create(&path).unwrap();
                file.write_all(&data).unwrap();
                if ack == AckMode::Fsync {
                    file.sync_all().unwrap();
                }
            }
        })
        .await;
        let drained = pair.second.take().unwrap().stop_and_drain();
        assert!(drained.durable <= drained.applied, "{drained:?}");
        let copy = std::fs::read(pair.dir("b").join("acked")).unwrap();
        assert!(
            copy == data,
            "{ack:?}: SECOND's copy lacks what was acknowledged"
        );
    }
}

/// A file that already had two names when the directory was mounted cannot be changed
/// through either (the change would reach SECOND under one name only); it can be read,
/// renamed and unlinked, and once it has one name left it is an ordinary file again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_with_several_hard_links_are_read_only_until_one_name_is_left() {
    let mut pair = Pair::new(AckMode::Write);
    let a = pair.dir("a");
    std::fs::write(a.join("one"), b"shared inode").unwrap();
    std::fs::hard_link(a.join("one"), a.join("two")).unwrap();
    let addr = pair.start_second("b", "127.0.0.1:0");
    pair.start_prim(pair.prim_config("a", addr, 1));
    pair.wait_synced().await;
    blocking(move || {
        let emlink = |result: std::io::Result<()>| {
            assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EMLINK));
        };
        assert_eq!(std::fs::read(a.join("two")).unwrap(), b"shared inode");
        emlink(
            std::fs::OpenOptions::new()
                .write(true)
                .open(a.join("one"))
                .map(drop),
        );
        emlink(std::fs::set_permissions(
            a.join("two"),
            std::fs::Permissions::from_mode(0o600),
        ));
        emlink(xattr_set_result(&a.join("one"), "user.k", b"v"));
        std::fs::remove_file(a.join("two")).unwrap();
        std::fs::write(a.join("one"), b"its own file now").unwrap();
    })
    .await;
    let (a, b) = (pair.dir("a"), pair.dir("b"));
    converge(&a, &b, Duration::from_secs(5)).await;
    assert_eq!(std::fs::read(b.join("one")).unwrap(), b"its own file now");
}

/// The kernel releases a closed file in the background, after close(2) returned: a
/// writable open right after the last read-only (passthrough) reader closed must not be
/// refused for a reader that is already gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writable_open_right_after_the_readers_closed_is_not_refused() {
    let pair = Pair::in_step(AckMode::Write).await;
    let path = pair.dir("a").join("f");
    blocking(move || {
        std::fs::write(&path, b"some bytes").unwrap();
        for round in 0..300 {
            drop(std::fs::File::open(&path).unwrap());
            let writable = std::fs::OpenOptions::new().write(true).open(&path);
            assert!(writable.is_ok(), "round {round}: {:?}", writable.err());
        }
    })
    .await;
}
