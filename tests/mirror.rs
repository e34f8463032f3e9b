//! The mirror data plane as separate processes (`rampart mirror prim|second`) on
//! loopback, with real applications on PRIM's mount: fio with verification, stress-ng's
//! file-system stressors, SQLite; and PRIM killed with writes in flight.

use std::process::Command;
use std::time::Duration;

#[path = "support/mirror_process.rs"]
mod mirror_process;
#[path = "support/mirror_setup.rs"]
mod mirror_setup;
use mirror_setup::*;

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
