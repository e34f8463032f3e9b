//! The mirror data plane as separate processes (`rampart mirror prim|second`) on
//! loopback, with real applications on PRIM's mount: fio with verification, stress-ng's
//! file-system stressors, SQLite; and PRIM killed with writes in flight.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_rampart");

#[path = "support/mirror_process.rs"]
mod mirror_process;
use mirror_process::MirrorProcess;

struct Setup {
    root: tempfile::TempDir,
    secret: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        std::fs::create_dir_all("/var/tmp/rampart-mirror-tests").unwrap();
        let root = tempfile::Builder::new()
            .prefix("proc")
            .tempdir_in("/var/tmp/rampart-mirror-tests")
            .unwrap();
        for dir in ["a", "b", "a.book", "b.book"] {
            std::fs::create_dir(root.path().join(dir)).unwrap();
        }
        let secret = root.path().join("secret");
        std::fs::write(&secret, "mirror process test").unwrap();
        Setup { root, secret }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// `rampart mirror ROLE` for node `side`, with the arguments both roles take.
    fn spawn(&self, role: &str, side: &str, extra: &[String]) -> MirrorProcess {
        let dir = self.path(side);
        let mut args: Vec<String> = vec![
            role.into(),
            "--dir".into(),
            dir.to_string_lossy().into_owned(),
            "--book".into(),
            self.path(&format!("{side}.book"))
                .to_string_lossy()
                .into_owned(),
            "--secret-file".into(),
            self.secret.to_string_lossy().into_owned(),
            "--zone-size".into(),
            "65536".into(),
        ];
        args.extend_from_slice(extra);
        MirrorProcess::spawn(&args, &dir, "warn")
    }

    fn second(&self, side: &str, port: u16, epoch: u64) -> MirrorProcess {
        let s = self.spawn(
            "second",
            side,
            &[
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--epoch".into(),
                epoch.to_string(),
            ],
        );
        s.wait_for("listening", Duration::from_secs(10));
        s
    }

    fn prim(&self, side: &str, port: u16, epoch: u64) -> MirrorProcess {
        let s = self.spawn(
            "prim",
            side,
            &[
                "--peer".into(),
                format!("127.0.0.1:{port}"),
                "--epoch".into(),
                epoch.to_string(),
                "--link-timeout".into(),
                "1s".into(),
            ],
        );
        s.wait_for("mounted", Duration::from_secs(10));
        s
    }

