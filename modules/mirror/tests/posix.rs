//! What POSIX promises about inodes, as an application sees them through PRIM's mount:
//! `st_ino` identity, link counts, ctime, and a file that lives on after its last name.

mod support;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirEntryExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use rampart_mirror::AckMode;
use support::*;

/// The inode number `readdir` gives for `name` in `dir`.
fn listed_ino(dir: &Path, name: &str) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap())
        .find(|entry| entry.file_name() == name)
        .unwrap_or_else(|| panic!("{name} is not listed in {}", dir.display()))
        .ino()
}

/// The kernel forgets every inode it does not hold open, so the next `stat` is a fresh
/// lookup through the file system.
fn forget_cached_inodes() {
    std::fs::write("/proc/sys/vm/drop_caches", b"2").unwrap();
}

/// `stat` and `readdir` agree on a file's inode number, and it is the real file's: it
/// stays the same when the kernel forgets the inode, across a rename, and across a
/// restart of PRIM (tar, rsync, git and backup tools compare them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inode_numbers_are_the_real_files_and_stay_the_same() {
    let mut pair = Pair::new(AckMode::Write);
    let a = pair.dir("a");
    std::fs::create_dir(a.join("d")).unwrap();
    std::fs::write(a.join("d/f"), b"data").unwrap();
    let real_file = std::fs::metadata(a.join("d/f")).unwrap().ino();
    let real_dir = std::fs::metadata(a.join("d")).unwrap().ino();
    let addr = pair.start_second("b", "127.0.0.1:0");
    pair.start_prim(pair.prim_config("a", addr, 1));
    pair.wait_synced().await;

    blocking(move || {
        let statted = |path: &Path| std::fs::symlink_metadata(path).unwrap().ino();
        assert_eq!(
            statted(&a.join("d/f")),
            real_file,
            "stat gives the real inode"
        );
        assert_eq!(listed_ino(&a.join("d"), "f"), real_file, "so does readdir");
        assert_eq!(statted(&a.join("d")), real_dir);
        assert_eq!(listed_ino(&a, "d"), real_dir);
        forget_cached_inodes();
        assert_eq!(
            statted(&a.join("d/f")),
            real_file,
            "after the kernel forgot it"
        );
        std::fs::rename(a.join("d/f"), a.join("g")).unwrap();
        assert_eq!(statted(&a.join("g")), real_file, "a rename keeps the inode");
        assert_eq!(listed_ino(&a, "g"), real_file);

        // A file created through the mount has its real number too.
        std::fs::write(a.join("new"), b"x").unwrap();
        let new = statted(&a.join("new"));
        assert_eq!(listed_ino(&a, "new"), new);
        forget_cached_inodes();
        assert_eq!(statted(&a.join("new")), new);
    })
    .await;
}

/// A rename and a chmod change the inode's ctime, seen through the mount at once (the
/// kernel's cached attributes are not taken for current).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renames_and_attribute_changes_update_ctime() {
    let pair = Pair::in_step(AckMode::Write).await;
    let a = pair.dir("a");
    blocking(move || {
        let ctime = |path: &Path| {
            let m = std::fs::symlink_metadata(path).unwrap();
            (m.ctime(), m.ctime_nsec())
        };
        std::fs::write(a.join("f"), b"data").unwrap();
        let created = ctime(&a.join("f"));
        std::thread::sleep(Duration::from_millis(20));
        std::fs::rename(a.join("f"), a.join("g")).unwrap();
        let renamed = ctime(&a.join("g"));
        assert!(renamed > created, "rename: {created:?} -> {renamed:?}");
        std::thread::sleep(Duration::from_millis(20));
        std::fs::set_permissions(
            a.join("g"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let chmodded = ctime(&a.join("g"));
        assert!(chmodded > renamed, "chmod: {renamed:?} -> {chmodded:?}");
    })
    .await;
}

/// A directory's link count is two plus its subdirectories, kept as they come and go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_link_counts_follow_their_subdirectories() {
    let pair = Pair::in_step(AckMode::Write).await;
    let a = pair.dir("a");
    blocking(move || {
        let nlink = |path: &Path| std::fs::metadata(path).unwrap().nlink();
        std::fs::create_dir(a.join("d")).unwrap();
        assert_eq!(nlink(&a.join("d")), 2);
        std::fs::create_dir(a.join("d/x")).unwrap();
        std::fs::create_dir(a.join("d/y")).unwrap();
        assert_eq!(nlink(&a.join("d")), 4);
        std::fs::remove_dir(a.join("d/x")).unwrap();
        assert_eq!(nlink(&a.join("d")), 3);
        std::fs::write(a.join("d/f"), b"").unwrap();
        assert_eq!(nlink(&a.join("d/f")), 1);
    })
    .await;
}

/// A file open after its last name went (a database's temporary file, a mail spool's):
/// `fstat` answers with nlink 0, and it can still be written, grown, cut and read back;
/// SECOND never gets a name for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_file_lives_on_after_its_last_name_is_removed() {
    let pair = Pair::in_step(AckMode::Write).await;
    let a = pair.dir("a");
    blocking(move || {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(a.join("tmp"))
            .unwrap();
        file.write_all(b"before").unwrap();
        let ino = file.metadata().unwrap().ino();
        std::fs::remove_file(a.join("tmp")).unwrap();
        forget_cached_inodes();

        let meta = file.metadata().expect("fstat of an unlinked open file");
        assert_eq!(meta.nlink(), 0);
        assert_eq!(meta.ino(), ino);
        assert_eq!(meta.len(), 6);
        file.write_all(b" and after").unwrap();
        file.sync_all().unwrap();
        assert_eq!(file.metadata().unwrap().len(), 16);
        file.set_len(10).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 10);
        let mut back = String::new();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_string(&mut back).unwrap();
        assert_eq!(back, "before and");
    })
    .await;
    let (a, b) = (pair.dir("a"), pair.dir("b"));
    converge(&a, &b, Duration::from_secs(5)).await;
    assert!(!b.join("tmp").exists());
}
