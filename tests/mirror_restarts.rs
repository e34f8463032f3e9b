//! Roles restarted over what a killed predecessor left, as separate processes
//! (`rampart mirror prim|second`) on loopback: SECOND's read-only mount, PRIM's dead
//! FUSE mount under an application that keeps writing, mounts the operator made.

use std::process::Command;
use std::time::Duration;

#[path = "support/mirror_process.rs"]
mod mirror_process;
#[path = "support/mirror_setup.rs"]
mod mirror_setup;
use mirror_setup::*;

#[test]
fn second_killed_and_restarted_removes_its_old_mount_and_applies_again() {
    let setup = Setup::new();
    let port = free_port();
    let b = setup.path("b");
    let mut second = setup.second("b", port, 0);
    let mut prim = setup.prim("a", port, 1);
    prim.wait_for("synced", Duration::from_secs(30));
    let a = setup.path("a");
    std::fs::write(a.join("before"), vec![1u8; 200_000]).unwrap();

    // kill -9: the read-only bind mount over B's copy stays.
    second.crash();
    assert_eq!(mounts_at(&b).len(), 1, "the killed SECOND left its mount");
    prim.wait_for("peer_lost", Duration::from_secs(10));
    std::fs::write(a.join("while-away"), vec![2u8; 300_000]).unwrap();

    // The restarted SECOND removes it, puts up its own, and really applies.
    let _second = setup.second("b", port, 0);
    assert_eq!(mounts_at(&b).len(), 1, "one read-only mount, its own");
    prim.wait_for("synced", Duration::from_secs(30));
    let mut file = std::fs::File::create(a.join("after")).unwrap();
    std::io::Write::write_all(&mut file, &vec![3u8; 400_000]).unwrap();
    file.sync_all().unwrap();
    drop(file);
    prim.terminate();
    let (same, report) = setup.verify();
    assert!(same, "SECOND's copy differs after its restart:\n{report}");
    assert_eq!(std::fs::read(b.join("after")).unwrap(), vec![3u8; 400_000]);
}

#[test]
fn second_refuses_a_copy_on_a_read_only_mount() {
    let setup = Setup::new();
    let b = setup.path("b");
    let inner = b.join("inner");
    std::fs::create_dir(&inner).unwrap();
    // The operator's own read-only mount (a bind of another directory): not a leftover.
    let other = setup.path("other");
    std::fs::create_dir(&other).unwrap();
    run(Command::new("mount").arg("--bind").arg(&other).arg(&inner));
    run(Command::new("mount")
        .args(["-o", "remount,bind,ro"])
        .arg(&inner));
    let unmount = Unmount(inner.clone());
    let out = Command::new(BIN)
        .args(["mirror", "second", "--dir"])
        .arg(&inner)
        .arg("--book")
        .arg(setup.path("b.book"))
        .arg("--secret-file")
        .arg(&setup.secret)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "SECOND started on a read-only copy");
    assert!(stderr.contains("read-only mount"), "{stderr}");
    assert_eq!(
        mounts_at(&inner).len(),
        1,
        "the operator's mount is left alone"
    );
    drop(unmount);
}

/// An application that outlives a killed PRIM keeps writing by path while PRIM
/// restarts. The restarted PRIM serves the directory from beneath the dead mount and
/// mounts over it, so every write fails (ENOTCONN) or goes through the new mount: none
/// lands in the bare directory, where no mark would record it and SECOND would never
/// get it. Each write goes to a zone of its own, of a file whose earlier marks were
/// cleared, so that no other mark covers it by chance.
#[test]
fn a_prim_restarted_under_a_running_application_lets_no_write_past_replication() {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    const ZONE: u64 = 65536;
    const ZONES: u64 = 16384;
    let setup = Setup::new();
    let port = free_port();
    let mut second = setup.second("b", port, 0);
    let mut prim = setup.prim("a", port, 1);
    prim.wait_for("synced", Duration::from_secs(30));
    let big = setup.path("a").join("big");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(ZONE * ZONES)
        .unwrap();
    // PRIM clears settled intents once they are 5 s old.
    std::thread::sleep(Duration::from_secs(7));
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // The next zone only once a write returned; bounded by the stop and the
            // file's zones.
            let mut returned = Vec::new();
            let mut n = 0;
            while n < ZONES && !stop.load(Ordering::SeqCst) {
                let written = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&big)
                    .and_then(|f| f.write_all_at(&(n + 1).to_le_bytes(), n * ZONE));
                if written.is_ok() {
                    returned.push(n);
                    n += 1;
                }
            }
            returned
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    prim.crash();
    std::thread::sleep(Duration::from_millis(200));
    let mut prim = setup.prim("a", port, 1);
    prim.wait_for("synced", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let returned = writer.join().unwrap();
    prim.terminate();
    second.terminate();
    let copy = std::fs::File::open(setup.path("b").join("big")).unwrap();
    let missing: Vec<u64> = (returned.iter())
        .filter(|&&n| {
            let mut held = [0u8; 8];
            copy.read_exact_at(&mut held, n * ZONE).unwrap();
            held != (n + 1).to_le_bytes()
        })
        .copied()
        .collect();
    assert!(returned.len() > 100, "{} writes returned", returned.len());
    assert!(
        missing.is_empty(),
        "{} of {} writes that returned are not on SECOND: zones {:?}",
        missing.len(),
        returned.len(),
        &missing[..missing.len().min(10)]
    );
    let (same, report) = setup.verify();
    assert!(same, "copies differ:\n{report}");
}

/// A file system mounted inside the replicated directory is part of what PRIM serves.
/// A PRIM restarted over a dead predecessor cannot reach it from beneath the leftovers
/// (the copy of the file system below holds no mounts), so it removes them first: what
/// is mounted inside is still what the application sees.
#[test]
fn a_prim_restarted_over_a_dir_holding_a_mount_serves_what_is_mounted_inside() {
    let setup = Setup::new();
    let inner = setup.path("a").join("inner");
    std::fs::create_dir(&inner).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&inner)
        .status()
        .unwrap();
    assert!(status.success(), "mount a tmpfs inside the dir");
    let _inner = Unmount(inner.clone());
    std::fs::write(inner.join("f"), b"on the inner file system").unwrap();
    let port = free_port();
    let _second = setup.second("b", port, 0);
    let mut prim = setup.prim("a", port, 1);
    prim.wait_for("synced", Duration::from_secs(30));
    prim.crash();
    let mut prim = setup.prim("a", port, 1);
    prim.wait_for("synced", Duration::from_secs(30));
    assert_eq!(
        std::fs::read(inner.join("f")).ok().as_deref(),
        Some(&b"on the inner file system"[..])
    );
    prim.terminate();
}