    fn verify(&self) -> (bool, String) {
        let out = Command::new(BIN)
            .args(["mirror", "verify"])
            .arg(self.path("a"))
            .arg(self.path("b"))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

impl Setup {
    /// `rampart mirror estimate` on `side`'s book (zones of 64 KiB, as spawned).
    fn estimate(&self, side: &str) -> serde_json::Value {
        let out = run(Command::new(BIN)
            .args(["mirror", "estimate", "--zone-size", "65536", "--book"])
            .arg(self.path(&format!("{side}.book"))));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("estimate printed {out:?}: {e}"))
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn fio_and_stress_ng_on_prim_leave_a_verified_copy_on_second() {
    let setup = Setup::new();
    let port = free_port();
    let _second = setup.second("b", port, 0);
    let mut prim = setup.prim("a", port, 1);
    prim.wait_for("synced", Duration::from_secs(30));
    let a = setup.path("a");

    // fio writes with checksums, reads them back through the mount and checks them.
    run(Command::new("fio").current_dir(&a).args([
        "--name=verify",
        "--rw=randwrite",
        "--bs=4k,64k",
        "--size=24M",
        "--ioengine=psync",
        "--verify=crc32c",
        "--do_verify=1",
        "--fsync=64",
        "--numjobs=2",
        "--group_reporting",
    ]));
    // stress-ng's file-system stressors, bounded in time and operations.
    let stress = a.join("stress");
    std::fs::create_dir(&stress).unwrap();
    run(Command::new("stress-ng").current_dir(&stress).args([
        "--temp-path",
        ".",
        "--dir",
        "1",
        "--dir-ops",
        "200",
        "--rename",
        "1",
        "--rename-ops",
        "2000",
        // No --link: hard links are refused in a replicated directory (README).
        "--symlink",
        "1",
        "--symlink-ops",
        "200",
        "--chmod",
        "1",
        "--chmod-ops",
        "200",
        "--fallocate",
        "1",
        "--fallocate-ops",
        "50",
        "--hdd",
        "1",
        "--hdd-ops",
        "200",
        "--xattr",
        "1",
        "--xattr-ops",
        "200",
        "--timeout",
        "20s",
    ]));
    // Everything acknowledged reached SECOND; after its periodic sync, the copies match
    // byte for byte.
    prim.terminate();
    let (same, report) = setup.verify();
    assert!(same, "copies differ after fio and stress-ng:\n{report}");
}

#[test]
fn sqlite_on_prim_leaves_a_consistent_database_on_second() {
    let setup = Setup::new();
    let port = free_port();
    let _second = setup.second("b", port, 0);
    let mut prim = setup.prim("a", port, 1);
    prim.wait_for("synced", Duration::from_secs(30));
    let db = setup.path("a").join("app.db");
    // 400 transactions of 50 rows each, in rollback-journal mode with full syncs.
    let script = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("pragma journal_mode=delete")
db.execute("pragma synchronous=full")
db.execute("create table t(id integer primary key, tx int, payload text)")
for tx in range(400):
    with db:
        db.executemany("insert into t(tx, payload) values (?, ?)",
                       [(tx, "x" * (tx % 300)) for _ in range(50)])
    if tx % 50 == 0:
        with db:
            db.execute("delete from t where tx = ?", (tx // 2,))
print(db.execute("select count(*) from t").fetchone()[0])
"#;
    let count = run(Command::new("python3").args(["-c", script]).arg(&db));
    prim.terminate();
    // SECOND's copy, opened read-only from its protected directory.
    let copy = setup.path("b").join("app.db");
    let check = r#"
import sqlite3, sys
db = sqlite3.connect("file:" + sys.argv[1] + "?mode=ro&immutable=1", uri=True)
print(db.execute("pragma integrity_check").fetchone()[0])
print(db.execute("select count(*) from t").fetchone()[0])
"#;
    let out = run(Command::new("python3").args(["-c", check]).arg(&copy));
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("ok"), "integrity check on SECOND: {out}");
    assert_eq!(lines.next(), Some(count.trim()));
}

#[test]
fn prim_killed_with_writes_in_flight_is_overwritten_when_it_returns_as_second() {
    let setup = Setup::new();
    let (port_b, port_a) = (free_port(), free_port());
    // Node A is PRIM (epoch 1), node B SECOND.
    let mut second_b = setup.second("b", port_b, 0);
    let mut prim_a = setup.prim("a", port_b, 1);
    prim_a.wait_for("synced", Duration::from_secs(30));
    let a = setup.path("a");
    for i in 0..8 {
        std::fs::write(a.join(format!("f{i}")), vec![i as u8; 512 << 10]).unwrap();
    }
    // A writer keeps rewriting zones; PRIM is killed under it.
    let writer = {
        let a = a.clone();
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let mut round = 0u64;
            loop {
                round += 1;
                let Ok(f) = std::fs::OpenOptions::new()
                    .write(true)
                    .open(a.join(format!("f{}", round % 8)))
                else {
                    return round;
                };
                if f.write_all_at(
                    &vec![(round % 251) as u8; 100_000],
                    (round * 7919) % 400_000,
                )
                .is_err()
                {
                    return round;
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    // Its dead FUSE mount stays on A's directory, for A's next run to remove.
    prim_a.crash();
    let rounds = writer.join().unwrap();
    assert!(rounds > 10, "the writer made progress ({rounds} writes)");

    // B becomes PRIM in epoch 2; A returns as its SECOND.
    second_b.terminate();
    let _second_a = setup.second("a", port_a, 0);
    let mut prim_b = setup.prim("b", port_a, 2);
    let (_, synced) = prim_b.wait_for("synced", Duration::from_secs(60));
    assert!(synced["bytes_sent"].is_u64(), "{synced}");
    prim_b.terminate();
    let (same, report) = setup.verify();
    assert!(
        same,
        "copies differ after the returning node was reintegrated:\n{report}"
    );
}

#[test]
fn estimate_reads_the_book_of_a_running_prim() {
    let setup = Setup::new();
    let port = free_port();
    let mut second = setup.second("b", port, 0);
    let mut prim = setup.prim("a", port, 1);
    prim.wait_for("synced", Duration::from_secs(30));
    assert_eq!(setup.estimate("a")["zones"], 0, "in step: nothing pending");

    // SECOND goes away; PRIM continues alone with 3 MiB written in one file.
    second.kill();
    std::fs::write(setup.path("a").join("data"), vec![7u8; 3 << 20]).unwrap();
    prim.wait_for("peer_lost", Duration::from_secs(10));
    let pending = setup.estimate("a");
    assert_eq!(pending["files"], 1, "{pending}");
    assert_eq!(pending["zones"], 48, "3 MiB in 64 KiB zones: {pending}");
    assert_eq!(pending["bytes_at_most"], 3 << 20, "{pending}");

    // SECOND returns and is brought up to date: nothing pending any more.
    let _second = setup.second("b", port, 0);
    prim.wait_for("synced", Duration::from_secs(30));
    assert_eq!(setup.estimate("a")["zones"], 0);
    prim.terminate();
    assert!(setup.verify().0);
}

/// The mounts at `dir` in this process's mount table, by file system type.
fn mounts_at(dir: &std::path::Path) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = dir.to_string_lossy().replace(' ', "\\040");
    table
        .lines()
        .filter(|line| line.split(' ').nth(4) == Some(dir.as_str()))
        .filter_map(|line| Some(line.split_once(" - ")?.1.split(' ').next()?.to_string()))
        .collect()
}

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

/// Lazily unmounts its directory when dropped, whether the test passed or not.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A writer throttled by a frozen SECOND holds one dispatch thread: in `fsync` mode
/// writes return before SECOND has them, until the bytes in flight fill the send
/// window. Lookups and reads of other files go on beside it. With a single dispatch
/// thread they would wait with it until the link timeout declared SECOND lost. (In
/// `write` mode each write waits for SECOND's acknowledgement without holding a thread;
/// a create waits holding its directory's lock in the kernel, as it must.)
#[test]
fn lookups_and_reads_answer_while_a_writer_waits_for_the_send_window() {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    let setup = Setup::new();
    let port = free_port();
    let mut second = setup.second("b", port, 0);
    let extra = [
        "--peer".to_string(),
        format!("127.0.0.1:{port}"),
        "--epoch".into(),
        "1".into(),
        "--link-timeout".into(),
        "20s".into(),
        "--ack".into(),
        "fsync".into(),
    ];
    let mut prim = setup.spawn("prim", "a", &extra);
    prim.wait_for("synced", Duration::from_secs(30));
    let a = setup.path("a");
    // Write-only, then read-write: both direct, so every read reaches the mount.
    let shared = a.join("shared");
    std::fs::write(&shared, vec![7u8; 65536]).unwrap();
    let _writer_side = std::fs::OpenOptions::new()
        .write(true)
        .open(&shared)
        .unwrap();
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&shared)
        .unwrap();

    std::fs::write(a.join("big"), b"").unwrap();
    second.pause();
    const TOTAL: u64 = 160 << 20;
    let written = Arc::new(AtomicU64::new(0));
    let writer = std::thread::spawn({
        let (path, written) = (a.join("big"), written.clone());
        move || {
            let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            let chunk = vec![1u8; 1 << 20];
            while written.load(Ordering::SeqCst) < TOTAL {
                let at = written.load(Ordering::SeqCst);
                file.write_all_at(&chunk, at).unwrap();
                written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        }
    });
    // Stalled: no progress for half a second, short of the end.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = (written.load(Ordering::SeqCst), Instant::now());
    while seen.1.elapsed() < Duration::from_millis(500) {
        assert!(Instant::now() < deadline, "the writer never stalled");
        std::thread::sleep(Duration::from_millis(20));
        let now = written.load(Ordering::SeqCst);
        if now != seen.0 {
            seen = (now, Instant::now());
        }
    }
    assert!(seen.0 < TOTAL, "the writer finished with SECOND frozen");
    // Past the 64 MiB window: held by it, not by anything before.
    assert!(
        seen.0 >= 60 << 20,
        "the writer stalled after {} bytes",
        seen.0
    );

    let started = Instant::now();
    for k in 0..20 {
        let missing = std::fs::metadata(a.join(format!("missing-{k}")));
        assert_eq!(missing.unwrap_err().kind(), std::io::ErrorKind::NotFound);
        let mut buf = [0u8; 4096];
        reader.read_exact_at(&mut buf, k * 1024).unwrap();
        assert_eq!(buf, [7u8; 4096]);
    }
    let took = started.elapsed();
    let still = written.load(Ordering::SeqCst);
    second.resume();
    writer.join().unwrap();
    assert_eq!(
        still, seen.0,
        "the writer moved while the others were measured"
    );
    assert!(
        took < Duration::from_secs(2),
        "20 lookups and reads took {took:?} beside a throttled writer"
    );
    drop((reader, _writer_side));
    prim.terminate();
    // The close waited for SECOND to receive everything, not to apply it: SECOND's stop
    // applies what it received.
    second.terminate();
    let (same, report) = setup.verify();
    assert!(same, "SECOND's copy differs:\n{report}");
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

/// Unmounts on drop (after the processes declared after it have stopped).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
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
    let _inner = Mounted(inner.clone());
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
